// out = x @ W^T for W stored as GGUF Q4_0 (ggml block_q4_0): blocks of 32 weights,
// w = d * (q - 8) with q a 4-bit code: element j < 16 is the low nibble of qs[j],
// element j + 16 its high nibble.
#include "common.clh"

#define QK4_0 32
typedef struct {
    ushort d;             // scale, IEEE half
    uchar qs[QK4_0 / 2];  // nibbles
} block_q4_0;             // 18 bytes

// Elements 16g .. 16g+15 (g = 0, 1) of a block.
inline float16 dequant_q4_0(const __global block_q4_0* b, int g) {
    uchar16 q = LOAD_U8x16(b->qs);
    uchar16 v = g == 0 ? (q & (uchar16)0xF) : (q >> (uchar16)4);
    return (convert_float16(v) - 8.0f) * LOAD_HALF(&b->d);
}

#define WTYPE block_q4_0
#define QK QK4_0
#define ROW_STRIDE(K) ((K) / QK4_0)
#define BLOCK_PTR(row, b) ((row) + (b))
#define DEQUANT16(blk, g) dequant_q4_0(blk, g)
#define KERNEL_NAME mul_mv_q4_0_f32
#include "mul_mv.clh"
