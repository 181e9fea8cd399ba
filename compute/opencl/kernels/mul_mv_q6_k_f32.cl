// out = x @ W^T for W stored as GGUF Q6_K (ggml block_q6_K): super-blocks of 256 weights,
// 16 groups of 16 with a signed 8-bit scale each: w = (d * scales[g]) * (q - 32), q a 6-bit
// code split into a low nibble (ql) and two high bits (qh). In each half of 128 elements,
// row j (0..3) of 32: nibble = ql[64 * half + 32 * (j % 2) + l] >> (4 * (j / 2)),
// high bits = (qh[32 * half + l] >> (2 * j)) & 3.
#include "block_q6_k.clh"

#define KERNEL_NAME mul_mv_q6_k_f32
#include "mul_mv.clh"
