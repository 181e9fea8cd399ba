// out = x / sqrt(mean(x^2) + eps) * w, per row of x (n, E).
//
// One work-group of RED_LWS work-items per row (vendor tuning in common.clh). Work-item l
// sums the squares of 16-element chunks l, l + RED_LWS, ... into a 16-wide accumulator;
// lane partials are summed by a fixed tree, so a row's result never depends on n.
// Global: (RED_LWS * n).
#include "rms_norm.clh"

__kernel __attribute__((reqd_work_group_size(RED_LWS, 1, 1))) __attribute__((vec_type_hint(float16)))
void rms_norm_f32(__global const float* x, int x_off,    // (n, E)
                  __global const float* w, int w_off,    // (E,)
                  __global float* out, int out_off,      // (n, E); may be x
                  int E, float eps, int n)
{
    const int lane = get_local_id(0);
    const int i = get_group_id(0);
    __global const float* xr = x + x_off + (size_t)i * E;
    __global float* orow = out + out_off + (size_t)i * E;
    const int nc = E / 16;

    float16 acc = (float16)0.0f;
    for (int c = lane; c < nc; c += RED_LWS) {
        float16 v = LOAD_F32x16(xr + 16 * c);
        acc = v * v + acc;
    }
    float s = hsum16(acc);
    if (lane == 0) {
        for (int k = nc * 16; k < E; k++) s = xr[k] * xr[k] + s;
    }
    __local float part[RED_LWS];
    rms_norm_finish(s, lane, nc, E, eps, part, xr, w + w_off, orow);
}
