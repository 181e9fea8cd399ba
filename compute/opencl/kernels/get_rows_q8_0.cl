// out[i] = row ids[i] of a table stored as GGUF Q8_0, dequantised to float32.
// Block layout: see mul_mv_q8_0_f32.cl (the struct and its dequantiser are the same).
#include "common.clh"

#define QK8_0 32
typedef struct {
    ushort d;          // scale, IEEE half
    char qs[QK8_0];    // signed codes
} block_q8_0;          // 34 bytes

// Elements 16g .. 16g+15 (g = 0, 1) of a block.
inline float16 dequant_q8_0(const __global block_q8_0* b, int g) {
    char16 q = as_char16(LOAD_U8x16((const __global uchar*)b->qs + 16 * g));
    return convert_float16(q) * LOAD_HALF(&b->d);
}

#define WTYPE block_q8_0
#define QK QK8_0
#define ROW_STRIDE(K) ((K) / QK8_0)
#define BLOCK_PTR(row, b) ((row) + (b))
#define DEQUANT16(blk, g) dequant_q8_0(blk, g)
#define KERNEL_NAME get_rows_q8_0
#include "get_rows.clh"
