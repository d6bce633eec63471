// The "avx2" CPU backend of upq_hf (see upq_hf/avx2.py, which compiles this file once per machine):
//
//     y[M, N] = x[M, K] @ W^T (+ bias)
//
// read straight from UPQ's stored layout (upq_hf/packing.py): codes packed along K into int32 words,
// P = 32 / bits codes per word, lowest bits first, word (k / P, n); scales (and INT4 zero points) (G, N).
// Nothing is repacked. The weight is never formed: per group g and output n,
//
//     sum_k w[n, k] x[k] = s[g, n] * (sum_k c[n, k] x[k] - z[g, n] * sum_k x[k]),   z = 1.5 for SEQ INT2,
//
// so the inner loop is integer code -> float, times x, accumulated in fp32 over one group, eight outputs
// per AVX2 vector (the K-major layout puts eight outputs' words side by side). Activations are read as
// fp32, bf16 or fp16 and widened exactly; outputs are rounded once, to nearest even.
//
// Built with -DUPQ_BF16 (where the compiler knows AVX512-BF16) the file also holds a several-rows kernel for
// bf16 activations on AVX512-BF16 CPUs: codes become bf16 integers (exact: 0..15) through a 16-bit lookup,
// and VDPBF16PS multiplies them with the bf16 activations (exact) and sums pairs in fp32, twice the products
// per instruction of fp32 FMAs. upq_cpu_set_bf16() switches it on where the CPU reports the instructions.
#include <immintrin.h>
#include <float.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "upq_cpu.h"

enum { F32 = 0, BF16 = 1, F16 = 2 };

#define NV 4             // AVX2 vectors of outputs per block of the one-row kernel
#define NB (8 * NV)      // outputs per block of the one-row kernel
#define NB_ROWS 16       // outputs per block of the several-rows kernel
#define MR 6             // rows per pass of the several-rows kernel (6 x 16: 12 accumulators)
#define CHUNK_K 256      // input columns decoded at a time by the several-rows kernel (16 KiB of floats)

static inline float to_f32(const void *p, size_t i, int dtype)
{
    if (dtype == F32) return ((const float *)p)[i];
    if (dtype == BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f; memcpy(&f, &bits, 4); return f;
    }
    return _cvtsh_ss(((const uint16_t *)p)[i]);
}

static inline __m256 load8(const void *p, size_t i, int dtype)
{
    if (dtype == F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dtype == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static inline void store_out(void *y, size_t i, float v, int dtype)
{
    if (dtype == F32) { ((float *)y)[i] = v; return; }
    if (dtype == BF16) {
        uint32_t bits; memcpy(&bits, &v, 4);
        if ((bits & 0x7fffffffu) > 0x7f800000u) { ((uint16_t *)y)[i] = (uint16_t)((bits >> 16) | 0x40); return; }
        bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
        ((uint16_t *)y)[i] = (uint16_t)(bits >> 16);
        return;
    }
    ((uint16_t *)y)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
}

typedef struct {
    const float *x;      // M x Kp, fp32, zero padded
    const float *xsum;   // M x G: sum of x over each group
    int M, Kp, N, G, group, words_per_group, bits;
    const int32_t *codes;            // (Kp / P, N)
    const void *scale; int scale_dtype;  // (G, N)
    const void *zero;                // (G, N), INT4 only, scale's dtype
} problem;

static inline __m256 zero_points(const problem *p, size_t at, const int BITS)
{
    return BITS == 2 ? _mm256_set1_ps(1.5f) : load8(p->zero, at, p->scale_dtype);
}

// One row, outputs [n0, n0 + NB): out[NB] (fp32) = the block's products. The codes are turned into floats
// in registers (shift, mask, convert) and multiplied at once: nothing to share them with.
static inline __attribute__((always_inline)) void one_row(const problem *p, int n0, float *out, const int BITS)
{
    const int P = 32 / BITS;
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    __m256 total[NV];
    for (int v = 0; v < NV; ++v) total[v] = _mm256_setzero_ps();
    for (int g = 0; g < p->G; ++g) {
        __m256 acc[NV];
        for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
        for (int w = 0; w < p->words_per_group; ++w) {
            const size_t word = (size_t)g * p->words_per_group + w;
            const int32_t *row = p->codes + word * p->N + n0;
            __m256i c[NV];
            for (int v = 0; v < NV; ++v) c[v] = _mm256_loadu_si256((const __m256i *)(row + 8 * v));
            const float *xw = p->x + word * P;
            for (int j = 0; j < P; ++j) {
                const __m256 xb = _mm256_broadcast_ss(xw + j);
                for (int v = 0; v < NV; ++v) {
                    acc[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c[v], mask)), xb, acc[v]);
                    c[v] = _mm256_srli_epi32(c[v], BITS);
                }
            }
        }
        const __m256 xs = _mm256_set1_ps(p->xsum[g]);
        for (int v = 0; v < NV; ++v) {  // s * (sum_k c_k x_k - z * sum_k x_k)
            const size_t at = (size_t)g * p->N + n0 + 8 * v;
            total[v] = _mm256_fmadd_ps(load8(p->scale, at, p->scale_dtype),
                                       _mm256_fnmadd_ps(zero_points(p, at, BITS), xs, acc[v]), total[v]);
        }
    }
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + 8 * v, total[v]);
}

