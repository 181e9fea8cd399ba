// out = x @ W^T for W stored as IEEE half (GGUF F16); K need not be a multiple of 16.
#include "block_f16.clh"

#define KERNEL_NAME mul_mv_f16_f32
#include "mul_mv.clh"
