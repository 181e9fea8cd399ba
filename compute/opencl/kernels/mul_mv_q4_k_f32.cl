// out = x @ W^T for W stored as GGUF Q4_K (ggml block_q4_K): super-blocks of 256 weights
// in 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min:
// w = (d * sc[s]) * q - dmin * m[s], q a 4-bit code. Sub-block s lives in bytes
// qs[32 * (s / 2) .. +32], low nibbles for even s, high nibbles for odd s.
#include "block_q4_k.clh"

#define KERNEL_NAME mul_mv_q4_k_f32
#include "mul_mv.clh"