// rows [m0, m0 + R) x 16 outputs over kc decoded columns: acc[R][16] += x[:, k0:k0+kc] @ w[kc][16]
static inline __attribute__((always_inline)) void micro(const float *w, int kc, const float *x, size_t x_stride,
                                                        float *acc, const int R)
{
    __m256 a[MR][2];
    for (int m = 0; m < R; ++m) {
        a[m][0] = _mm256_loadu_ps(acc + 16 * m);
        a[m][1] = _mm256_loadu_ps(acc + 16 * m + 8);
    }
    for (int k = 0; k < kc; ++k) {
        const __m256 w0 = _mm256_loadu_ps(w + 16 * k), w1 = _mm256_loadu_ps(w + 16 * k + 8);
        for (int m = 0; m < R; ++m) {
            const __m256 b = _mm256_broadcast_ss(x + m * x_stride + k);
            a[m][0] = _mm256_fmadd_ps(w0, b, a[m][0]);
            a[m][1] = _mm256_fmadd_ps(w1, b, a[m][1]);
        }
    }
    for (int m = 0; m < R; ++m) {
        _mm256_storeu_ps(acc + 16 * m, a[m][0]);
        _mm256_storeu_ps(acc + 16 * m + 8, a[m][1]);
    }
}

static void micro_any(const float *w, int kc, const float *x, size_t x_stride, float *acc, int rows)
{
    switch (rows) {
    case 1: micro(w, kc, x, x_stride, acc, 1); break;
    case 2: micro(w, kc, x, x_stride, acc, 2); break;
    case 3: micro(w, kc, x, x_stride, acc, 3); break;
    case 4: micro(w, kc, x, x_stride, acc, 4); break;
    case 5: micro(w, kc, x, x_stride, acc, 5); break;
    default: micro(w, kc, x, x_stride, acc, 6); break;
    }
}

// All rows, outputs [n0, n0 + NB_ROWS): out[M][16] = the block's products. Each chunk of codes is turned
// into floats once (into w, CHUNK_K x 16) and shared by every row, six rows at a time.
static void many_rows(const problem *p, int n0, float *out, float *acc, float *w)
{
    const int P = 32 / p->bits, mask = (1 << p->bits) - 1;
    const __m256i vmask = _mm256_set1_epi32(mask);
    memset(out, 0, sizeof(float) * 16 * p->M);
    for (int g = 0; g < p->G; ++g) {
        memset(acc, 0, sizeof(float) * 16 * p->M);
        for (int w0 = 0; w0 < p->words_per_group; w0 += CHUNK_K / P) {
            const int words = p->words_per_group - w0 < CHUNK_K / P ? p->words_per_group - w0 : CHUNK_K / P;
            for (int i = 0; i < words; ++i) {
                const size_t word = (size_t)g * p->words_per_group + w0 + i;
                const int32_t *row = p->codes + word * p->N + n0;
                __m256i c0 = _mm256_loadu_si256((const __m256i *)row);
                __m256i c1 = _mm256_loadu_si256((const __m256i *)(row + 8));
                for (int j = 0; j < P; ++j) {
                    float *dst = w + 16 * (i * P + j);
                    _mm256_storeu_ps(dst, _mm256_cvtepi32_ps(_mm256_and_si256(c0, vmask)));
                    _mm256_storeu_ps(dst + 8, _mm256_cvtepi32_ps(_mm256_and_si256(c1, vmask)));
                    c0 = _mm256_srli_epi32(c0, p->bits);
                    c1 = _mm256_srli_epi32(c1, p->bits);
                }
            }
            const size_t k0 = ((size_t)g * p->words_per_group + w0) * P;
            for (int m0 = 0; m0 < p->M; m0 += MR) {
                const int rows = p->M - m0 < MR ? p->M - m0 : MR;
                micro_any(w, words * P, p->x + (size_t)m0 * p->Kp + k0, p->Kp, acc + 16 * m0, rows);
            }
        }
        for (int h = 0; h < 2; ++h) {
            const size_t at = (size_t)g * p->N + n0 + 8 * h;
            const __m256 s = load8(p->scale, at, p->scale_dtype);
            const __m256 z = p->bits == 2 ? _mm256_set1_ps(1.5f) : load8(p->zero, at, p->scale_dtype);
            for (int m = 0; m < p->M; ++m) {
                const __m256 xs = _mm256_set1_ps(p->xsum[(size_t)m * p->G + g]);
                float *o = out + 16 * m + 8 * h;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, xs, _mm256_loadu_ps(acc + 16 * m + 8 * h)),
                                                    _mm256_loadu_ps(o)));
            }
        }
    }
}

static void store_rows(const problem *p, const float *out, int rows, int n0, int width, const void *bias,
                       int bias_dtype, void *y, int y_dtype)
{
    for (int m = 0; m < rows; ++m)
        for (int i = 0; i < width; ++i) {
            const int n = n0 + i;
            store_out(y, (size_t)m * p->N + n, out[m * width + i] + (bias ? to_f32(bias, n, bias_dtype) : 0.0f), y_dtype);
        }
}

#ifdef UPQ_BF16
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define NB_BF16 32   // outputs per block of the bf16 several-rows kernel (two 16-lane vectors)
#define MR_BF16 12   // rows per pass of it (24 accumulators)

