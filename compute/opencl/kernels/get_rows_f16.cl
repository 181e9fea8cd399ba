// out[i] = row ids[i] of a table stored as IEEE half (GGUF F16), dequantised to float32.
#include "common.clh"

#define WTYPE ushort
#define QK 16
#define ROW_STRIDE(K) (K)
#define BLOCK_PTR(row, b) ((row) + 16 * (b))
#define DEQUANT16(p, g) LOAD_F16x16(p)
#define HAS_TAIL
#define TAIL_WEIGHT(row, k) LOAD_HALF((row) + (k))
#define KERNEL_NAME get_rows_f16
#include "get_rows.clh"
