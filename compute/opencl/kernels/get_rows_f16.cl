// out[i] = row ids[i] of a table stored as IEEE half (GGUF F16), dequantised to float32.
#include "block_f16.clh"

#define KERNEL_NAME get_rows_f16
#include "get_rows.clh"