// 16 floats from fp32, bf16 or fp16 storage. AVX512F/BW only, the instructions both the bf16 and the int8 kernels
// have (a function of a narrower target inlines into either).
__attribute__((target("avx512f,avx512bw"))) static inline __m512 load16(const void *p, size_t i, int dtype)
{
    if (dtype == F32) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    if (dtype == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

// the bf16 bits of the integers 0..15 (exact), padded to the 32 entries of a 16-bit lookup
static const uint16_t BF16_OF_CODE[32] = {0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
                                          0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

// codes j and j + P/2 of each 32-bit word (c shifted right by j codes) as a bf16 pair: they sit 16 bits apart, so
// one mask puts each in its 16-bit half, and a 16-bit lookup makes it bf16. VDPBF16PS multiplies the pair with
// the activations of columns j and j + P/2, which the caller lays side by side.
BF16_TARGET static inline __m512i code_pairs(__m512i c, __m512i lut, const int BITS)
{
    return _mm512_permutexvar_epi16(_mm512_and_si512(c, _mm512_set1_epi32(((1 << BITS) - 1) * 0x10001)), lut);
}

// rows [m0, m0 + R) x 32 outputs over `pairs` pairs of decoded columns: acc[R][32] += x @ w
BF16_TARGET static inline __attribute__((always_inline)) void micro_bf16(const uint32_t *w, int pairs,
                                                                        const uint32_t *x, size_t x_stride,
                                                                        float *acc, const int R)
{
    __m512 a[MR_BF16][2];
    for (int m = 0; m < R; ++m) {
        a[m][0] = _mm512_loadu_ps(acc + 32 * m);
        a[m][1] = _mm512_loadu_ps(acc + 32 * m + 16);
    }
    for (int k = 0; k < pairs; ++k) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + 32 * k);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32 * k + 16);
        for (int m = 0; m < R; ++m) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)x[m * x_stride + k]);
            a[m][0] = _mm512_dpbf16_ps(a[m][0], w0, b);
            a[m][1] = _mm512_dpbf16_ps(a[m][1], w1, b);
        }
    }
    for (int m = 0; m < R; ++m) {
        _mm512_storeu_ps(acc + 32 * m, a[m][0]);
        _mm512_storeu_ps(acc + 32 * m + 16, a[m][1]);
    }
}

BF16_TARGET static void micro_bf16_any(const uint32_t *w, int pairs, const uint32_t *x, size_t x_stride, float *acc,
                                       int rows)
{
    switch (rows) {
    case 1: micro_bf16(w, pairs, x, x_stride, acc, 1); break;
    case 2: micro_bf16(w, pairs, x, x_stride, acc, 2); break;
    case 3: micro_bf16(w, pairs, x, x_stride, acc, 3); break;
    case 4: micro_bf16(w, pairs, x, x_stride, acc, 4); break;
    case 5: micro_bf16(w, pairs, x, x_stride, acc, 5); break;
    case 6: micro_bf16(w, pairs, x, x_stride, acc, 6); break;
    case 7: micro_bf16(w, pairs, x, x_stride, acc, 7); break;
    case 8: micro_bf16(w, pairs, x, x_stride, acc, 8); break;
    case 9: micro_bf16(w, pairs, x, x_stride, acc, 9); break;
    case 10: micro_bf16(w, pairs, x, x_stride, acc, 10); break;
    case 11: micro_bf16(w, pairs, x, x_stride, acc, 11); break;
    default: micro_bf16(w, pairs, x, x_stride, acc, 12); break;
    }
}

// All rows, outputs [n0, n0 + 32), bf16 activations xb (M x Kp, each word's columns in pair order: j, j + P/2
// for j < P/2): as many_rows, with each chunk of codes decoded once into bf16 pairs (w: CHUNK_K / 2 x 32 words)
// and VDPBF16PS for the products.
BF16_TARGET static inline __attribute__((always_inline)) void many_rows_bf16_bits(const problem *p,
                                                                                 const uint16_t *xb, int n0,
                                                                                 float *out, float *acc,
                                                                                 uint32_t *w, const int BITS)
{
    const int P = 32 / BITS;
    const __m512i lut = _mm512_loadu_si512(BF16_OF_CODE);
    memset(out, 0, sizeof(float) * 32 * p->M);
    for (int g = 0; g < p->G; ++g) {
        memset(acc, 0, sizeof(float) * 32 * p->M);
        for (int w0 = 0; w0 < p->words_per_group; w0 += CHUNK_K / P) {
            const int words = p->words_per_group - w0 < CHUNK_K / P ? p->words_per_group - w0 : CHUNK_K / P;
            for (int i = 0; i < words; ++i) {
                const size_t word = (size_t)g * p->words_per_group + w0 + i;
                const int32_t *row = p->codes + word * p->N + n0;
                __m512i c0 = _mm512_loadu_si512(row), c1 = _mm512_loadu_si512(row + 16);
                for (int j = 0; j < P / 2; ++j) {  // pair j: codes j and j + P/2
                    uint32_t *dst = w + 32 * (i * P / 2 + j);
                    _mm512_storeu_si512(dst, code_pairs(c0, lut, BITS));
                    _mm512_storeu_si512(dst + 16, code_pairs(c1, lut, BITS));
                    c0 = _mm512_srli_epi32(c0, BITS);
                    c1 = _mm512_srli_epi32(c1, BITS);
                }
            }
            const size_t k0 = ((size_t)g * p->words_per_group + w0) * P;  // even: P is
            for (int m0 = 0; m0 < p->M; m0 += MR_BF16) {
                const int rows = p->M - m0 < MR_BF16 ? p->M - m0 : MR_BF16;
                micro_bf16_any(w, words * P / 2, (const uint32_t *)(xb + (size_t)m0 * p->Kp + k0), p->Kp / 2,
                               acc + 32 * m0, rows);
            }
        }
        for (int h = 0; h < 2; ++h) {
            const size_t at = (size_t)g * p->N + n0 + 16 * h;
            const __m512 s = load16(p->scale, at, p->scale_dtype);
            const __m512 z = BITS == 2 ? _mm512_set1_ps(1.5f) : load16(p->zero, at, p->scale_dtype);
            for (int m = 0; m < p->M; ++m) {
                const __m512 xs = _mm512_set1_ps(p->xsum[(size_t)m * p->G + g]);
                float *o = out + 32 * m + 16 * h;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, _mm512_loadu_ps(acc + 32 * m + 16 * h)),
                                                    _mm512_loadu_ps(o)));
            }
        }
    }
}

