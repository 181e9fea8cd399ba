// Rotary position embedding, in place, on up to two arrays of the same rows (the backend
// fuses rope(q) with the rope(k) right after it): x0 (n, n_heads0 * head_dim) and
// x1 (n, n_heads1 * head_dim; n_heads1 = 0: none), with the host's cos, sin tables
// (n, rope_dim / 2) for each row's position.
//   neox = 0: pairs (2i, 2i + 1) (llama.cpp "normal" RoPE; GGUF llama q/k are permuted for it)
//   neox = 1: pairs (i, i + rope_dim / 2)
// a' = a cos - b sin, b' = a sin + b cos, each product rounded on its own as NumPy does.
// Dimensions >= rope_dim are left alone.
// Work-item t rotates one pair: t < n * n_heads0 * rope_dim / 2 in x0, the rest in x1.
// Global: round_up(n * (n_heads0 + n_heads1) * rope_dim / 2, EW_LWS).
#include "common.clh"
#include "rope.clh"

__kernel __attribute__((reqd_work_group_size(EW_LWS, 1, 1)))
void rope_f32(__global float* x0, int x0_off, int n_heads0,
              __global float* x1, int x1_off, int n_heads1,
              __global const float* cos_t, __global const float* sin_t,   // (n, rope_dim / 2)
              int head_dim, int rope_dim, int neox, int n)
{
    int t = get_global_id(0);
    const int half_ = rope_dim / 2;
    const int total0 = n * n_heads0 * half_;
    __global float* x = x0 + x0_off;
    int n_heads = n_heads0;
    if (t >= total0) {
        t -= total0;
        if (t >= n * n_heads1 * half_) return;
        x = x1 + x1_off;
        n_heads = n_heads1;
    }
    const int i = t % half_;
    const int hrow = t / half_;              // row * n_heads + head
    const int row = hrow / n_heads;
    __global float* h = x + (size_t)hrow * head_dim;
    const int ia = ROPE_DA(i, half_, neox), ib = ROPE_DB(i, half_, neox);
    const float2 r = rope_rotate(h[ia], h[ib], cos_t[row * half_ + i], sin_t[row * half_ + i]);
    h[ia] = r.x;
    h[ib] = r.y;
}
