// out[i] = row ids[i] of a table stored as GGUF Q5_K, dequantised to float32.
// Block layout: block_q5_k.clh.
#include "block_q5_k.clh"

#define KERNEL_NAME get_rows_q5_k
#include "get_rows.clh"