BF16_TARGET static void many_rows_bf16(const problem *p, const uint16_t *xb, int n0, float *out, float *acc,
                                       uint32_t *w)
{
    if (p->bits == 2) many_rows_bf16_bits(p, xb, n0, out, acc, w, 2);
    else many_rows_bf16_bits(p, xb, n0, out, acc, w, 4);
}

static int use_bf16 = 0;
// on only where this CPU has the instructions, whatever the caller asks: never an illegal instruction
int upq_cpu_set_bf16(int on)
{
    __builtin_cpu_init();
    use_bf16 = on != 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
               && __builtin_cpu_supports("avx512bf16");
    return use_bf16;
}

// ---- one row on AVX-512 (AVX512F/BW): 16-lane vectors, half the instructions per weight of one_row ----
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw")))

// One row over a panel of outputs [n0, n0 + width) (width a multiple of NB), word row by word row: each row of codes
// is read as one contiguous run across the panel (the K-major layout puts a row's outputs side by side), with the
// panel's accumulators in acc[width] (L1-resident) and its results in total[width]. one_row reads a block's 128
// bytes per row at a stride of N words instead, which defeats the prefetcher and the TLB once a layer outgrows the
// cache (a 1B model's layers: 5x slower per weight than cache-resident ones). Each output lane sees the same
// operations in the same order as in one_row (code -> float, FMA with x_k over the group's columns in order, then
// s * (acc - z * sum x)): the AVX2 kernel's results bit for bit.
AVX512_TARGET static inline __attribute__((always_inline)) void row_panel512_bits(const problem *p, int n0, int width,
                                                                                  float *acc, float *total,
                                                                                  const int BITS)
{
    const int P = 32 / BITS;
    const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
    for (int i = 0; i < width; i += 16) _mm512_storeu_ps(total + i, _mm512_setzero_ps());
    for (int g = 0; g < p->G; ++g) {
        for (int i = 0; i < width; i += 16) _mm512_storeu_ps(acc + i, _mm512_setzero_ps());
        for (int w = 0; w < p->words_per_group; ++w) {
            const size_t word = (size_t)g * p->words_per_group + w;
            const int32_t *row = p->codes + word * p->N + n0;
            const float *xw = p->x + word * P;
            for (int i = 0; i < width; i += 32) {
                __m512i c0 = _mm512_loadu_si512((const void *)(row + i));
                __m512i c1 = _mm512_loadu_si512((const void *)(row + i + 16));
                __m512 a0 = _mm512_loadu_ps(acc + i), a1 = _mm512_loadu_ps(acc + i + 16);
                for (int j = 0; j < P; ++j) {
                    const __m512 xb = _mm512_set1_ps(xw[j]);
                    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c0, mask)), xb, a0);
                    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c1, mask)), xb, a1);
                    c0 = _mm512_srli_epi32(c0, BITS);
                    c1 = _mm512_srli_epi32(c1, BITS);
                }
                _mm512_storeu_ps(acc + i, a0);
                _mm512_storeu_ps(acc + i + 16, a1);
            }
        }
        const __m512 xs = _mm512_set1_ps(p->xsum[g]);
        for (int i = 0; i < width; i += 16) {
            const size_t at = (size_t)g * p->N + n0 + i;
            const __m512 z = BITS == 2 ? _mm512_set1_ps(1.5f) : load16(p->zero, at, p->scale_dtype);
            _mm512_storeu_ps(total + i, _mm512_fmadd_ps(load16(p->scale, at, p->scale_dtype),
                                                        _mm512_fnmadd_ps(z, xs, _mm512_loadu_ps(acc + i)),
                                                        _mm512_loadu_ps(total + i)));
        }
    }
}

AVX512_TARGET static void row_panel512(const problem *p, int n0, int width, float *acc, float *total)
{
    if (p->bits == 2) row_panel512_bits(p, n0, width, acc, total, 2);
    else row_panel512_bits(p, n0, width, acc, total, 4);
}
#define PANEL_BLOCKS 64   // at most 64 blocks (2,048 outputs) a panel: 16 KiB of accumulators and results

static int a8_blocks_only = 0;  // UPQ_CPU_A8_PANELS=0 (upq_cpu_set_a8_panels): one-row calls in 32-output blocks
int upq_cpu_set_a8_panels(int on) { a8_blocks_only = on == 0; return on != 0; }

static int use_avx512 = 0;
// the AVX-512 one-row kernel, on only where this CPU has AVX512F/BW
int upq_cpu_set_avx512(int on)
{
    __builtin_cpu_init();
    use_avx512 = on != 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    return use_avx512;
}

