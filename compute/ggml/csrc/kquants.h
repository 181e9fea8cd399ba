// The K-quant blocks as GGUF stores them, and the 8-bit activation blocks the mat-mul ops take.
// Shared by ops.c (rows in the file's layout) and tiles.c (rows repacked into tiles of 16).
#ifndef SPECSERVE_KQUANTS_H
#define SPECSERVE_KQUANTS_H

#include <stdint.h>

#define QK_K 256
#define GGML_Q4_K 12
#define GGML_Q6_K 14

// activations: one scale per 256 values, int8 values, their sums per 16 and per 32 values
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
    int16_t bsums32[QK_K / 32];
} block_q8_k;

typedef struct {
    uint16_t d, dmin;  // f16 super-block scales of the scales and of the mins
    uint8_t scales[12];  // 8 six-bit scales and 8 six-bit mins
    uint8_t qs[QK_K / 2];
} block_q4_k;

typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
} block_q6_k;

// out (n_rows, N) = x (n_rows, K) @ W^T for a K-quant W (N, K)
typedef struct {
    const void *w;   // the weight: (N, K / 256) blocks in the file's layout, or tiles of 16 rows (tiles.c)
    const void *xq;  // (n_rows, K / 256) block_q8_k
    float *out;      // (n_rows, N)
    int64_t n, k;
    int32_t n_rows, type;  // type: GGML_Q4_K or GGML_Q6_K
    int32_t tiled;         // w holds tiles (specserve_repack_k), not the file's rows
} mul_mat_args;

void mul_mat_tiles(const mul_mat_args *a, int ith, int nth);

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

// Q4_K's 6-bit scale and min of sub-block j (of 8) from the 12 packed bytes
static inline void q4_k_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

#endif
