// K-quant weights repacked at load into tiles of 16 rows, and the mat-mul over them.
//
// A tile holds one 256-value block of 16 consecutive weight rows, in the same number of bytes as the
// 16 blocks the file stores (so the planner's sizes do not change), arranged so that one 512-bit
// register holds 4 consecutive values of each of the 16 rows: one VNNI instruction (vpdpbusd) then
// multiplies them with 4 activation values broadcast to every lane, and each lane accumulates the dot
// product of its own weight row. No horizontal sums, the sub-block scales applied once per 32 (Q4_K)
// or 16 (Q6_K) values for 16 rows at a time, the 4-bit codes unpacked once per tile for every
// activation row of the pass.
//
// Batch invariance: an (activation row, weight row) pair always runs the same instructions in the
// same order, whatever the number of activation rows (rows are only grouped to share the unpacked
// weights). The integer sums are exact; float enters once per block: out += isum * (d * dx), then
// (Q4_K) out -= imin * (dmin * dx), each a single fused multiply-add. The plain C version below does
// the very same float operations in the same order, so both give the same bits.

#include <stdint.h>
#include <string.h>

#include "kquants.h"

#define TILE 16  // weight rows per tile
#define ROWS 8   // activation rows that share one unpacking of a tile's codes (3 x 8 registers of sums)

typedef struct {
    uint16_t d[TILE], dmin[TILE];
    uint32_t u[3][TILE];           // each row's 12 packed scale/min bytes, as three 32-bit words
    uint8_t qs[8][4][4 * TILE];    // [sub-block of 32][group of 8 values][row * 4 + b]: values b | (b + 4) << 4
} tile_q4_k;

typedef struct {
    uint16_t d[TILE];
    int8_t sc[4][4 * TILE];        // [q][row * 4 + SC_POS[j]]: the scale of sub-block 4q + j (of 16 values)
    uint8_t ql[8][4][4 * TILE];    // low 4 bits, as tile_q4_k.qs
    uint8_t qh[8][2][4 * TILE];    // high 2 bits of groups 2h, 2h+1: value b + 4e at bits QH_SHIFT[e]
} tile_q6_k;

_Static_assert(sizeof(tile_q4_k) == TILE * sizeof(block_q4_k), "a Q4_K tile is 16 blocks' bytes");
_Static_assert(sizeof(tile_q6_k) == TILE * sizeof(block_q6_k), "a Q6_K tile is 16 blocks' bytes");

// sub-block j of 4 sits in byte SC_POS[j] of its lane: pairs (0, 1) and (2, 3) are then the even and
// odd bytes, which one shift each turns into 16-bit pairs for the offset sum
static const int SC_POS[4] = {0, 2, 1, 3};
// where value b + 4e of a Q6_K tile's qh byte sits: each sits where one shift (or none) of the byte puts it
// at bits 4-5, next to its low 4 bits, for a bitwise select (vpternlogd) to join them
static const int QH_SHIFT[4] = {4, 6, 0, 2};

static inline int q4_code(const block_q4_k *b, int j) {
    const uint8_t byte = b->qs[32 * (j / 64) + j % 32];
    return (j % 64) < 32 ? byte & 0xF : byte >> 4;
}

static inline int q6_code(const block_q6_k *b, int j) {
    const int n = j / 128, l = j % 32, grp = (j % 128) / 32;
    const uint8_t ql = b->ql[64 * n + l + (grp & 1) * 32], qh = b->qh[32 * n + l];
    return (grp < 2 ? ql & 0xF : ql >> 4) | (((qh >> (2 * grp)) & 3) << 4);
}

// Row i's 256 low 4-bit codes into a tile's nibble array ([sub-block of 32][group of 8][row * 4 + b]):
// each byte holds values b and b + 4 of its group, in its low and high nibble.
static void pack_low_nibbles(uint8_t dst[8][4][4 * TILE], int i, const uint8_t low[QK_K]) {
    for (int s = 0; s < 8; s++)
        for (int g = 0; g < 4; g++)
            for (int bb = 0; bb < 4; bb++) {
                const int j = 32 * s + 8 * g + bb;
                dst[s][g][4 * i + bb] = (uint8_t)(low[j] | low[j + 4] << 4);
            }
}

