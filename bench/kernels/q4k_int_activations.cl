// Candidate Q4_K mat-vecs with integer activations, for bench/int_activation_probe.py only
// (nothing in the server builds this file). They answer one question: does an OpenCL C
// compiler for a CPU turn integer multiply-adds into the byte dot products (vpdpbusd,
// vpmaddubsw) that make llama.cpp's quantised kernels fast? Each computes, for one row of
// Q4_K weights, sum_k w[k] * xq[k] * dx[k / 256] with xq the activations rounded to integers
// per 256-element block (scale dx) and bsum the per-32 sums of xq (for the mins):
//   sum = sum_b  d_b * dx_b * sum_j sc_bj * (q4 . xq)_bj  -  dmin_b * dx_b * sum_j m_bj * bsum_bj
// All are exact in integer arithmetic up to the final float expression.
#include "block_q4_k.clh"

// The 8 6-bit scales and mins of a super-block at once (ggml's get_scale_min_k4, vectorised).
inline void scales_mins8(const __global uchar* q, int8* sc, int8* m) {
    uchar4 a = vload4(0, q), b = vload4(0, q + 4), c = vload4(0, q + 8);
    *sc = convert_int8((uchar8)(a & (uchar4)63, (c & (uchar4)0xF) | ((a >> (uchar4)6) << (uchar4)4)));
    *m = convert_int8((uchar8)(b & (uchar4)63, (c >> (uchar4)4) | ((b >> (uchar4)6) << (uchar4)4)));
}

inline float finish_block(const __global block_q4_K* blk, int isum, int8 m, __global const int* bsum, float dx) {
    int8 mb = m * vload8(0, bsum);
    int4 m4 = mb.lo + mb.hi;
    int2 m2 = m4.lo + m4.hi;
    const float2 d = LOAD_HALF2(&blk->d);
    return d.x * dx * (float)isum - d.y * dx * (float)(m2.x + m2.y);
}

// The codes of sub-block j, 16 at a time (h = 0, 1), read as the float kernel reads them.
inline uchar16 nibbles(const __global block_q4_K* blk, int j, int h) {
    uchar16 q = LOAD_U8x16(blk->qs + 32 * (j / 2) + 16 * h);
    return (j % 2) == 0 ? (q & (uchar16)0xF) : (q >> (uchar16)4);
}

#define ROW_BEGIN                                                              \
    const int o = get_global_id(1);                                            \
    if (o >= N) return;                                                        \
    const int nb = K / 256;                                                    \
    __global const block_q4_K* row = w + (size_t)o * nb;                       \
    float sum = 0.f;                                                           \
    for (int b = 0; b < nb; b++) {                                             \
        __global const block_q4_K* blk = row + b;                              \
        int8 sc, m;                                                            \
        scales_mins8(blk->scales, &sc, &m);

#define ROW_END(isum)                                                          \
        sum += finish_block(blk, (isum), m, xs + 8 * b, xd[b]);                \
    }                                                                          \
    out[o] = sum;

// int8 activations, products paired as (even, odd) 16-bit sums: the shape of vpmaddubsw.
__kernel __attribute__((reqd_work_group_size(1, 16, 1))) __attribute__((vec_type_hint(int8)))
void q4k_i8_pairs(__global const char* xq, __global const float* xd, __global const int* xs, int K,
                  __global const block_q4_K* w, __global float* out, int N)
{
    ROW_BEGIN
        int4 acc = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            short8 ps = 0;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                uchar16 v = nibbles(blk, j, h);
                char16 xv = vload16(0, xq + 256 * b + 32 * j + 16 * h);
                ps += convert_short8(v.even) * convert_short8(xv.even) + convert_short8(v.odd) * convert_short8(xv.odd);
            }
            acc += convert_int4(ps.even) * sc[j] + convert_int4(ps.odd) * sc[j];
        }
    ROW_END(acc.x + acc.y + acc.z + acc.w)
}

// The same with the saturating narrowing that is vpmaddubsw's definition.
__kernel __attribute__((reqd_work_group_size(1, 16, 1))) __attribute__((vec_type_hint(int8)))
void q4k_i8_sat(__global const char* xq, __global const float* xd, __global const int* xs, int K,
                __global const block_q4_K* w, __global float* out, int N)
{
    ROW_BEGIN
        int4 acc = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            short8 ps = 0;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                uchar16 v = nibbles(blk, j, h);
                char16 xv = vload16(0, xq + 256 * b + 32 * j + 16 * h);
                ps += convert_short8_sat(convert_int8(v.even) * convert_int8(xv.even) + convert_int8(v.odd) * convert_int8(xv.odd));
            }
            acc += convert_int4(ps.even) * sc[j] + convert_int4(ps.odd) * sc[j];
        }
    ROW_END(acc.x + acc.y + acc.z + acc.w)
}

// int16 activations (widened once per row), (even, odd) pairs: the shape of vpmaddwd / vpdpwssd.
__kernel __attribute__((reqd_work_group_size(1, 16, 1))) __attribute__((vec_type_hint(int8)))
void q4k_i16_pairs(__global const short* xq, __global const float* xd, __global const int* xs, int K,
                   __global const block_q4_K* w, __global float* out, int N)
{
    ROW_BEGIN
        int8 acc = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int8 ps = 0;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                short16 vs = convert_short16(nibbles(blk, j, h));
                short16 xv = vload16(0, xq + 256 * b + 32 * j + 16 * h);
                ps += convert_int8(vs.even) * convert_int8(xv.even) + convert_int8(vs.odd) * convert_int8(xv.odd);
            }
            acc += ps * sc[j];
        }
        int4 a4 = acc.lo + acc.hi;
        int2 a2 = a4.lo + a4.hi;
    ROW_END(a2.x + a2.y)
}

// int16 activations, 16-bit products summed per sub-block, widened once per sub-block.
__kernel __attribute__((reqd_work_group_size(1, 16, 1))) __attribute__((vec_type_hint(int8)))
void q4k_i16_mul(__global const short* xq, __global const float* xd, __global const int* xs, int K,
                 __global const block_q4_K* w, __global float* out, int N)
{
    ROW_BEGIN
        int8 acc = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            short16 ps = 0;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                short16 vs = convert_short16(nibbles(blk, j, h));
                ps += vs * vload16(0, xq + 256 * b + 32 * j + 16 * h);
            }
            int16 pw = convert_int16(ps);
            acc += (pw.lo + pw.hi) * sc[j];
        }
        int4 a4 = acc.lo + acc.hi;
        int2 a2 = a4.lo + a4.hi;
    ROW_END(a2.x + a2.y)
}

// Work-item-per-lane form (a sub-group of 16 across one row, as GPU kernels are written), with
// cl_khr_integer_dot_product's dot(uchar4, char4): the compiler vectorises across the lanes.
// Only its instructions are counted (it computes a plain int dot of codes and bytes).
__kernel __attribute__((reqd_work_group_size(16, 1, 1)))
void simt_dot4(__global const uint* w, __global const uint* x, __global int* out, int n)
{
    const int l = get_local_id(0);
    __global const uint* wr = w + (size_t)get_group_id(0) * n * 16;
    int acc = 0;
    for (int i = 0; i < n; i++) acc += dot(as_uchar4(wr[16 * i + l] & 0x0F0F0F0Fu), as_char4(x[16 * i + l]));
    out[get_global_id(0)] = acc;
}
