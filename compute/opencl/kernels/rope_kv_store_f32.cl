// RoPE of q in place, and RoPE of k with k and v written into the KV caches, in one launch:
// what rope_f32.cl on (q, k) followed by kv_store_f32.cl does, bit for bit, minus one launch
// per layer (the graph's `rope_kv_store`). q (n, n_head * head_dim), k and v (n, E) with
// E = n_head_kv * head_dim; the caches (n_layer, n_slots, n_ctx, E), float32 or IEEE half
// with -DKV_F16=1 (round to nearest even, as kv_store_f32.cl). cos, sin: (n, rope_dim / 2).
// k itself is left as it was (only its rotated copy in the cache is used afterwards).
// Work-items: t < n * n_head * rope_dim / 2 rotates one pair of q (as rope_f32.cl); the next
// n * E each store one element of k (rotated, when its dimension is < rope_dim: rope.clh, as
// rope_f32.cl) and of v.
// Global: round_up(n * n_head * rope_dim / 2 + n * E, EW_LWS).
#include "common.clh"
#include "kv_store.clh"
#include "rope.clh"

__kernel __attribute__((reqd_work_group_size(EW_LWS, 1, 1)))
void rope_kv_store_f32(__global float* q, int q_off, __global const float* k, int k_off,
                       __global const float* v, int v_off,
                       __global KV_T* kc, int kc_off, __global KV_T* vc, int vc_off,
                       __global const float* cos_t, __global const float* sin_t,   // (n, rope_dim / 2)
                       __global const int* slots, __global const int* positions,   // (n,)
                       int n_head, int n_head_kv, int head_dim, int rope_dim, int neox,
                       int layer, int n_slots, int n_ctx, int n)
{
    int t = get_global_id(0);
    const int half_ = rope_dim / 2;
    const int nq = n * n_head * half_;
    const int E = n_head_kv * head_dim;
    if (t < nq) {  // one pair of q, in place
        const int i = t % half_;
        const int hrow = t / half_;             // row * n_head + head
        const int row = hrow / n_head;
        __global float* h = q + q_off + (size_t)hrow * head_dim;
        const int ia = ROPE_DA(i, half_, neox), ib = ROPE_DB(i, half_, neox);
        const float2 r = rope_rotate(h[ia], h[ib], cos_t[row * half_ + i], sin_t[row * half_ + i]);
        h[ia] = r.x;
        h[ib] = r.y;
        return;
    }
    t -= nq;
    if (t >= n * E) return;
    const int row = t / E, e = t % E;
    const int d = e % head_dim;                 // dimension within its head
    float kv = k[k_off + t];
    if (d < rope_dim) {                         // rotated: this element of its pair (da, db)
        const bool first = neox ? d < half_ : (d % 2) == 0;
        const int i = neox ? (first ? d : d - half_) : d / 2;
        __global const float* h = k + k_off + (size_t)t - d;
        const float2 r = rope_rotate(h[ROPE_DA(i, half_, neox)], h[ROPE_DB(i, half_, neox)],
                                     cos_t[row * half_ + i], sin_t[row * half_ + i]);
        kv = first ? r.x : r.y;
    }
    const size_t cell = ((size_t)layer * n_slots + slots[row]) * n_ctx + positions[row] % n_ctx;  // a ring: pos % n
    const size_t dst = cell * E + e;
    KV_STORE(kv, dst, kc + kc_off);
    KV_STORE(v[v_off + t], dst, vc + vc_off);
}
