// out[i] = row ids[i] of a table stored as GGUF Q6_K, dequantised to float32.
// Block layout: see mul_mv_q6_k_f32.cl (the struct and its dequantiser are the same).
#include "common.clh"

#define QK_K 256
typedef struct {
    uchar ql[QK_K / 2];      // low 4 bits
    uchar qh[QK_K / 4];      // high 2 bits
    char scales[QK_K / 16];  // scale of each group of 16
    ushort d;                // super-block scale, IEEE half
} block_q6_K;                // 210 bytes

// Elements 16g .. 16g+15 (g = 0..15) of a super-block.
inline float16 dequant_q6_k(const __global block_q6_K* b, int g) {
    const int half_ = g / 8;              // which 128
    const int j = (g % 8) / 2;            // row of 32 within it
    const int part = g % 2;               // which 16 of the row
    uchar16 lo = LOAD_U8x16(b->ql + 64 * half_ + 32 * (j % 2) + 16 * part);
    uchar16 hi = LOAD_U8x16(b->qh + 32 * half_ + 16 * part);
    lo = (j / 2) == 0 ? (lo & (uchar16)0xF) : (lo >> (uchar16)4);
    hi = (hi >> (uchar16)(2 * j)) & (uchar16)3;
    char16 q = as_char16(lo | (hi << (uchar16)4)) - (char16)32;
    const float dsc = LOAD_HALF(&b->d) * (float)b->scales[g];
    return convert_float16(q) * dsc;
}

#define WTYPE block_q6_K
#define QK QK_K
#define ROW_STRIDE(K) ((K) / QK_K)
#define BLOCK_PTR(row, b) ((row) + (b))
#define DEQUANT16(blk, g) dequant_q6_k(blk, g)
#define KERNEL_NAME get_rows_q6_k
#include "get_rows.clh"
