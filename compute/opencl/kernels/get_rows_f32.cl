// out[i] = row ids[i] of a float32 table (GGUF F32, the types dequantised on load, and
// gather_rows of activations).
#include "block_f32.clh"

#define KERNEL_NAME get_rows_f32
#include "get_rows.clh"
