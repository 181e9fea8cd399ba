// out[i] = row ids[i] of a table stored as GGUF Q4_0, dequantised to float32.
// Block layout: block_q4_0.clh.
#include "block_q4_0.clh"

#define KERNEL_NAME get_rows_q4_0
#include "get_rows.clh"
