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

#include "kquants.h"

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
    float scale;         // of q.k: 1 / sqrt(head_dim), or the model's
    int32_t window;      // > 0: a row sees only its last `window` positions (a sliding-window layer)
} attention_args;

// The first cell a row attends to: 0, or the oldest cell of its window.
static inline int first_cell(const attention_args *a, int n_cells) {
    return a->window > 0 && n_cells > a->window ? n_cells - a->window : 0;
}

// one cell of K or V as float32 (dst: head_dim floats); _Float16 converts with vcvtph2ps in the
// clones whose ISA has F16C, and exactly (IEEE half to float) in every clone
static inline void load_cell(const attention_args *a, const void *base, int64_t cell, int kvh, float *dst) {
    const int64_t off = cell * a->kv_row + (int64_t)kvh * a->head_dim;
    if (a->kv_f16) {
        const _Float16 *src = (const _Float16 *)base + off;
        for (int d = 0; d < a->head_dim; d++) dst[d] = (float)src[d];
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
    const int first = first_cell(a, n_cells);
    for (int c = first, cell = first % a->n_ctx_slot; c < n_cells; c++, cell = cell + 1 == a->n_ctx_slot ? 0 : cell + 1) {
        load_cell(a, a->k, base + cell, kvh, kc);  // cell = c % n_ctx_slot: a local layer's ring wraps
        load_cell(a, a->v, base + cell, kvh, vc);
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

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512_TARGET __attribute__((target("avx512f,f16c,fma")))

// exp(x) for 16 lanes, x <= 0 (scores minus their running maximum): x = n ln2 + r, |r| <= ln2 / 2, then
// 2^n (vscalefps) times a degree-6 polynomial of r (Taylor: relative error under 2e-7 on that range).
// Lanes below -87 give exp(-87) (~1.6e-38) rather than 0, which no float sum holding an exp(0) can see.
AVX512_TARGET static inline __m512 exp_le0(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2 in two parts: n * hi is exact
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// The 16 sums of 16 vectors as one vector (lane c: the sum of v[c]'s lanes), by a fixed tree: halves of
// v[c] and v[c + 8] folded together, then quarters, ...; the last permute puts each sum in its lane.
AVX512_TARGET static inline __m512 sums_of_16(const __m512 *v) {
    __m512 w[8], x[4], y[2];
    for (int c = 0; c < 8; c++)  // 256-bit halves: v[c]'s folded in the low one, v[c + 8]'s in the high
        w[c] = _mm512_add_ps(_mm512_shuffle_f32x4(v[c], v[c + 8], 0x44), _mm512_shuffle_f32x4(v[c], v[c + 8], 0xEE));
    for (int c = 0; c < 4; c++)  // 128-bit quarters: v[c], v[c + 8], v[c + 4], v[c + 12]
        x[c] = _mm512_add_ps(_mm512_shuffle_f32x4(w[c], w[c + 4], 0x88), _mm512_shuffle_f32x4(w[c], w[c + 4], 0xDD));
    for (int c = 0; c < 2; c++)
        y[c] = _mm512_add_ps(_mm512_unpacklo_ps(x[c], x[c + 2]), _mm512_unpackhi_ps(x[c], x[c + 2]));
    const __m512d y0 = _mm512_castps_pd(y[0]), y1 = _mm512_castps_pd(y[1]);
    const __m512 z = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(y0, y1)), _mm512_castpd_ps(_mm512_unpackhi_pd(y0, y1)));
    // z holds, quarter by quarter, the sums of v[0 2 1 3], v[8 10 9 11], v[4 6 5 7], v[12 14 13 15]
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 13, 14, 12, 7, 5, 6, 4, 11, 9, 10, 8, 3, 1, 2, 0), z);
}

#define CHUNK 16  // cells scored together: one tree of sums, one vector exp
#define HEADS 8   // query heads whose V sums stay in registers while a chunk's V rows stream past

