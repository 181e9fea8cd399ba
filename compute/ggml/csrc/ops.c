// Custom ops that the ggml backend (compute/ggml/) puts into its graphs where ggml has no op of the
// shape specserve needs. Each is a ggml_custom_op_t: ggml's threadpool calls it once per thread
// (ith of nth) inside one graph computation. They take everything from a small argument struct
// that the Python side fills once per recorded graph, after ggml's allocator placed its tensors,
// so this file needs no ggml header.
//
// Run-time ISA dispatch: the hot loops are compiled for several x86-64 levels (target_clones)
// and the loader picks the best one the CPU has, as ggml itself does with its CPU variants.

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPECSERVE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPECSERVE_CLONES
#endif

#define MAX_HEAD_DIM 512
#define MAX_GROUP 64
#define LANES 16

// ---- attention over per-slot KV cells ----------------------------------------------------------
//
// Row i of the batch (its token in slot slots[i] at position pos[i]) attends to cells 0..pos[i] of
// its slot, every query head h to KV head h / (n_head / n_head_kv). The row's own K, V are already
// in the cache (the graph stores them first). One row's arithmetic never depends on the other rows:
// a (row, KV head) is one task, computed by one thread with the same loop whatever the batch.
//
// Softmax is computed online (running max and sum, one pass over the cells), in float32.

typedef struct {
    const float *q;      // (n_rows, q_row) query rows after RoPE
    const void *k;       // this layer's K cache: (n_slots, n_ctx_slot, kv_row) of f32 or f16
    const void *v;       // this layer's V cache, same layout
    const int32_t *slots;  // (n_rows,)
    const int32_t *pos;    // (n_rows,)
    float *out;          // (n_rows, q_row)
    int64_t q_row;       // floats per query / output row (n_head * head_dim)
    int64_t kv_row;      // elements per KV cell (n_head_kv * head_dim)
    int32_t n_rows, n_head, n_head_kv, head_dim, n_ctx_slot, kv_f16;
    float scale;         // 1 / sqrt(head_dim)
} attention_args;

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// one cell of K or V as float32 (dst: head_dim floats)
static inline void load_cell(const attention_args *a, const void *base, int64_t cell, int kvh, float *dst) {
    const int64_t off = cell * a->kv_row + (int64_t)kvh * a->head_dim;
    if (a->kv_f16) {
        const uint16_t *src = (const uint16_t *)base + off;
        for (int d = 0; d < a->head_dim; d++) dst[d] = half_to_float(src[d]);
    } else {
        memcpy(dst, (const float *)base + off, sizeof(float) * (size_t)a->head_dim);
    }
}

// dot product in LANES fixed partial sums, then a fixed-order sum: the same rounding on every call
static inline float dot(const float *x, const float *y, int n) {
    float acc[LANES] = {0};
    int d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += x[d + j] * y[d + j];
    for (int j = 0; d < n; d++, j++) acc[j] += x[d] * y[d];
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += acc[j];
    return s;
}

SPECSERVE_CLONES
static void attention_task(const attention_args *a, int row, int kvh) {
    const int g = a->n_head / a->n_head_kv, hd = a->head_dim;
    const int64_t base = (int64_t)a->slots[row] * a->n_ctx_slot;
    const int n_cells = a->pos[row] + 1;
    const float *q = a->q + row * a->q_row + (int64_t)kvh * g * hd;
    float kc[MAX_HEAD_DIM], vc[MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
    float m[MAX_GROUP], sum[MAX_GROUP];
    for (int h = 0; h < g; h++) {
        m[h] = -INFINITY;
        sum[h] = 0.0f;
        for (int d = 0; d < hd; d++) acc[h][d] = 0.0f;
    }
    for (int c = 0; c < n_cells; c++) {
        load_cell(a, a->k, base + c, kvh, kc);
        load_cell(a, a->v, base + c, kvh, vc);
        for (int h = 0; h < g; h++) {
            const float s = dot(q + (int64_t)h * hd, kc, hd) * a->scale;
            float w = 1.0f;
            if (s > m[h]) {  // new maximum: rescale what was summed so far
                const float r = expf(m[h] - s);
                sum[h] *= r;
                for (int d = 0; d < hd; d++) acc[h][d] *= r;
                m[h] = s;
            } else {
                w = expf(s - m[h]);
            }
            sum[h] += w;
            for (int d = 0; d < hd; d++) acc[h][d] += w * vc[d];
        }
    }
    float *out = a->out + row * a->q_row + (int64_t)kvh * g * hd;
    for (int h = 0; h < g; h++) {
        const float inv = 1.0f / sum[h];
        for (int d = 0; d < hd; d++) out[(int64_t)h * hd + d] = acc[h][d] * inv;
    }
}

// ggml_custom_op_t: (dst, ith, nth, userdata); tasks (row, KV head) are dealt round-robin to threads
void specserve_attention(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    const attention_args *a = (const attention_args *)userdata;
    const int n_tasks = a->n_rows * a->n_head_kv;
    for (int t = ith; t < n_tasks; t += nth) attention_task(a, t / a->n_head_kv, t % a->n_head_kv);
}

// Limits the Python side checks before it builds a graph (a model beyond them is refused at Fit).
int specserve_attention_max_head_dim(void) { return MAX_HEAD_DIM; }
int specserve_attention_max_group(void) { return MAX_GROUP; }

// ---- RoPE from the host's tables -------------------------------------------------------------------
//
// out = x with each row's heads rotated by the row's angles: cos, sin (n_rows, rope_dim / 2) are the
// tables every backend takes from Backend.rope_tables, so the rotation is the NumPy reference's to
// the bit (no fused multiply-add: a * c - b * s rounds each product, as NumPy does). neox rotates
// (i, i + rope_dim / 2), otherwise adjacent pairs (2i, 2i + 1); dimensions past rope_dim are copied.

typedef struct {
    const float *x;
    const float *cos, *sin;
    float *out;
    int32_t n_rows, n_heads, head_dim, rope_dim, neox;
} rope_args;

__attribute__((optimize("fp-contract=off")))
static void rope_row(const rope_args *a, int row) {
    const int half = a->rope_dim / 2, hd = a->head_dim;
    const float *c = a->cos + (int64_t)row * half, *s = a->sin + (int64_t)row * half;
    const int64_t w = (int64_t)a->n_heads * hd;
    for (int h = 0; h < a->n_heads; h++) {
        const float *x = a->x + row * w + (int64_t)h * hd;
        float *o = a->out + row * w + (int64_t)h * hd;
        for (int i = 0; i < half; i++) {
            const int i0 = a->neox ? i : 2 * i, i1 = a->neox ? i + half : 2 * i + 1;
            const float x0 = x[i0], x1 = x[i1];
            o[i0] = x0 * c[i] - x1 * s[i];
            o[i1] = x0 * s[i] + x1 * c[i];
        }
        for (int d = a->rope_dim; d < hd; d++) o[d] = x[d];
    }
}

void specserve_rope(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    const rope_args *a = (const rope_args *)userdata;
    for (int row = ith; row < a->n_rows; row += nth) rope_row(a, row);
}
