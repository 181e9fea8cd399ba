// out[i] = row ids[i] of a table stored as GGUF Q5_K, dequantised to float32.
// Block layout: see mul_mv_q5_k_f32.cl (the struct and its dequantiser are the same).
#include "common.clh"

#define QK_K 256
typedef struct {
    ushort d;                // super-block scale of the scales, IEEE half
    ushort dmin;             // super-block scale of the mins, IEEE half
    uchar scales[12];        // 8 scales and 8 mins, 6 bits each (get_scale_min_k4)
    uchar qh[QK_K / 8];      // fifth bits: bit s of qh[l] belongs to element l of sub-block s
    uchar qs[QK_K / 2];      // low nibbles
} block_q5_K;                // 176 bytes

// ggml's get_scale_min_k4: 6-bit scale and min of sub-block j.
inline void scale_min_k4(int j, const __global uchar* q, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// Elements 16g .. 16g+15 (g = 0..15) of a super-block.
inline float16 dequant_q5_k(const __global block_q5_K* b, int g) {
    const int s = g / 2;                  // sub-block of 32
    const int h = g % 2;                  // which 16 of its 32
    float sc, m;
    scale_min_k4(s, b->scales, &sc, &m);
    const float2 d = LOAD_HALF2(&b->d);  // (d, dmin)
    const float dsc = d.x * sc;
    const float dm = d.y * m;
    uchar16 q = LOAD_U8x16(b->qs + 32 * (s / 2) + 16 * h);
    uchar16 hb = LOAD_U8x16(b->qh + 16 * h);
    uchar16 v = (s % 2) == 0 ? (q & (uchar16)0xF) : (q >> (uchar16)4);
    v |= ((hb >> (uchar16)s) & (uchar16)1) << (uchar16)4;
    return convert_float16(v) * dsc - dm;
}

#define WTYPE block_q5_K
#define QK QK_K
#define ROW_STRIDE(K) ((K) / QK_K)
#define BLOCK_PTR(row, b) ((row) + (b))
#define DEQUANT16(blk, g) dequant_q5_k(blk, g)
#define KERNEL_NAME get_rows_q5_k
#include "get_rows.clh"
