// out = x * s, element-wise over `total` floats (out may be x): gemma's embeddings * sqrt(n_embd).
// Work-item t handles elements 16t .. 16t+15 (the last one also the scalar tail).
// Global: round_up(ceil(total / 16), EW_LWS).
#include "common.clh"

__kernel __attribute__((reqd_work_group_size(EW_LWS, 1, 1))) __attribute__((vec_type_hint(float16)))
void scale_f32(__global const float* x, int x_off,
               __global float* out, int out_off,
               float s, int total)
{
    const int t = get_global_id(0);
    const int k0 = 16 * t;
    x += x_off; out += out_off;
    if (k0 + 16 <= total) {
        STORE_F32x16(LOAD_F32x16(x + k0) * s, out + k0);
    } else {
        for (int k = k0; k < total; k++) out[k] = x[k] * s;
    }
}
