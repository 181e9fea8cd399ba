// out = x @ W^T for W stored as GGUF Q5_K (ggml block_q5_K): like Q4_K with a fifth bit per
// weight: q = nibble | ((qh[l] >> s) & 1) << 4 for element l of sub-block s;
// w = (d * sc[s]) * q - dmin * m[s].
#include "block_q5_k.clh"

#define KERNEL_NAME mul_mv_q5_k_f32
#include "mul_mv.clh"
