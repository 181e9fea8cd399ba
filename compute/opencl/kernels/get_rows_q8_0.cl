// out[i] = row ids[i] of a table stored as GGUF Q8_0, dequantised to float32.
// Block layout: block_q8_0.clh.
#include "block_q8_0.clh"

#define KERNEL_NAME get_rows_q8_0
#include "get_rows.clh"
