// out[i] = row ids[i] of a table stored as GGUF Q4_K, dequantised to float32.
// Block layout: block_q4_k.clh.
#include "block_q4_k.clh"

#define KERNEL_NAME get_rows_q4_k
#include "get_rows.clh"