// ---- int8 activations (the "avx512_a8" backend): VPDPBUSD, AVX512-VNNI ----
// Activations are quantized per row and per weight group to int8 (symmetric: q = rint(x * 127 / max|x|), scale
// max|x| / 127), codes (0..15, unsigned bytes) times int8 activations are summed exactly in int32 by VPDPBUSD,
// four products per 32-bit lane, 64 per instruction (twice VDPBF16PS), and per group and output
//
//     y += s[g, n] * sx[g] * (sum_k c[n, k] xq[k] - z[g, n] * sum_k xq[k]).
//
// Not exact: the activations lose what int8 rounding loses (up to max|x| / 254 per element of a group), the
// trade torchao's dynamic-activation modes and llama.cpp's Q8 activations make. Byte b of a lane, after the
// word is shifted right by q codes, holds code j = (P/4) b + q; the activations are laid out to match.
#define A8_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define NB_A8 32   // outputs per block (two 16-lane vectors)
#define MR_A8 8    // rows per pass (16 int32 accumulators)

typedef struct {
    const int32_t *xq;   // M x Kp / 4 dwords: int8 activations, each word's quads in lane order
    const float *sx;     // M x G: activation scale of each group
    const float *xsq;    // M x G: sum of the int8 activations of each group
} act8;

A8_TARGET static inline __attribute__((always_inline)) void rows_a8(const problem *p, const act8 *a, int n0, int m0,
                                                                    float *out, const int R, const int BITS)
{
    const int P = 32 / BITS, Q = P / 4;
    const size_t xstride = (size_t)p->Kp / 4;
    const __m512i mask = _mm512_set1_epi32(((1 << BITS) - 1) * 0x01010101);
    memset(out, 0, sizeof(float) * NB_A8 * R);
    for (int g = 0; g < p->G; ++g) {
        __m512i acc[MR_A8][2];
        for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
        for (int i = 0; i < p->words_per_group; ++i) {
            const size_t word = (size_t)g * p->words_per_group + i;
            const int32_t *row = p->codes + word * p->N + n0;
            const __m512i c0 = _mm512_loadu_si512(row), c1 = _mm512_loadu_si512(row + 16);
            const int32_t *xw = a->xq + (size_t)m0 * xstride + word * Q;
            for (int q = 0; q < Q; ++q) {
                const __m512i w0 = _mm512_and_si512(_mm512_srli_epi32(c0, BITS * q), mask);
                const __m512i w1 = _mm512_and_si512(_mm512_srli_epi32(c1, BITS * q), mask);
                for (int m = 0; m < R; ++m) {
                    const __m512i b = _mm512_set1_epi32(xw[m * xstride + q]);
                    acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, b);
                    acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, b);
                }
            }
        }
        for (int h = 0; h < 2; ++h) {
            const size_t at = (size_t)g * p->N + n0 + 16 * h;
            const __m512 s = load16(p->scale, at, p->scale_dtype);
            const __m512 z = BITS == 2 ? _mm512_set1_ps(1.5f) : load16(p->zero, at, p->scale_dtype);
            for (int m = 0; m < R; ++m) {
                const size_t mg = (size_t)(m0 + m) * p->G + g;
                const __m512 t = _mm512_fnmadd_ps(z, _mm512_set1_ps(a->xsq[mg]), _mm512_cvtepi32_ps(acc[m][h]));
                float *o = out + NB_A8 * m + 16 * h;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(a->sx[mg])), t, _mm512_loadu_ps(o)));
            }
        }
    }
}

// One row (a decode step) over a panel of A8_PANEL outputs [n0, n0 + A8_PANEL): each word row of the panel is one
// contiguous run of 512 bytes (eight int32 accumulators, eight independent VPDPBUSD chains), and the run PF_A8 word
// rows ahead is prefetched, since the next run sits N words further on, a page away in a big layer, where the
// hardware prefetcher does not follow. Each output sees the same operations as in rows_a8 (exact int32 sums, then
// out = s * sx * (acc - z * xsq) + out per group, in group order): its results bit for bit.
#define A8_PANEL 128
#ifndef PF_A8
#define PF_A8 4
#endif
A8_TARGET static inline __attribute__((always_inline)) void row_a8_panel(const problem *p, const act8 *a, int n0,
                                                                         float *out, const int BITS, const int V)
{
    const int P = 32 / BITS, Q = P / 4;
    const __m512i mask = _mm512_set1_epi32(((1 << BITS) - 1) * 0x01010101);
    const size_t N = (size_t)p->N, words = (size_t)p->G * p->words_per_group;
    __m512 total[A8_PANEL / 16];
    for (int v = 0; v < V; ++v) total[v] = _mm512_setzero_ps();
    for (int g = 0; g < p->G; ++g) {
        __m512i acc[A8_PANEL / 16];
        for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_si512();
        for (int i = 0; i < p->words_per_group; ++i) {
            const size_t word = (size_t)g * p->words_per_group + i;
            const int32_t *row = p->codes + word * N + n0;
            if (word + PF_A8 < words) {
                const char *ahead = (const char *)(row + PF_A8 * N);
                for (int line = 0; line < V * 64; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
            }
            __m512i c[A8_PANEL / 16];
            for (int v = 0; v < V; ++v) c[v] = _mm512_loadu_si512(row + 16 * v);
            const int32_t *xw = a->xq + word * Q;
            for (int q = 0; q < Q; ++q) {
                const __m512i b = _mm512_set1_epi32(xw[q]);
                for (int v = 0; v < V; ++v)
                    acc[v] = _mm512_dpbusd_epi32(acc[v], _mm512_and_si512(_mm512_srli_epi32(c[v], BITS * q), mask), b);
            }
        }
        const __m512 sx = _mm512_set1_ps(a->sx[g]), xs = _mm512_set1_ps(a->xsq[g]);
        for (int v = 0; v < V; ++v) {
            const size_t at = (size_t)g * N + n0 + 16 * v;
            const __m512 s = load16(p->scale, at, p->scale_dtype);
            const __m512 z = BITS == 2 ? _mm512_set1_ps(1.5f) : load16(p->zero, at, p->scale_dtype);
            const __m512 t = _mm512_fnmadd_ps(z, xs, _mm512_cvtepi32_ps(acc[v]));
            total[v] = _mm512_fmadd_ps(_mm512_mul_ps(s, sx), t, total[v]);
        }
    }
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + 16 * v, total[v]);
}

