// How fast can a Q4_K mat-vec with float32 activations go on this CPU?
//
//     bench/q4k_float_ceiling.sh            (builds with gcc -O3 -march=native -fopenmp, runs)
//
// Hand-written AVX-512 C, no OpenCL: out (N) = W (N x K, Q4_K) @ x (K, float32), N rows split
// into one contiguous range per thread. Three inner loops, each the best this file's author
// could write for its idea:
//   arith   the codes widened to 32 bits, converted to float, scaled with an fma, then an fma
//           with x: what specserve's OpenCL kernel does (mul_mv.clh)
//   lut     the codes widened, then one vpermps through a 16-entry table of the sub-block's
//           dequantised values (what NIBBLE_LUT does for Q4_0/Q4_1)
//   repack  the weights repacked at load so that no shuffle is needed: dword j of each 64 bytes
//           holds element 16p + j at nibble p, scales pre-decoded to float (192 bytes per
//           256 weights instead of 144): shift, mask, convert, two fmas per 16 weights
// Each is timed warm (one copy of the weights, cache-resident for the small shape) and cold
// (copies totalling >= 256 MiB cycled, as a decode step streams its weights). GB/s counts the
// Q4_K bytes (144 per 256 weights) so the three compare with llama.cpp's figure for the same
// model. llama.cpp itself uses 8-bit activations and integer dot products instead.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } bq4k;  // GGUF block_q4_K
typedef struct { float dsc[8], dm[8]; uint32_t q[32]; } rq4k;                    // repacked

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static inline void scales(const bq4k* b, float* dsc, float* dm) {  // ggml's get_scale_min_k4, times d / dmin
    const uint8_t* q = b->scales;
    float d = _cvtsh_ss(b->d), dmin = _cvtsh_ss(b->dmin);
    for (int j = 0; j < 8; j++) {
        int sc, m;
        if (j < 4) { sc = q[j] & 63; m = q[j + 4] & 63; }
        else { sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
        dsc[j] = d * sc; dm[j] = dmin * m;
    }
}

// The row loop the three variants share: the rows split into one contiguous range per thread,
// two accumulators per row, the blocks in order; the variadic argument is the work on one block
// (`blk`, its 256 x values at `xb`, accumulating into a0 and a1). A macro, not a function
// pointer, so each variant's inner loop is compiled in place as if written out.
#define MATVEC(name, BLOCK_T, ...)                                                                  \
    static void name(const void* Wv, const float* x, float* out, int N, int K) {                   \
        const BLOCK_T* W = Wv; int nb = K / 256;                                                    \
        const __m512i m15 = _mm512_set1_epi32(15);                                                  \
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);   \
        (void)m15; (void)iota;                                                                      \
        _Pragma("omp parallel for schedule(static)")                                                \
        for (int o = 0; o < N; o++) {                                                               \
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                              \
            for (int b = 0; b < nb; b++) {                                                          \
                const BLOCK_T* blk = W + (size_t)o * nb + b; const float* xb = x + b * 256;         \
                __VA_ARGS__                                                                         \
            }                                                                                       \
            out[o] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                                   \
        }                                                                                           \
    }

MATVEC(mv_arith, bq4k,
    float dsc[8], dm[8]; scales(blk, dsc, dm);
    for (int c = 0; c < 4; c++) for (int h = 0; h < 2; h++) {  // 32-byte chunk c, 16-byte half h
        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk->qs + 32 * c + 16 * h)));
        __m512 lo = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, m15)), _mm512_set1_ps(dsc[2 * c]), _mm512_set1_ps(dm[2 * c]));
        __m512 hi = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), _mm512_set1_ps(dsc[2 * c + 1]), _mm512_set1_ps(dm[2 * c + 1]));
        a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + 64 * c + 16 * h), a0);
        a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 64 * c + 32 + 16 * h), a1);
    })

MATVEC(mv_lut, bq4k,
    float dsc[8], dm[8]; scales(blk, dsc, dm);
    for (int c = 0; c < 4; c++) {
        __m512 l0 = _mm512_fmsub_ps(iota, _mm512_set1_ps(dsc[2 * c]), _mm512_set1_ps(dm[2 * c]));
        __m512 l1 = _mm512_fmsub_ps(iota, _mm512_set1_ps(dsc[2 * c + 1]), _mm512_set1_ps(dm[2 * c + 1]));
        for (int h = 0; h < 2; h++) {
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk->qs + 32 * c + 16 * h)));
            a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, l0), _mm512_loadu_ps(xb + 64 * c + 16 * h), a0);
            a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), l1), _mm512_loadu_ps(xb + 64 * c + 32 + 16 * h), a1);
        }
    })