static void repack_q4_k(const block_q4_k *src, tile_q4_k *dst, int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        tile_q4_k *t = &dst[b];
        for (int i = 0; i < TILE; i++) {
            const block_q4_k *w = &src[i * nb + b];
            t->d[i] = w->d;
            t->dmin[i] = w->dmin;
            for (int k = 0; k < 3; k++) memcpy(&t->u[k][i], w->scales + 4 * k, 4);
            uint8_t low[QK_K];
            for (int j = 0; j < QK_K; j++) low[j] = (uint8_t)q4_code(w, j);
            pack_low_nibbles(t->qs, i, low);
        }
    }
}

static void repack_q6_k(const block_q6_k *src, tile_q6_k *dst, int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        tile_q6_k *t = &dst[b];
        for (int i = 0; i < TILE; i++) {
            const block_q6_k *w = &src[i * nb + b];
            t->d[i] = w->d;
            for (int u = 0; u < 16; u++) t->sc[u / 4][4 * i + SC_POS[u % 4]] = w->scales[u];
            uint8_t low[QK_K];
            for (int j = 0; j < QK_K; j++) low[j] = (uint8_t)(q6_code(w, j) & 0xF);
            pack_low_nibbles(t->ql, i, low);
            for (int s = 0; s < 8; s++) {
                for (int h = 0; h < 2; h++)
                    for (int bb = 0; bb < 4; bb++) {
                        const int j = 32 * s + 16 * h + bb;
                        uint8_t v = 0;
                        for (int e = 0; e < 4; e++) v |= (uint8_t)(((q6_code(w, j + 4 * e) >> 4) & 3) << QH_SHIFT[e]);
                        t->qh[s][h][4 * i + bb] = v;
                    }
            }
        }
    }
}

// Repack a (n, k) Q4_K or Q6_K matrix (n a multiple of 16) from the file's rows into tiles:
// tile r of block b at dst[(r * nb + b)]. Returns 0, or -1 for a shape or type it does not take.
int specserve_repack_k(int type, const void *src, void *dst, int64_t n, int64_t k) {
    if (n % TILE || k % QK_K || (type != GGML_Q4_K && type != GGML_Q6_K)) return -1;
    const int64_t nb = k / QK_K;
    for (int64_t r = 0; r < n / TILE; r++) {
        if (type == GGML_Q4_K)
            repack_q4_k((const block_q4_k *)src + r * TILE * nb, (tile_q4_k *)dst + r * nb, nb);
        else
            repack_q6_k((const block_q6_k *)src + r * TILE * nb, (tile_q6_k *)dst + r * nb, nb);
    }
    return 0;
}

// Row `row` of a tiled matrix as float32 (the embedding lookup of a tiled table): ggml's dequantisation
// formula (d * scale, then * code - dmin * min).
void specserve_tiled_row_f32(int type, const void *w, int64_t k, int64_t row, float *out) {
    const int64_t nb = k / QK_K, i = row % TILE;
    for (int64_t b = 0; b < nb; b++, out += QK_K) {
        if (type == GGML_Q4_K) {
            const tile_q4_k *t = (const tile_q4_k *)w + (row / TILE) * nb + b;
            uint8_t scales[12];
            for (int q = 0; q < 3; q++) memcpy(scales + 4 * q, &t->u[q][i], 4);
            const float d = half_to_float(t->d[i]), dmin = half_to_float(t->dmin[i]);
            for (int s = 0; s < 8; s++) {
                uint8_t sc, m;
                q4_k_scale_min(s, scales, &sc, &m);
                const float d1 = d * sc, m1 = dmin * m;
                for (int j = 0; j < 32; j++) {
                    const uint8_t byte = t->qs[s][j / 8][4 * i + j % 4];
                    out[32 * s + j] = d1 * ((j % 8) < 4 ? byte & 0xF : byte >> 4) - m1;
                }
            }
        } else {
            const tile_q6_k *t = (const tile_q6_k *)w + (row / TILE) * nb + b;
            const float d = half_to_float(t->d[i]);
            for (int j = 0; j < QK_K; j++) {
                const int s = j / 32, g = (j % 32) / 8, e = j % 8, bb = e % 4;
                const uint8_t lo = t->ql[s][g][4 * i + bb], hi = t->qh[s][g / 2][4 * i + bb];
                const int code = (e < 4 ? lo & 0xF : lo >> 4) | (((hi >> QH_SHIFT[2 * (g % 2) + e / 4]) & 3) << 4);
                const int u = j / 16;
                out[j] = d * (float)t->sc[u / 4][4 * i + SC_POS[u % 4]] * (float)(code - 32);
            }
        }
    }
}

// ---- the plain C kernel (CPUs without AVX-512 VNNI; and the reference the tests hold the vector one to) ----