// nb blocks of 32 outputs (1..4) from n0
A8_TARGET static void row_a8_panel_any(const problem *p, const act8 *a, int n0, float *out, int nb)
{
#define PANEL_CASE(B) case B: if (p->bits == 2) row_a8_panel(p, a, n0, out, 2, 2 * B); \
                              else row_a8_panel(p, a, n0, out, 4, 2 * B); break;
    switch (nb) { PANEL_CASE(1) PANEL_CASE(2) PANEL_CASE(3) default: PANEL_CASE(4) }
#undef PANEL_CASE
}

A8_TARGET static void rows_a8_any(const problem *p, const act8 *a, int n0, int m0, float *out, int rows)
{
#define A8_CASE(R) case R: if (p->bits == 2) rows_a8(p, a, n0, m0, out, R, 2); else rows_a8(p, a, n0, m0, out, R, 4); break;
    switch (rows) {
    A8_CASE(1) A8_CASE(2) A8_CASE(3) A8_CASE(4) A8_CASE(5) A8_CASE(6) A8_CASE(7)
    default: if (p->bits == 2) rows_a8(p, a, n0, m0, out, MR_A8, 2); else rows_a8(p, a, n0, m0, out, MR_A8, 4);
    }
#undef A8_CASE
}

// One group of one row: int8 activations into dst (each word's codes in lane order: code jj of a word is byte
// jj / Q of quad jj % Q), the scale max|x| / 127 and the sum of the int8 values; 0 where x is not all finite.
static int quantize_group(const void *x, int x_dtype, size_t at, int group, int P, int8_t *dst, float *sx, float *xsq)
{
    const int Q = P / 4;
    int finite = 1;
    float amax = 0;
    for (int j = 0; j < group; ++j) {
        const float v = fabsf(to_f32(x, at + j, x_dtype));
        finite &= v <= FLT_MAX;  // false for inf and NaN
        amax = v > amax ? v : amax;
    }
    const float inv = amax > 0 && 127.0f / amax <= FLT_MAX ? 127.0f / amax : 0.0f;  // a tiny group: all zero
    int32_t total = 0;
    for (int j = 0; j < group; ++j) {
        float r = rintf(to_f32(x, at + j, x_dtype) * inv);
        r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r == r ? r : 0.0f;  // NaN: 0 (the call is refused)
        const int word = j / P, jj = j % P;
        dst[word * P + (jj % Q) * 4 + jj / Q] = (int8_t)r;
        total += (int32_t)r;
    }
    *sx = amax / 127.0f;
    *xsq = (float)total;
    return finite;
}

// the same for a group of a multiple of 16 columns, 16 at a time (the same numbers: the same fp32 product, rounded
// to nearest even, clamped): 16 columns are one INT2 word or two INT4 words, put in lane order by one byte shuffle
A8_TARGET static int quantize_group16(const void *x, int x_dtype, size_t at, int group, int bits, int8_t *dst,
                                      float *sx, float *xsq)
{
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    for (int j = 0; j < group; j += 16) {
        const __m512 v = _mm512_abs_ps(load16(x, at + j, x_dtype));
        bad |= _mm512_cmp_ps_mask(v, big, _CMP_NLE_UQ);  // inf, and NaN (unordered)
        vmax = _mm512_max_ps(vmax, v);
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const __m512 inv = _mm512_set1_ps(amax > 0 && 127.0f / amax <= FLT_MAX ? 127.0f / amax : 0.0f);
    const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    // byte i of 16 takes byte order[i]: INT2, code (i % 4) * 4 + i / 4 of the word; INT4, of each 8-byte word,
    // code (i % 4) * 2 + i / 4
    const __m128i order = bits == 2 ? _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
                                    : _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    __m512i total = _mm512_setzero_si512();
    for (int j = 0; j < group; j += 16) {
        __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(load16(x, at + j, x_dtype), inv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_max_ps(_mm512_min_ps(r, hi), lo);
        const __m512i q = _mm512_cvtps_epi32(r);
        total = _mm512_add_epi32(total, q);
        _mm_storeu_si128((__m128i *)(dst + j), _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(q), order));
    }
    *sx = amax / 127.0f;
    *xsq = (float)_mm512_reduce_add_epi32(total);
    return bad == 0;
}

int upq_cpu_a8_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vnni");
}