// Element 16p + j of a 128-weight half h sits at nibble p of dword j.
#define STEP(p, acc) { __m512 w = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 4 * p), m15)), \
                        _mm512_set1_ps(blk->dsc[4 * h + p / 2]), _mm512_set1_ps(blk->dm[4 * h + p / 2])); \
                       acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + 128 * h + 16 * p), acc); }
MATVEC(mv_repack, rq4k,
    for (int h = 0; h < 2; h++) {
        __m512i v = _mm512_loadu_si512(blk->q + 16 * h);
        STEP(0, a0) STEP(1, a1) STEP(2, a0) STEP(3, a1) STEP(4, a0) STEP(5, a1) STEP(6, a0) STEP(7, a1)
    })

typedef void (*mv_fn)(const void*, const float*, float*, int, int);

static double timed(mv_fn f, void** W, int copies, const float* x, float* out, int N, int K, int reps) {
    double ts[256];
    f(W[0], x, out, N, K);
    for (int r = 0; r < reps; r++) { double t = now(); f(W[r % copies], x, out, N, K); ts[r] = now() - t; }
    for (int i = 0; i < reps; i++) for (int j = i + 1; j < reps; j++) if (ts[j] < ts[i]) { double t = ts[i]; ts[i] = ts[j]; ts[j] = t; }
    return ts[reps / 2];
}

int main(int argc, char** argv) {
    int N = argc > 1 ? atoi(argv[1]) : 5632, K = argc > 2 ? atoi(argv[2]) : 2048, reps = 40;
    size_t nbk = (size_t)N * K / 256;
    int copies = (int)((256.0 * (1 << 20)) / (nbk * 144.0)) + 1;
    if (copies > 64) copies = 64;
    void* Wq[64]; void* Wr[64];
    srand(1);
    for (int c = 0; c < copies; c++) {
        bq4k* q = aligned_alloc(64, nbk * sizeof(bq4k)); rq4k* r = aligned_alloc(64, nbk * sizeof(rq4k));
        for (size_t i = 0; i < nbk * sizeof(bq4k); i++) ((uint8_t*)q)[i] = (uint8_t)rand();
        for (size_t i = 0; i < nbk; i++) {
            q[i].d = 0x1400; q[i].dmin = 0x1400;  // 2^-10: finite halves
            scales(&q[i], r[i].dsc, r[i].dm);
            uint8_t code[256];
            for (int c2 = 0; c2 < 4; c2++) for (int j = 0; j < 32; j++) {
                code[64 * c2 + j] = q[i].qs[32 * c2 + j] & 15; code[64 * c2 + 32 + j] = q[i].qs[32 * c2 + j] >> 4;
            }
            for (int h = 0; h < 2; h++) for (int j = 0; j < 16; j++) {
                uint32_t w = 0;
                for (int p = 0; p < 8; p++) w |= (uint32_t)code[128 * h + 16 * p + j] << (4 * p);
                r[i].q[16 * h + j] = w;
            }
        }
        Wq[c] = q; Wr[c] = r;
    }
    float* x = aligned_alloc(64, (size_t)K * 4); float* out = aligned_alloc(64, (size_t)N * 4); float* ref = aligned_alloc(64, (size_t)N * 4);
    for (int i = 0; i < K; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    mv_arith(Wq[0], x, ref, N, K);
    const char* names[3] = {"arith", "lut", "repack"};
    mv_fn fns[3] = {mv_arith, mv_lut, mv_repack};
    void** ws[3] = {Wq, Wq, Wr};
    printf("Q4_K %d x %d, %.2f MiB, %d threads; cold: %d copies cycled; median of %d\n",
           N, K, nbk * 144.0 / (1 << 20), omp_get_max_threads(), copies, reps);
    printf("%-7s %10s %9s %10s %9s %12s\n", "loop", "warm us", "GB/s", "cold us", "GB/s", "max |diff|");
    for (int v = 0; v < 3; v++) {
        double w = timed(fns[v], ws[v], 1, x, out, N, K, reps);
        double c = timed(fns[v], ws[v], copies, x, out, N, K, reps);
        fns[v](ws[v][0], x, out, N, K);
        float md = 0; for (int o = 0; o < N; o++) { float d = out[o] - ref[o]; if (d < 0) d = -d; if (d > md) md = d; }
        printf("%-7s %10.1f %9.1f %10.1f %9.1f %12.2e\n", names[v], w * 1e6, nbk * 144.0 / w / 1e9, c * 1e6, nbk * 144.0 / c / 1e9, md);
    }
    return 0;
}
