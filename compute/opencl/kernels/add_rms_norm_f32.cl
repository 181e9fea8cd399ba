// The residual add and the RMS norm that follows it, in one launch (the backend fuses
// add(a, b, x) with the rms_norm(x, w, eps, out) right after it):
//   x = a + b; out = x / sqrt(mean(x^2) + eps) * w, per row of (n, E).
// The arithmetic is add_f32's, then rms_norm_f32's (same chunks, same tree), so the
// results are bit-identical to the two kernels run one after the other.
// One work-group of RED_LWS work-items per row; a work-item reads back only what it wrote.
// Global: (RED_LWS * n).
#include "rms_norm.clh"

__kernel __attribute__((reqd_work_group_size(RED_LWS, 1, 1)))
void add_rms_norm_f32(__global const float* a, int a_off,      // (n, E)
                      __global const float* b, int b_off,      // (n, E)
                      __global float* x, int x_off,            // (n, E) = a + b; may be a or b
                      __global const float* w, int w_off,      // (E,)
                      __global float* out, int out_off,        // (n, E)
                      int E, float eps, int n)
{
    const int lane = get_local_id(0);
    const size_t row = (size_t)get_group_id(0) * E;
    __global const float* ar = a + a_off + row;
    __global const float* br = b + b_off + row;
    __global float* xr = x + x_off + row;
    __global float* orow = out + out_off + row;
    const int nc = E / 16;

    float16 acc = (float16)0.0f;
    for (int c = lane; c < nc; c += RED_LWS) {
        float16 v = LOAD_F32x16(ar + 16 * c) + LOAD_F32x16(br + 16 * c);
        STORE_F32x16(v, xr + 16 * c);
        acc = v * v + acc;
    }
    float s = hsum16(acc);
    if (lane == 0) {
        for (int k = nc * 16; k < E; k++) {
            const float v = ar[k] + br[k];
            xr[k] = v;
            s = v * v + s;
        }
    }
    __local float part[RED_LWS];
    rms_norm_finish(s, lane, nc, E, eps, part, xr, w + w_off, orow);
}