// as upq_linear, with int8 activations; 3 where this CPU lacks AVX512-VNNI, 4 for activations that are not all finite
// (the caller takes the exact kernel)
int upq_linear_a8(const void *x, int x_dtype, int M, int K, const int32_t *codes, int N, int bits, int group,
                  const void *scale, const void *zero, int scale_dtype, const void *bias, int bias_dtype,
                  void *y, int y_dtype, int threads)
{
    if (!upq_cpu_a8_supported()) return 3;
    const int P = 32 / bits, Q = P / 4;
    const int G = K / group;
    const int words_per_group = (group + P - 1) / P;
    if (G > 1 && group % P) return 1;
    const int Kp = G * words_per_group * P;
    int8_t *xq = (int8_t *)calloc((size_t)M * Kp, 1);
    float *sx = (float *)malloc(sizeof(float) * 2 * (size_t)M * G);
    if (!xq || !sx) { free(xq); free(sx); return 2; }
    float *xsq = sx + (size_t)M * G;
    int finite = 1;
    // one (row, group) at a time, the rows' groups shared among the threads when there are enough of them
    #pragma omp parallel for num_threads(threads) if(threads > 1 && (size_t)M * K >= 8192) schedule(static) \
        reduction(&:finite)
    for (int mg = 0; mg < M * G; ++mg) {
        const int m = mg / G, g = mg % G;
        int8_t *dst = xq + (size_t)m * Kp + (size_t)g * words_per_group * P;
        finite &= group % 16 ? quantize_group(x, x_dtype, (size_t)m * K + (size_t)g * group, group, P, dst,
                                              sx + mg, xsq + mg)
                             : quantize_group16(x, x_dtype, (size_t)m * K + (size_t)g * group, group, bits, dst,
                                                sx + mg, xsq + mg);
    }
    if (!finite) { free(xq); free(sx); return 4; }  // no int8 scale for inf or NaN: the exact kernel propagates them
    problem p = {NULL, NULL, M, Kp, N, G, group, words_per_group, bits, codes, scale, scale_dtype, zero};
    const act8 a = {(const int32_t *)xq, sx, xsq};
    const int blocks = N / NB_A8;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if(threads > 1 && blocks > 1)
    {
        float *work = (float *)malloc(sizeof(float) * NB_A8 * MR_A8);
        if (!work) {
            #pragma omp atomic write
            failed = 1;
        }
        if (M == 1 && !a8_blocks_only && work) {
            // one row: each thread an even share of the blocks, read in panels of up to 4 blocks (row_a8_panel)
#ifdef _OPENMP
            const int t = omp_get_thread_num(), team = omp_get_num_threads();
#else
            const int t = 0, team = 1;
#endif
            const int b1 = (int)((long)blocks * (t + 1) / team);
            for (int b = (int)((long)blocks * t / team); b < b1; b += A8_PANEL / NB_A8) {
                const int nb = b1 - b < A8_PANEL / NB_A8 ? b1 - b : A8_PANEL / NB_A8;
                row_a8_panel_any(&p, &a, b * NB_A8, work, nb);
                store_rows(&p, work, 1, b * NB_A8, nb * NB_A8, bias, bias_dtype, y, y_dtype);
            }
        }
        #pragma omp for schedule(static)
        for (int b = 0; b < (M == 1 && !a8_blocks_only ? 0 : blocks); ++b) {
            if (!work) continue;
            for (int m0 = 0; m0 < M; m0 += MR_A8) {
                const int rows = M - m0 < MR_A8 ? M - m0 : MR_A8;
                rows_a8_any(&p, &a, b * NB_A8, m0, work, rows);
                store_rows(&p, work, rows, b * NB_A8, NB_A8, bias, bias_dtype,
                           (char *)y + (size_t)m0 * N * (y_dtype == F32 ? 4 : 2), y_dtype);
            }
        }
        free(work);
    }
    if (failed) { free(xq); free(sx); return 2; }
    for (int n = blocks * NB_A8; n < N; ++n) {  // the outputs past the last full block: the same sums, scalar
        const int mask = (1 << bits) - 1;
        for (int m = 0; m < M; ++m) {
            float total = 0;
            for (int g = 0; g < G; ++g) {
                int32_t acc = 0;
                for (int w = 0; w < words_per_group; ++w) {
                    const size_t word = (size_t)g * words_per_group + w;
                    const uint32_t c = (uint32_t)codes[word * N + n];
                    for (int j = 0; j < P; ++j)
                        acc += (int32_t)((c >> (bits * j)) & mask) * xq[(size_t)m * Kp + word * P + (j % Q) * 4 + j / Q];
                }
                const size_t at = (size_t)g * N + n, mg = (size_t)m * G + g;
                const float s = to_f32(scale, at, scale_dtype), z = bits == 2 ? 1.5f : to_f32(zero, at, scale_dtype);
                total = fmaf(s * sx[mg], fmaf(-z, xsq[mg], (float)acc), total);
            }
            store_out(y, (size_t)m * N + n, total + (bias ? to_f32(bias, n, bias_dtype) : 0.0f), y_dtype);
        }
    }
    free(xq);
    free(sx);
    return 0;
}
#else
#define NB_BF16 NB_ROWS
int upq_cpu_a8_supported(void) { return 0; }  // built without AVX-512: no int8-activation kernel
int upq_linear_a8(const void *x, int x_dtype, int M, int K, const int32_t *codes, int N, int bits, int group,
                  const void *scale, const void *zero, int scale_dtype, const void *bias, int bias_dtype,
                  void *y, int y_dtype, int threads)
{
    (void)x; (void)x_dtype; (void)M; (void)K; (void)codes; (void)N; (void)bits; (void)group; (void)scale;
    (void)zero; (void)scale_dtype; (void)bias; (void)bias_dtype; (void)y; (void)y_dtype; (void)threads;
    return 3;
}
static const int use_bf16 = 0;
int upq_cpu_set_bf16(int on) { (void)on; return 0; }  // built without it: the several-rows kernel is fp32
static const int use_avx512 __attribute__((unused)) = 0;
int upq_cpu_set_a8_panels(int on) { (void)on; return 0; }
int upq_cpu_set_avx512(int on) { (void)on; return 0; }  // built without AVX-512: the AVX2 one-row kernel
#endif

int upq_cpu_abi(void) { return 5; }

