// out = x @ W^T for W stored as GGUF Q4_0 (ggml block_q4_0): blocks of 32 weights,
// w = d * (q - 8) with q a 4-bit code: element j < 16 is the low nibble of qs[j],
// element j + 16 its high nibble.
#include "block_q4_0.clh"

#define KERNEL_NAME mul_mv_q4_0_f32
#include "mul_mv.clh"