static void tile_q4_k_plain(const tile_q4_k *tw, int64_t nb, const block_q8_k *x, float *out) {
    for (int i = 0; i < TILE; i++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const tile_q4_k *t = &tw[b];
            const block_q8_k *xb = &x[b];
            uint8_t scales[12];
            for (int q = 0; q < 3; q++) memcpy(scales + 4 * q, &t->u[q][i], 4);
            int32_t isum = 0, imin = 0;
            for (int s = 0; s < 8; s++) {
                uint8_t sc, m;
                q4_k_scale_min(s, scales, &sc, &m);
                int32_t dot = 0;
                for (int j = 0; j < 32; j++) {
                    const uint8_t byte = t->qs[s][j / 8][4 * i + j % 4];
                    dot += ((j % 8) < 4 ? byte & 0xF : byte >> 4) * xb->qs[32 * s + j];
                }
                isum += dot * sc;
                imin += m * xb->bsums32[s];
            }
            const float dx = xb->d;
            acc = __builtin_fmaf((float)isum, half_to_float(t->d[i]) * dx, acc);
            acc = __builtin_fmaf(-(float)imin, half_to_float(t->dmin[i]) * dx, acc);
        }
        out[i] = acc;
    }
}

static void tile_q6_k_plain(const tile_q6_k *tw, int64_t nb, const block_q8_k *x, float *out) {
    for (int i = 0; i < TILE; i++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const tile_q6_k *t = &tw[b];
            const block_q8_k *xb = &x[b];
            int32_t isum = 0, ioff = 0;
            for (int u = 0; u < 16; u++) {
                const int sc = t->sc[u / 4][4 * i + SC_POS[u % 4]];
                int32_t dot = 0;
                for (int jj = 0; jj < 16; jj++) {
                    const int j = 16 * u + jj, s = j / 32, g = (j % 32) / 8, e = j % 8, bb = e % 4;
                    const uint8_t lo = t->ql[s][g][4 * i + bb], hi = t->qh[s][g / 2][4 * i + bb];
                    const int code = (e < 4 ? lo & 0xF : lo >> 4) | (((hi >> QH_SHIFT[2 * (g % 2) + e / 4]) & 3) << 4);
                    dot += code * xb->qs[j];
                }
                isum += dot * sc;
                ioff += sc * xb->bsums[u];
            }
            isum -= ioff * 32;
            acc = __builtin_fmaf((float)isum, half_to_float(t->d[i]) * xb->d, acc);
        }
        out[i] = acc;
    }
}

// ---- AVX-512 VNNI ----------------------------------------------------------------------------------

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#define INLINE __attribute__((always_inline)) inline

static inline int32_t load32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// nr (1..ROWS, a constant at each call site) activation rows against one tile column of nb blocks
VNNI_TARGET static INLINE void tile_q4_k_vnni(const tile_q4_k *tw, int64_t nb, const block_q8_k *x, int64_t xstride,
                                              float *out, int64_t ostride, const int nr) {
    __m512 facc[ROWS];
    for (int r = 0; r < nr; r++) facc[r] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F), m6 = _mm512_set1_epi8(0x3F), m2 = _mm512_set1_epi8(0x03);
    const __m512i byte0 = _mm512_set1_epi32(0xFF);
    // 16-bit pairs of a lane's bytes (0, 1) and (2, 3), zero-extended, within each 128-bit lane
    const __m512i pair01 = _mm512_set4_epi32(0x800D800C, 0x80098008, 0x80058004, 0x80018000);
    const __m512i pair23 = _mm512_set4_epi32(0x800F800E, 0x800B800A, 0x80078006, 0x80038002);
    for (int64_t b = 0; b < nb; b++) {
        const tile_q4_k *t = &tw[b];
        const __m512i u0 = _mm512_loadu_si512(t->u[0]), u1 = _mm512_loadu_si512(t->u[1]), u2 = _mm512_loadu_si512(t->u[2]);
        const __m512i sc03 = _mm512_and_si512(u0, m6), mn03 = _mm512_and_si512(u1, m6);
        const __m512i sc47 = _mm512_or_si512(_mm512_and_si512(u2, m4),
                                             _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u0, 6), m2), 4));
        const __m512i mn47 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u2, 4), m4),
                                             _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u1, 6), m2), 4));
        __m512i isum[ROWS];
        for (int r = 0; r < nr; r++) isum[r] = _mm512_setzero_si512();
        for (int s = 0; s < 8; s++) {
            const __m512i sc = _mm512_and_si512(_mm512_srli_epi32(s < 4 ? sc03 : sc47, 8 * (s % 4)), byte0);
            __m512i dot[ROWS];
            for (int r = 0; r < nr; r++) dot[r] = _mm512_setzero_si512();
            for (int g = 0; g < 4; g++) {
                const __m512i v = _mm512_loadu_si512(t->qs[s][g]);
                const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                for (int r = 0; r < nr; r++) {
                    const int8_t *xs = x[r * xstride + b].qs + 32 * s + 8 * g;
                    dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(load32(xs)));
                    dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(load32(xs + 4)));
                }
            }
            for (int r = 0; r < nr; r++) isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(dot[r], sc));
        }
        const __m512i mp[4] = {_mm512_shuffle_epi8(mn03, pair01), _mm512_shuffle_epi8(mn03, pair23),
                               _mm512_shuffle_epi8(mn47, pair01), _mm512_shuffle_epi8(mn47, pair23)};
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)t->d));
        const __m512 dmw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)t->dmin));
        for (int r = 0; r < nr; r++) {
            const block_q8_k *xb = &x[r * xstride + b];
            __m512i imin = _mm512_setzero_si512();
            for (int p = 0; p < 4; p++) imin = _mm512_dpwssd_epi32(imin, mp[p], _mm512_set1_epi32(load32(&xb->bsums32[2 * p])));
            const __m512 dx = _mm512_set1_ps(xb->d);
            facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(dw, dx), facc[r]);
            facc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(imin), _mm512_mul_ps(dmw, dx), facc[r]);
        }
    }
    for (int r = 0; r < nr; r++) _mm512_storeu_ps(out + r * ostride, facc[r]);
}

