// out = x @ W^T for W stored as GGUF Q8_0 (ggml block_q8_0): blocks of 32 weights,
// w = d * q with q a signed byte.
#include "block_q8_0.clh"

#define KERNEL_NAME mul_mv_q8_0_f32
#include "mul_mv.clh"