// acc[h] (one 16-float slice of each head's V sum) = acc[h] * rescale[h] + the chunk's weights times V
AVX512_TARGET static inline __attribute__((always_inline)) void v_slice(
        __m512 (*acc)[MAX_HEAD_DIM / 16], const float (*wts)[CHUNK], const float *rescale,
        const __m512 (*vb)[MAX_HEAD_DIM / 16], int i, int nc, int h0, const int hn) {
    __m512 a[HEADS];
    for (int j = 0; j < hn; j++) a[j] = _mm512_mul_ps(acc[h0 + j][i], _mm512_set1_ps(rescale[h0 + j]));
    for (int c = 0; c < nc; c++) {
        const __m512 v = vb[c][i];
        for (int j = 0; j < hn; j++) a[j] = _mm512_fmadd_ps(_mm512_set1_ps(wts[h0 + j][c]), v, a[j]);
    }
    for (int j = 0; j < hn; j++) acc[h0 + j][i] = a[j];
}

// The same task on AVX-512 (head_dim a multiple of 16), 16 cells at a time: the chunk's K and V rows
// converted once to float32; for every query head of the group, the 16 cells' scores as one vector,
// softmax online per chunk (a rescale when the chunk raises the maximum, one vector exp for the 16
// weights); then V accumulated slice by slice, up to 8 heads' sums held in registers. The order of every
// sum is fixed by the row alone.
AVX512_TARGET static void attention_task_avx512(const attention_args *a, int row, int kvh) {
    const int g = a->n_head / a->n_head_kv, hd = a->head_dim, nv = hd / 16;
    const int64_t base = (int64_t)a->slots[row] * a->n_ctx_slot;
    const int n_cells = a->pos[row] + 1;
    const float *q = a->q + row * a->q_row + (int64_t)kvh * g * hd;
    __m512 kb[CHUNK][MAX_HEAD_DIM / 16], vb[CHUNK][MAX_HEAD_DIM / 16], acc[MAX_GROUP][MAX_HEAD_DIM / 16];
    __m512 vsum[MAX_GROUP], part[CHUNK];
    float m[MAX_GROUP], rescale[MAX_GROUP], wts[MAX_GROUP][CHUNK];
    for (int h = 0; h < g; h++) {
        m[h] = -INFINITY;
        vsum[h] = _mm512_setzero_ps();
        for (int i = 0; i < nv; i++) acc[h][i] = _mm512_setzero_ps();
    }
    for (int c0 = first_cell(a, n_cells); c0 < n_cells; c0 += CHUNK) {
        const int nc = n_cells - c0 < CHUNK ? n_cells - c0 : CHUNK;
        const __mmask16 valid = (__mmask16)((1u << nc) - 1);
        for (int c = 0; c < nc; c++) {
            const int64_t off = (base + (c0 + c) % a->n_ctx_slot) * a->kv_row + (int64_t)kvh * hd;  // a ring wraps
            for (int i = 0; i < nv; i++) {
                if (a->kv_f16) {
                    kb[c][i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a->k + off + 16 * i)));
                    vb[c][i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a->v + off + 16 * i)));
                } else {
                    kb[c][i] = _mm512_loadu_ps((const float *)a->k + off + 16 * i);
                    vb[c][i] = _mm512_loadu_ps((const float *)a->v + off + 16 * i);
                }
            }
        }
        for (int h = 0; h < g; h++) {
            const float *qh = q + (int64_t)h * hd;
            for (int c = 0; c < CHUNK; c++) {
                __m512 d = _mm512_setzero_ps();
                if (c < nc)
                    for (int i = 0; i < nv; i++) d = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * i), kb[c][i], d);
                part[c] = d;
            }
            const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid,
                                                _mm512_mul_ps(sums_of_16(part), _mm512_set1_ps(a->scale)));
            const float top = _mm512_reduce_max_ps(s);
            rescale[h] = 1.0f;
            if (top > m[h]) {  // the chunk raises the maximum: what was summed so far is rescaled
                rescale[h] = expf(m[h] - top);
                vsum[h] = _mm512_mul_ps(vsum[h], _mm512_set1_ps(rescale[h]));
                m[h] = top;
            }
            const __m512 p = _mm512_maskz_mov_ps(valid, exp_le0(_mm512_sub_ps(s, _mm512_set1_ps(m[h]))));
            vsum[h] = _mm512_add_ps(vsum[h], p);
            _mm512_storeu_ps(wts[h], p);
        }
        for (int i = 0; i < nv; i++)
            for (int h0 = 0; h0 < g; h0 += HEADS) {
                switch (g - h0 < HEADS ? g - h0 : HEADS) {
                case 1: v_slice(acc, wts, rescale, vb, i, nc, h0, 1); break;
                case 2: v_slice(acc, wts, rescale, vb, i, nc, h0, 2); break;
                case 3: v_slice(acc, wts, rescale, vb, i, nc, h0, 3); break;
                case 4: v_slice(acc, wts, rescale, vb, i, nc, h0, 4); break;
                case 5: v_slice(acc, wts, rescale, vb, i, nc, h0, 5); break;
                case 6: v_slice(acc, wts, rescale, vb, i, nc, h0, 6); break;
                case 7: v_slice(acc, wts, rescale, vb, i, nc, h0, 7); break;
                default: v_slice(acc, wts, rescale, vb, i, nc, h0, 8); break;
                }
            }
    }
    float *out = a->out + row * a->q_row + (int64_t)kvh * g * hd;
    for (int h = 0; h < g; h++) {
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum[h]));
        for (int i = 0; i < nv; i++) _mm512_storeu_ps(out + (int64_t)h * hd + 16 * i, _mm512_mul_ps(acc[h][i], inv));
    }
}
#endif

