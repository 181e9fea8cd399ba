// Causal GQA attention over the KV cache, one work-item per (row, head):
//   out[i, h] = softmax(q[i, h] . K[cells first..positions[i]] * scale) @ V
// (first = 0, or with a sliding window the oldest of the row's last `window` positions)
// where K, V are the cells of layer `layer`, slot slots[i], kv head h / (n_head / n_head_kv).
// The batch's own k, v rows are already stored (kv_store), so a row sees the earlier rows
// of its slot. Online softmax over chunks of 16 cells: nothing proportional to the context
// is allocated, and a row's result depends only on its own cells, never on n.
// The caches are float32, or IEEE half with -DKV_F16=1. -DHEAD_DIM=<multiple of 16>.
// Global: round_up(n * n_head, ATTN_LWS).
#include "common.clh"

#define HV (HEAD_DIM / 16)          // 16-wide vectors per head
#define HT (HEAD_DIM % 16)          // scalar tail
#define HV_N (HV > 0 ? HV : 1)      // (no zero-length arrays)
#if KV_F16
#define KV_T ushort
#define LOAD_KV16(p) LOAD_F16x16(p)
#define LOAD_KV(p) LOAD_HALF(p)
#else
#define KV_T float
#define LOAD_KV16(p) LOAD_F32x16(p)
#define LOAD_KV(p) (*(p))
#endif

typedef union { float a[16]; float16 v; } f16x_t;

__kernel __attribute__((reqd_work_group_size(ATTN_LWS, 1, 1)))
void attn_f32(__global const KV_T* kc, int kc_off, __global const KV_T* vc, int vc_off,
              __global const float* q, int q_off,      // (n, n_head * HEAD_DIM)
              __global float* out, int out_off,        // (n, n_head * HEAD_DIM)
              __global const int* slots, __global const int* positions,   // (n,)
              int layer, int n_slots, int n_ctx, int n_head, int n_head_kv, float scale, int n,
              int window)                              // > 0: a row sees only its last `window` positions
{
    const int t = get_global_id(0);
    if (t >= n * n_head) return;
    const int i = t / n_head, h = t % n_head;
    const int kvh = h / (n_head / n_head_kv);
    const int E = n_head_kv * HEAD_DIM;
    const int L = positions[i] + 1;
    const int first = window > 0 && L > window ? L - window : 0;   // the oldest cell of a sliding window
    const size_t base = ((size_t)layer * n_slots + slots[i]) * n_ctx * E + (size_t)kvh * HEAD_DIM;
    __global const KV_T* kp = kc + kc_off + base;
    __global const KV_T* vp = vc + vc_off + base;
    __global const float* qp = q + q_off + (size_t)t * HEAD_DIM;

    float16 qv[HV_N], acc[HV_N];
    for (int v = 0; v < HV; v++) {
        qv[v] = LOAD_F32x16(qp + 16 * v);
        acc[v] = (float16)0.0f;
    }
#if HT
    float qt[HT], acct[HT];
    for (int e = 0; e < HT; e++) {
        qt[e] = qp[16 * HV + e];
        acct[e] = 0.0f;
    }
#endif
    float m = -INFINITY, l = 0.0f;
    for (int c0 = first; c0 < L; c0 += 16) {
        f16x_t s, p;
        for (int j = 0; j < 16; j++) {
            const int cell = c0 + j;
            if (cell < L) {
                __global const KV_T* kr = kp + (size_t)(cell % n_ctx) * E;   // a local layer's ring
                float16 d = (float16)0.0f;
                for (int v = 0; v < HV; v++) d = qv[v] * LOAD_KV16(kr + 16 * v) + d;
                float dot = hsum16(d);
#if HT
                for (int e = 0; e < HT; e++) dot = qt[e] * LOAD_KV(kr + 16 * HV + e) + dot;
#endif
                s.a[j] = dot * scale;
            } else {
                s.a[j] = -INFINITY;
            }
        }
        const float mn = VMAX(m, hmax16(s.v));
        p.v = exp(s.v - mn);
        const float corr = exp(m - mn);      // 0 on the first chunk (m = -inf)
        l = l * corr + hsum16(p.v);
        for (int v = 0; v < HV; v++) acc[v] *= corr;
#if HT
        for (int e = 0; e < HT; e++) acct[e] *= corr;
#endif
        for (int j = 0; j < 16 && c0 + j < L; j++) {
            __global const KV_T* vr = vp + (size_t)((c0 + j) % n_ctx) * E;
            for (int v = 0; v < HV; v++) acc[v] = p.a[j] * LOAD_KV16(vr + 16 * v) + acc[v];
#if HT
            for (int e = 0; e < HT; e++) acct[e] = p.a[j] * LOAD_KV(vr + 16 * HV + e) + acct[e];
#endif
        }
        m = mn;
    }
    __global float* op = out + out_off + (size_t)t * HEAD_DIM;
    for (int v = 0; v < HV; v++) STORE_F32x16(acc[v] / l, op + 16 * v);
#if HT
    for (int e = 0; e < HT; e++) op[16 * HV + e] = acct[e] / l;
#endif
}
