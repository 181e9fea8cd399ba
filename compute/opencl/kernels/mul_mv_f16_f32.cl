// out = x @ W^T for W stored as IEEE half (GGUF F16); K need not be a multiple of 16.
#include "common.clh"

#define WTYPE ushort
#define QK 16
#define ROW_STRIDE(K) (K)
#define BLOCK_PTR(row, b) ((row) + 16 * (b))
#define DEQUANT16(p, g) LOAD_F16x16(p)
#define HAS_TAIL
#define TAIL_WEIGHT(row, k) LOAD_HALF((row) + (k))
#define KERNEL_NAME mul_mv_f16_f32
#include "mul_mv.clh"
