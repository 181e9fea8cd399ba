// out[i] = row ids[i] of a table stored as GGUF Q6_K, dequantised to float32.
// Block layout: block_q6_k.clh.
#include "block_q6_k.clh"

#define KERNEL_NAME get_rows_q6_k
#include "get_rows.clh"
