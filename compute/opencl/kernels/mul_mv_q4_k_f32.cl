// out = x @ W^T for W stored as GGUF Q4_K (ggml block_q4_K): super-blocks of 256 weights
// in 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min:
// w = (d * sc[s]) * q - dmin * m[s], q a 4-bit code. Sub-block s lives in bytes
// qs[32 * (s / 2) .. +32], low nibbles for even s, high nibbles for odd s.
#include "common.clh"

#define QK_K 256
typedef struct {
    ushort d;                // super-block scale of the scales, IEEE half
    ushort dmin;             // super-block scale of the mins, IEEE half
    uchar scales[12];        // 8 scales and 8 mins, 6 bits each (get_scale_min_k4)
    uchar qs[QK_K / 2];      // nibbles
} block_q4_K;                // 144 bytes

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
inline float16 dequant_q4_k(const __global block_q4_K* b, int g) {
    const int s = g / 2;                  // sub-block of 32
    float sc, m;
    scale_min_k4(s, b->scales, &sc, &m);
    const float2 d = LOAD_HALF2(&b->d);  // (d, dmin)
    const float dsc = d.x * sc;
    const float dm = d.y * m;
    uchar16 q = LOAD_U8x16(b->qs + 32 * (s / 2) + 16 * (g % 2));
    uchar16 v = (s % 2) == 0 ? (q & (uchar16)0xF) : (q >> (uchar16)4);
    return convert_float16(v) * dsc - dm;
}

#define WTYPE block_q4_K
#define QK QK_K
#define ROW_STRIDE(K) ((K) / QK_K)
#define BLOCK_PTR(row, b) ((row) + (b))
#define DEQUANT16(blk, g) dequant_q4_k(blk, g)
#define KERNEL_NAME mul_mv_q4_k_f32
#include "mul_mv.clh"
