// out = x @ W^T for W stored as GGUF Q4_1 (ggml block_q4_1): blocks of 32 weights,
// w = d * q + m with q a 4-bit code: element j < 16 is the low nibble of qs[j],
// element j + 16 its high nibble.
#include "block_q4_1.clh"

#define KERNEL_NAME mul_mv_q4_1_f32
#include "mul_mv.clh"