// What this CPU offers the hand-written paths, read once: CPU_AVX512 (attention), CPU_VNNI (K-quant mat-mul)
enum { CPU_AVX512 = 1, CPU_VNNI = 2 };

static int cpu_features(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c") &&
                           __builtin_cpu_supports("fma");
        const int vnni = avx512 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
        cached = (avx512 ? CPU_AVX512 : 0) | (vnni ? CPU_VNNI : 0);
    }
    return cached;
#else
    return 0;
#endif
}

static int have_avx512(void) { return (cpu_features() & CPU_AVX512) != 0; }

// ggml_custom_op_t: (dst, ith, nth, userdata); tasks (row, KV head) are dealt round-robin to threads
void specserve_attention(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    const attention_args *a = (const attention_args *)userdata;
    const int n_tasks = a->n_rows * a->n_head_kv;
#if defined(__x86_64__) && defined(__GNUC__)
    if (a->head_dim % 16 == 0 && have_avx512()) {
        for (int t = ith; t < n_tasks; t += nth) attention_task_avx512(a, t / a->n_head_kv, t % a->n_head_kv);
        return;
    }
#endif
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

// ---- mat-mul of K-quant weights by 8-bit activations, every weight block unpacked once for all rows ----
//
// out (n_rows, N) = x (n_rows, K) @ W^T for W the file's (N, K) Q4_K or Q6_K matrix. The activations are
// first quantised to ggml's q8_K blocks (quantize_q8_k: one scale per 256 values, int8 values and the sums
// of each 16) by one op; the mat-mul op then takes each weight block once, unpacks its 4- or 6-bit codes
// and scales once, and multiplies it with the same block of every activation row. A (weight row, activation
// row) pair always runs the same instructions in the same order, whatever the number of rows: the result of
// a row never depends on the others (batch invariance), and a verify batch of 9 rows costs far less than 9
// decodes, because unpacking, not multiplying, is what a one-row mat-vec spends its time on.
//
// The integer sums are exact; float enters once per 256-value block (scale products, one FMA) and in the
// final sum of the 16 lanes, in a fixed order.

typedef struct {
    const float *x;
    void *out;  // (n_rows, K / 256) block_q8_k
    int64_t k;
    int32_t n_rows;
} quantize_args;

static void quantize_row_q8_k(const float *x, block_q8_k *y, int64_t k) {
    for (int64_t b = 0; b < k / QK_K; b++, x += QK_K) {
        float amax = 0.0f, max = 0.0f;  // the value of largest magnitude, with its sign
        for (int j = 0; j < QK_K; j++) {
            const float a = fabsf(x[j]);
            if (a > amax) { amax = a; max = x[j]; }
        }
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof(block_q8_k));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = (int)lrintf(iscale * x[j]);
            y[b].qs[j] = (int8_t)(v > 127 ? 127 : v);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += y[b].qs[j * 16 + i];
            y[b].bsums[j] = (int16_t)s;
        }
        for (int j = 0; j < QK_K / 32; j++) y[b].bsums32[j] = (int16_t)(y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
        y[b].d = 1.0f / iscale;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same blocks on AVX-512, bit for bit: the same first value of largest magnitude, the same product
// rounded to nearest even (vcvtps2dq as lrintf), the same sums.
AVX512_TARGET static void quantize_row_q8_k_avx512(const float *x, block_q8_k *y, int64_t k) {
    for (int64_t b = 0; b < k / QK_K; b++, x += QK_K) {
        __m512 amaxv = _mm512_setzero_ps();
        for (int i = 0; i < QK_K / 16; i++) amaxv = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + 16 * i)), amaxv);
        const float amax = _mm512_reduce_max_ps(amaxv);
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof(block_q8_k));
            continue;
        }
        float max = 0.0f;
        for (int i = 0; i < QK_K / 16; i++) {
            const __mmask16 at = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + 16 * i)), _mm512_set1_ps(amax), _CMP_EQ_OQ);
            if (at) {
                max = x[16 * i + __builtin_ctz(at)];
                break;
            }
        }
        const float iscale = -127.0f / max;
        const __m512 iv = _mm512_set1_ps(iscale);
        for (int i = 0; i < QK_K / 16; i++) {
            const __m512i v = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(iv, _mm512_loadu_ps(x + 16 * i))),
                                               _mm512_set1_epi32(127));
            _mm_storeu_si128((__m128i *)(y[b].qs + 16 * i), _mm512_cvtepi32_epi8(v));
            y[b].bsums[i] = (int16_t)_mm512_reduce_add_epi32(v);
        }
        for (int j = 0; j < QK_K / 32; j++) y[b].bsums32[j] = (int16_t)(y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
        y[b].d = 1.0f / iscale;
    }
}
#endif

