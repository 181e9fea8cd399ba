// out = silu(gate) * up = gate * (up / (1 + exp(-gate))), element-wise over `total` floats
// (out may be gate or up). The operation order is the NumPy reference's.
// Work-item t handles elements 16t .. 16t+15 (the last one also the scalar tail).
// Global: round_up(ceil(total / 16), EW_LWS).
#include "common.clh"

__kernel __attribute__((reqd_work_group_size(EW_LWS, 1, 1))) __attribute__((vec_type_hint(float16)))
void swiglu_f32(__global const float* gate, int g_off,
                __global const float* up, int u_off,
                __global float* out, int out_off,
                int total)
{
    const int t = get_global_id(0);
    const int k0 = 16 * t;
    gate += g_off; up += u_off; out += out_off;
    if (k0 + 16 <= total) {
        float16 g = LOAD_F32x16(gate + k0);
        float16 u = LOAD_F32x16(up + k0);
        STORE_F32x16(g * (u / (1.0f + exp(-g))), out + k0);
    } else {
        for (int k = k0; k < total; k++) {
            float g = gate[k];
            out[k] = g * (up[k] / (1.0f + exp(-g)));
        }
    }
}