VNNI_TARGET static INLINE void tile_q6_k_vnni(const tile_q6_k *tw, int64_t nb, const block_q8_k *x, int64_t xstride,
                                              float *out, int64_t ostride, const int nr) {
    __m512 facc[ROWS];
    for (int r = 0; r < nr; r++) facc[r] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F), m6 = _mm512_set1_epi8(0x3F);
    for (int64_t b = 0; b < nb; b++) {
        const tile_q6_k *t = &tw[b];
        __m512i sc4[4];
        for (int q = 0; q < 4; q++) sc4[q] = _mm512_loadu_si512(t->sc[q]);
        __m512i isum[ROWS];
        for (int r = 0; r < nr; r++) isum[r] = _mm512_setzero_si512();
        for (int s = 0; s < 8; s++) {
            for (int h = 0; h < 2; h++) {  // one sub-block of 16 values: groups 2h, 2h + 1
                const __m512i qh = _mm512_loadu_si512(t->qh[s][h]);
                __m512i dot[ROWS];
                for (int r = 0; r < nr; r++) dot[r] = _mm512_setzero_si512();
                for (int gg = 0; gg < 2; gg++) {
                    const int g = 2 * h + gg;
                    // the high bits of the low-nibble values to bits 4-5 (QH_SHIFT), then of the high-nibble ones;
                    // select (0xE4: bits of m4 from the first operand, the rest from the second), cut to 6 bits
                    const __m512i hlo = gg ? _mm512_slli_epi16(qh, 4) : qh;
                    const __m512i hhi = gg ? _mm512_slli_epi16(qh, 2) : _mm512_srli_epi16(qh, 2);
                    const __m512i v = _mm512_loadu_si512(t->ql[s][g]);
                    const __m512i lo = _mm512_and_si512(_mm512_ternarylogic_epi32(v, hlo, m4, 0xE4), m6);
                    const __m512i hi = _mm512_and_si512(_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), hhi, m4, 0xE4), m6);
                    for (int r = 0; r < nr; r++) {
                        const int8_t *xs = x[r * xstride + b].qs + 32 * s + 8 * g;
                        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(load32(xs)));
                        dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(load32(xs + 4)));
                    }
                }
                const int u = 2 * s + h, pos = SC_POS[u % 4];
                const __m512i sc = _mm512_srai_epi32(_mm512_slli_epi32(sc4[u / 4], 24 - 8 * pos), 24);
                for (int r = 0; r < nr; r++) isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(dot[r], sc));
            }
        }
        __m512i sp[8];  // 16-bit pairs of scales (4q, 4q + 1) and (4q + 2, 4q + 3)
        for (int q = 0; q < 4; q++) {
            sp[2 * q] = _mm512_srai_epi16(_mm512_slli_epi16(sc4[q], 8), 8);
            sp[2 * q + 1] = _mm512_srai_epi16(sc4[q], 8);
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)t->d));
        for (int r = 0; r < nr; r++) {
            const block_q8_k *xb = &x[r * xstride + b];
            __m512i ioff = _mm512_setzero_si512();
            for (int p = 0; p < 8; p++) ioff = _mm512_dpwssd_epi32(ioff, sp[p], _mm512_set1_epi32(load32(&xb->bsums[2 * p])));
            const __m512i is = _mm512_sub_epi32(isum[r], _mm512_slli_epi32(ioff, 5));
            facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(dw, _mm512_set1_ps(xb->d)), facc[r]);
        }
    }
    for (int r = 0; r < nr; r++) _mm512_storeu_ps(out + r * ostride, facc[r]);
}

