// out = x @ W^T for W stored as float32 (GGUF F32, and the types the backend dequantises on
// load: Q5_0, Q5_1, Q2_K, Q3_K, BF16); K need not be a multiple of 16.
#include "common.clh"

#define WTYPE float
#define QK 16
#define ROW_STRIDE(K) (K)
#define BLOCK_PTR(row, b) ((row) + 16 * (b))
#define DEQUANT16(p, g) LOAD_F32x16(p)
#define HAS_TAIL
#define TAIL_WEIGHT(row, k) ((row)[k])
#define KERNEL_NAME mul_mv_f32_f32
#include "mul_mv.clh"