// returns 0 on success, 1 for a group size that splits a word (the caller takes another path), 2 out of memory
int upq_linear(const void *x, int x_dtype, int M, int K, const int32_t *codes, int N, int bits, int group,
               const void *scale, const void *zero, int scale_dtype, const void *bias, int bias_dtype,
               void *y, int y_dtype, int threads)
{
    const int P = 32 / bits;
    const int G = K / group;
    const int words_per_group = (group + P - 1) / P;
    if (G > 1 && group % P) return 1;
    const int Kp = G * words_per_group * P;
    float *xp = (float *)calloc((size_t)M * Kp + (size_t)M * G, sizeof(float));
    if (!xp) return 2;
    float *xsum = xp + (size_t)M * Kp;
    for (int m = 0; m < M; ++m)
        for (int g = 0; g < G; ++g) {
            float s = 0;
            for (int k = g * group; k < (g + 1) * group; ++k) {
                float v = to_f32(x, (size_t)m * K + k, x_dtype);
                xp[(size_t)m * Kp + (size_t)g * words_per_group * P + (k - g * group)] = v;
                s += v;
            }
            xsum[(size_t)m * G + g] = s;
        }
    problem p = {xp, xsum, M, Kp, N, G, group, words_per_group, bits, codes, scale, scale_dtype, zero};
    // bf16 activations, several rows, the kernel switched on: the VDPBF16PS path (x is exact in bf16)
    const int bf16 = use_bf16 && M > 1 && x_dtype == BF16;
    uint16_t *xb = NULL;
    if (bf16) {
        xb = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)M * Kp);
        if (!xb) { free(xp); return 2; }
        for (size_t word = 0; word < (size_t)M * Kp / P; ++word)  // in pair order (many_rows_bf16)
            for (int j = 0; j < P; ++j) {
                uint32_t bits32; memcpy(&bits32, xp + word * P + (j % 2 ? P / 2 : 0) + j / 2, 4);
                xb[word * P + j] = (uint16_t)(bits32 >> 16);  // exact: widened from bf16 above (padding: zero)
            }
    }
    const int width = M == 1 ? NB : bf16 ? NB_BF16 : NB_ROWS;
    const int blocks = N / width;
    int failed = 0;
#ifdef UPQ_BF16
    if (M == 1 && use_avx512) {  // one row on AVX-512: panels of whole code rows (row_panel512)
        const int team = threads > 1 ? threads : 1;
        const int per_thread = (blocks + team - 1) / team;
        const int chunk = per_thread < 1 ? 1 : per_thread > PANEL_BLOCKS ? PANEL_BLOCKS : per_thread;
        const int panels = (blocks + chunk - 1) / chunk;
        #pragma omp parallel num_threads(threads) if(threads > 1 && panels > 1)
        {
            float *buf = (float *)malloc(sizeof(float) * 2 * (size_t)chunk * NB);
            if (!buf) {
                #pragma omp atomic write
                failed = 1;
            }
            #pragma omp for schedule(static)
            for (int q = 0; q < panels; ++q) {
                if (!buf) continue;
                const int b0 = q * chunk, nb = blocks - b0 < chunk ? blocks - b0 : chunk;
                row_panel512(&p, b0 * NB, nb * NB, buf, buf + (size_t)chunk * NB);
                store_rows(&p, buf + (size_t)chunk * NB, 1, b0 * NB, nb * NB, bias, bias_dtype, y, y_dtype);
            }
            free(buf);
        }
    } else
#endif
    #pragma omp parallel num_threads(threads) if(threads > 1 && blocks > 1)
    {
        float *work = (float *)malloc(sizeof(float) * (2 * 32 * (size_t)M + 16 * CHUNK_K + NB));
        if (!work) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int b = 0; b < blocks; ++b) {
            if (!work) continue;
            if (M == 1) {
                if (bits == 2) one_row(&p, b * NB, work, 2); else one_row(&p, b * NB, work, 4);
            }
#ifdef UPQ_BF16
            else if (bf16) {
                many_rows_bf16(&p, xb, b * NB_BF16, work, work + 32 * (size_t)M, (uint32_t *)(work + 2 * 32 * (size_t)M));
            }
#endif
            else {
                many_rows(&p, b * NB_ROWS, work, work + 16 * (size_t)M, work + 2 * 16 * (size_t)M);
            }
            store_rows(&p, work, M, b * width, width, bias, bias_dtype, y, y_dtype);
        }
        free(work);
    }
    free(xb);
    if (failed) { free(xp); return 2; }
    for (int n = blocks * width; n < N; ++n) {  // the outputs past the last full block: plain scalar code
        const int mask = (1 << bits) - 1;
        for (int m = 0; m < M; ++m) {
            float total = 0;
            for (int g = 0; g < G; ++g) {
                float acc = 0;
                for (int w = 0; w < words_per_group; ++w) {
                    const size_t word = (size_t)g * words_per_group + w;
                    uint32_t c = (uint32_t)codes[word * N + n];
                    for (int j = 0; j < P; ++j, c >>= bits) acc += (float)(c & mask) * xp[(size_t)m * Kp + word * P + j];
                }
                const size_t at = (size_t)g * N + n;
                float s = to_f32(scale, at, scale_dtype), z = bits == 2 ? 1.5f : to_f32(zero, at, scale_dtype);
                total += s * (acc - z * xsum[(size_t)m * G + g]);
            }
            store_out(y, (size_t)m * N + n, total + (bias ? to_f32(bias, n, bias_dtype) : 0.0f), y_dtype);
        }
    }
    free(xp);
    return 0;
}