#define ROWS_CASES(call) \
    switch (nr) {        \
    case 1: call(1); break; \
    case 2: call(2); break; \
    case 3: call(3); break; \
    case 4: call(4); break; \
    case 5: call(5); break; \
    case 6: call(6); break; \
    case 7: call(7); break; \
    default: call(8); break; \
    }

VNNI_TARGET static void tile_vnni(const mul_mat_args *a, int64_t tile, int c0, int nr) {
    const int64_t nb = a->k / QK_K;
    const block_q8_k *x = (const block_q8_k *)a->xq + c0 * nb;
    float *out = a->out + c0 * a->n + tile * TILE;
    if (a->type == GGML_Q4_K) {
        const tile_q4_k *tw = (const tile_q4_k *)a->w + tile * nb;
#define Q4(rows) tile_q4_k_vnni(tw, nb, x, nb, out, a->n, rows)
        ROWS_CASES(Q4)
    } else {
        const tile_q6_k *tw = (const tile_q6_k *)a->w + tile * nb;
#define Q6(rows) tile_q6_k_vnni(tw, nb, x, nb, out, a->n, rows)
        ROWS_CASES(Q6)
    }
}
#endif

static int vnni(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") &&
                 __builtin_cpu_supports("fma");
    }
    return cached;
#else
    return 0;
#endif
}

static void tile_plain(const mul_mat_args *a, int64_t tile, int c) {
    const int64_t nb = a->k / QK_K;
    const block_q8_k *x = (const block_q8_k *)a->xq + c * nb;
    float *out = a->out + c * a->n + tile * TILE;
    if (a->type == GGML_Q4_K)
        tile_q4_k_plain((const tile_q4_k *)a->w + tile * nb, nb, x, out);
    else
        tile_q6_k_plain((const tile_q6_k *)a->w + tile * nb, nb, x, out);
}

// The tiles are split into nth equal ranges; each tile against every activation row, ROWS at a time.
// force_plain: the plain C kernel even where VNNI is present (the tests compare the two).
static void mul_mat_tiles_impl(const mul_mat_args *a, int ith, int nth, int force_plain) {
    const int64_t tiles = a->n / TILE, per = (tiles + nth - 1) / nth;
    const int64_t t0 = ith * per, t1 = t0 + per < tiles ? t0 + per : tiles;
    const int fast = vnni() && !force_plain;
    for (int64_t t = t0; t < t1; t++) {
        for (int c = 0; c < a->n_rows; c += ROWS) {
            const int nr = a->n_rows - c < ROWS ? a->n_rows - c : ROWS;
#if defined(__x86_64__) && defined(__GNUC__)
            if (fast) {
                tile_vnni(a, t, c, nr);
                continue;
            }
#endif
            for (int r = 0; r < nr; r++) tile_plain(a, t, c + r);
        }
    }
}

void mul_mat_tiles(const mul_mat_args *a, int ith, int nth) { mul_mat_tiles_impl(a, ith, nth, 0); }

// The plain C kernel on one thread, for the tests.
void specserve_mul_mat_tiles_plain(const mul_mat_args *a) { mul_mat_tiles_impl(a, 0, 1, 1); }

// ---- the embedding lookup of a tiled table (ggml_custom_op_t) ----

typedef struct {
    const void *w;       // the tiled (n_vocab, k) table
    const int32_t *ids;  // (n_rows,) token ids
    float *out;          // (n_rows, k)
    int64_t k;
    int32_t n_rows, type;
} get_rows_args;

void specserve_get_rows_tiled(void *dst, int ith, int nth, void *userdata) {
    (void)dst;
    const get_rows_args *a = (const get_rows_args *)userdata;
    for (int r = ith; r < a->n_rows; r += nth) specserve_tiled_row_f32(a->type, a->w, a->k, a->ids[r], a->out + r * a->k);
}
