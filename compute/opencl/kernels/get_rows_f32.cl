// out[i] = row ids[i] of a float32 table (GGUF F32, the types dequantised on load, and
// gather_rows of activations).
#include "common.clh"

#define WTYPE float
#define QK 16
#define ROW_STRIDE(K) (K)
#define BLOCK_PTR(row, b) ((row) + 16 * (b))
#define DEQUANT16(p, g) LOAD_F32x16(p)
#define HAS_TAIL
#define TAIL_WEIGHT(row, k) ((row)[k])
#define KERNEL_NAME get_rows_f32
#include "get_rows.clh"
