// out = gelu(gate) * up, GELU's tanh approximation, element-wise over `total` floats (out may be gate
// or up): gelu(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), in the NumPy reference's order.
// Work-item t handles elements 16t .. 16t+15 (the last one also the scalar tail).
// Global: round_up(ceil(total / 16), EW_LWS).
#include "common.clh"

#define GELU_C 0.7978845608028654f  // sqrt(2 / pi)

__kernel __attribute__((reqd_work_group_size(EW_LWS, 1, 1))) __attribute__((vec_type_hint(float16)))
void geglu_f32(__global const float* gate, int g_off,
               __global const float* up, int u_off,
               __global float* out, int out_off,
               int total)
{
    const int t = get_global_id(0);
    const int k0 = 16 * t;
    gate += g_off; up += u_off; out += out_off;
    if (k0 + 16 <= total) {
        float16 g = LOAD_F32x16(gate + k0);
        float16 u = LOAD_F32x16(up + k0);
        float16 inner = GELU_C * (g + 0.044715f * g * g * g);
        STORE_F32x16(0.5f * g * (1.0f + tanh(inner)) * u, out + k0);
    } else {
        for (int k = k0; k < total; k++) {
            float g = gate[k];
            float inner = GELU_C * (g + 0.044715f * g * g * g);
            out[k] = 0.5f * g * (1.0f + tanh(inner)) * up[k];
        }
    }
}
