// out[i] = argmax of row i of x (n, V): the first index of the largest value, as np.argmax.
// One work-group of RED_LWS work-items per row; work-item l scans 16-element chunks
// l, l + RED_LWS, ... keeping the best (value, index) per vector lane; the candidates are
// merged by a fixed tree that prefers the larger value, then the smaller index.
// Global: (RED_LWS * n).
#include "common.clh"

typedef union { float a[16]; float16 v; } f16x_t;
typedef union { int a[16]; int16 v; } i16x_t;

inline bool better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

__kernel __attribute__((reqd_work_group_size(RED_LWS, 1, 1)))
void argmax_f32(__global const float* x, int x_off, int V, __global int* out, int n)
{
    const int lane = get_local_id(0);
    const int i = get_group_id(0);
    __global const float* row = x + x_off + (size_t)i * V;
    const int nc = V / 16;
    const int16 iota = (int16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);

    f16x_t bv;
    i16x_t bi;
    bv.v = (float16)(-INFINITY);
    bi.v = (int16)(INT_MAX);
    for (int c = lane; c < nc; c += RED_LWS) {
        float16 v = LOAD_F32x16(row + 16 * c);
        int16 gt = v > bv.v;                 // strict: an equal later value keeps the earlier index
        bv.v = gt ? v : bv.v;
        bi.v = gt ? (iota + 16 * c) : bi.v;
    }
    float best = -INFINITY;
    int bidx = INT_MAX;
    for (int j = 0; j < 16; j++) {
        if (better(bv.a[j], bi.a[j], best, bidx)) { best = bv.a[j]; bidx = bi.a[j]; }
    }
    if (lane == 0) {
        for (int k = nc * 16; k < V; k++) {
            if (better(row[k], k, best, bidx)) { best = row[k]; bidx = k; }
        }
    }
#if RED_LWS > 1
    __local float pv[RED_LWS];
    __local int pi[RED_LWS];
    pv[lane] = best;
    pi[lane] = bidx;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int h = RED_LWS / 2; h > 0; h >>= 1) {
        if (lane < h && better(pv[lane + h], pi[lane + h], pv[lane], pi[lane])) {
            pv[lane] = pv[lane + h];
            pi[lane] = pi[lane + h];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    bidx = pi[0];
#endif
    if (lane == 0) out[i] = bidx == INT_MAX ? 0 : bidx;
}
