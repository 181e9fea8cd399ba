// out = x @ W^T for W stored as float32 (GGUF F32, and the types the backend dequantises on
// load: Q5_0, Q5_1, Q2_K, Q3_K, BF16); K need not be a multiple of 16.
#include "block_f32.clh"

#define KERNEL_NAME mul_mv_f32_f32
#include "mul_mv.clh"