void specserve_quantize_q8_k(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    const quantize_args *a = (const quantize_args *)userdata;
    const int64_t nb = a->k / QK_K;
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_avx512()) {
        for (int r = ith; r < a->n_rows; r += nth)
            quantize_row_q8_k_avx512(a->x + r * a->k, (block_q8_k *)a->out + r * nb, a->k);
        return;
    }
#endif
    for (int r = ith; r < a->n_rows; r += nth)
        quantize_row_q8_k(a->x + r * a->k, (block_q8_k *)a->out + r * nb, a->k);
}

// The plain C quantisation on one thread, for the tests (the AVX-512 one must give the same bytes).
void specserve_quantize_q8_k_plain(const quantize_args *a) {
    const int64_t nb = a->k / QK_K;
    for (int r = 0; r < a->n_rows; r++) quantize_row_q8_k(a->x + r * a->k, (block_q8_k *)a->out + r * nb, a->k);
}

#define MAX_ROWS 64  // activation rows per call (the planner's n_batch may be larger: taken in groups)

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

// byte shuffles: lanes of a 64-value chunk j take sub-block scales 2j (lanes 0-7) and 2j+1 (8-15);
// a min pairs with the two sums of 16 of its 32 values
static const uint8_t Q4_SCALE_LANES[4][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1}, {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5}, {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7}};
static const uint8_t Q4_MIN_PAIRS[16] = {8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15};
// Q6_K: lanes of chunk j take the scales of its four sub-blocks of 16 values, four lanes each
static const uint8_t Q6_SCALE_LANES[4][16] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3}, {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};

VNNI_TARGET static inline float hsum16(__m512 v) {  // fixed order: halves, then quarters, ...
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}

// A 32-bit lane's scale as two 16-bit lanes. Each 64-value chunk is multiplied as pairs (maddubs: unsigned
// codes times signed activations, two products summed into 16 bits, which cannot saturate: 2 * 63 * 127 < 2^15)
// and the pairs then by their scale and summed into 32-bit lanes (dpwssd): the same exact integer in each lane
// as four products summed (dpbusd) times the lane's scale, in two instructions instead of four.
VNNI_TARGET static inline __m512i scales_16(__m512i s32) {
    return _mm512_mask_blend_epi16(0xAAAAAAAA, s32, _mm512_slli_epi32(s32, 16));
}

// one weight row of Q4_K against rows c0..c1 of the activations
VNNI_TARGET static void row_q4_k_vnni(const block_q4_k *w, const block_q8_k *xq, int64_t nb, int c0, int c1,
                                       float *out, int64_t out_stride) {
    __m512 acc[MAX_ROWS];
    for (int c = c0; c < c1; c++) acc[c - c0] = _mm512_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0xF);
    for (int64_t b = 0; b < nb; b++) {
        const block_q4_k *wb = &w[b];
        // the 8 six-bit scales and 8 mins as 16 bytes (scales 0-7, mins 8-15), with 32-bit masks
        uint32_t u[4];
        memcpy(u, wb->scales, 12);
        u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
        const uint32_t m03 = u[1] & 0x3f3f3f3f;
        u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
        u[2] = m03;
        u[0] &= 0x3f3f3f3f;
        const __m128i sm = _mm_loadu_si128((const __m128i *)u);
        __m512i wq[4], scv[4];
        for (int j = 0; j < 4; j++) {  // 64 values 64j..64j+63: low nibbles, then high
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wb->qs + 32 * j));
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            wq[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            scv[j] = scales_16(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(sm, _mm_loadu_si128((const __m128i *)Q4_SCALE_LANES[j]))));
        }
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, _mm_loadu_si128((const __m128i *)Q4_MIN_PAIRS)));
        const float d = _cvtsh_ss(wb->d), dmin = _cvtsh_ss(wb->dmin);
        for (int c = c0; c < c1; c++) {
            const block_q8_k *xb = &xq[c * nb + b];
            __m512i isum = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++)
                isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(wq[j], _mm512_loadu_si512((const void *)(xb->qs + 64 * j))),
                                           scv[j]);
            const __m256i msum = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), mins);
            acc[c - c0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * xb->d), acc[c - c0]);
            acc[c - c0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_castsi256_si512(msum)),
                                          _mm512_set1_ps(-dmin * xb->d), acc[c - c0]);
        }
    }
    for (int c = c0; c < c1; c++) out[(c - c0) * out_stride] = hsum16(acc[c - c0]);
}

// one weight row of Q6_K against rows c0..c1 of the activations
VNNI_TARGET static void row_q6_k_vnni(const block_q6_k *w, const block_q8_k *xq, int64_t nb, int c0, int c1,
                                       float *out, int64_t out_stride) {
    __m512 acc[MAX_ROWS];
    for (int c = c0; c < c1; c++) acc[c - c0] = _mm512_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0xF), low2 = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < nb; b++) {
        const block_q6_k *wb = &w[b];
        __m256i g[8];  // the 6-bit codes (0..63) of values 32i..32i+31
        for (int n = 0; n < 2; n++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * n));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * n + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)(wb->qh + 32 * n));
            g[4 * n + 0] = _mm256_or_si256(_mm256_and_si256(l0, low4),
                                           _mm256_slli_epi16(_mm256_and_si256(h, low2), 4));
            g[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(l1, low4),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), low2), 4));
            g[4 * n + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), low2), 4));
            g[4 * n + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), low2), 4));
        }
        const __m128i scb = _mm_loadu_si128((const __m128i *)wb->scales);
        __m512i wq[4], scv[4];
        for (int j = 0; j < 4; j++) {
            wq[j] = _mm512_inserti64x4(_mm512_castsi256_si512(g[2 * j]), g[2 * j + 1], 1);
            scv[j] = scales_16(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(scb, _mm_loadu_si128((const __m128i *)Q6_SCALE_LANES[j]))));
        }
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb->scales));
        const float d = _cvtsh_ss(wb->d);
        for (int c = c0; c < c1; c++) {
            const block_q8_k *xb = &xq[c * nb + b];
            __m512i isum = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++)
                isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(wq[j], _mm512_loadu_si512((const void *)(xb->qs + 64 * j))),
                                           scv[j]);
            // the codes are offset by 32: subtract 32 * scale * (sum of each 16 activations)
            const __m256i off = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), sc16);
            isum = _mm512_sub_epi32(isum, _mm512_castsi256_si512(_mm256_slli_epi32(off, 5)));
            acc[c - c0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * xb->d), acc[c - c0]);
        }
    }
    for (int c = c0; c < c1; c++) out[(c - c0) * out_stride] = hsum16(acc[c - c0]);
}
#endif

// The same sums in plain C, for CPUs without AVX-512 VNNI: exact integer sums per block, then the
// same float steps (results may differ from the vector path in the last bits, never between batches).
static void row_k_generic(const mul_mat_args *a, int64_t r, int c0, int c1) {
    const int64_t nb = a->k / QK_K;
    for (int c = c0; c < c1; c++) {
        const block_q8_k *xq = (const block_q8_k *)a->xq + c * nb;
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t isum = 0, isub = 0;
            float dw, dsub;
            if (a->type == GGML_Q4_K) {
                const block_q4_k *wb = (const block_q4_k *)a->w + r * nb + b;
                for (int j = 0; j < 8; j++) {
                    uint8_t sc, mn;
                    q4_k_scale_min(j, wb->scales, &sc, &mn);
                    int32_t s = 0;
                    for (int i = 0; i < 32; i++) {
                        const int idx = 32 * j + i;
                        const uint8_t byte = wb->qs[32 * (j / 2) + i];
                        s += ((j & 1) ? (byte >> 4) : (byte & 0xF)) * xq[b].qs[idx];
                    }
                    isum += s * sc;
                    isub += mn * (xq[b].bsums[2 * j] + xq[b].bsums[2 * j + 1]);
                }
                dw = half_to_float(wb->d);
                dsub = half_to_float(wb->dmin);
            } else {
                const block_q6_k *wb = (const block_q6_k *)a->w + r * nb + b;
                for (int idx = 0; idx < QK_K; idx++) {
                    const int n = idx / 128, l = idx % 32, grp = (idx % 128) / 32;
                    const uint8_t ql = wb->ql[64 * n + l + (grp & 1) * 32], qh = wb->qh[32 * n + l];
                    const int q = ((grp < 2 ? ql & 0xF : ql >> 4) | (((qh >> (2 * grp)) & 3) << 4));
                    isum += q * xq[b].qs[idx] * wb->scales[idx / 16];
                }
                for (int j = 0; j < 16; j++) isum -= 32 * wb->scales[j] * xq[b].bsums[j];
                dw = half_to_float(wb->d);
                dsub = 0.0f;
            }
            acc += (float)isum * (dw * xq[b].d) - (float)isub * (dsub * xq[b].d);
        }
        a->out[c * a->n + r] = acc;
    }
}

static int have_vnni(void) { return (cpu_features() & CPU_VNNI) != 0; }

// ggml_custom_op_t: weight rows are split into nth equal ranges; each row against every activation row
void specserve_mul_mat_k(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    const mul_mat_args *a = (const mul_mat_args *)userdata;
    if (a->tiled) {
        mul_mat_tiles(a, ith, nth);
        return;
    }
    const int64_t nb = a->k / QK_K, per = (a->n + nth - 1) / nth;
    const int64_t r0 = ith * per, r1 = r0 + per < a->n ? r0 + per : a->n;
    const int vnni = have_vnni();
    for (int64_t r = r0; r < r1; r++) {
        for (int c0 = 0; c0 < a->n_rows; c0 += MAX_ROWS) {
            const int c1 = c0 + MAX_ROWS < a->n_rows ? c0 + MAX_ROWS : a->n_rows;
#if defined(__x86_64__) && defined(__GNUC__)
            if (vnni) {
                const block_q8_k *xq = (const block_q8_k *)a->xq;
                if (a->type == GGML_Q4_K)
                    row_q4_k_vnni((const block_q4_k *)a->w + r * nb, xq, nb, c0, c1, a->out + c0 * a->n + r, a->n);
                else
                    row_q6_k_vnni((const block_q6_k *)a->w + r * nb, xq, nb, c0, c1, a->out + c0 * a->n + r, a->n);
                continue;
            }
#endif
            row_k_generic(a, r, c0, c1);
        }
    }
}

int specserve_q8_k_block_bytes(void) { return (int)sizeof(block_q8_k); }
int specserve_mul_mat_k_vnni(void) { return have_vnni(); }
