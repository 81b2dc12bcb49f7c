/* sqlora_cpu.c: packed low-bit linear layers on the CPU (docs/format.md, docs/kernels_cpu.md).
 *
 * y[m, n] = sum_k x[m, k] * What[n, k] + sum_i (x[m] . R[i]) * L[n, i] + bias[n]
 *
 * Design, kept deliberately simple so every path is easy to check against the scalar one:
 *   - threads (OpenMP) split the output rows n;
 *   - each row is decoded once into a float buffer of K dense weights (in L1), scale applied, then
 *     dotted with every activation row (batch 1..M share one decode);
 *   - the ISA-specific parts are the 4-bit / 8-bit decoders and the dot product;
 *   - the low-rank term is computed as t = x R^T first (M x r), then fused into each row's output.
 * Weights are exact fp32 products of table value and fp32 scale, as in the reference dequantizer,
 * so only the summation order differs from `F.linear(x, dequantize())`. The exception is the AVX-512
 * BF16 kernels of 4-bit dense layers (gemv4_words_avx512 for batches of 1-2, gemm4_bf16_avx512 for
 * more): exact for bf16 inputs, and within 2^-18 per x value for fp32 ones, which they split into two
 * bf16 terms (SQ_FLAG_EXACT turns that off).
 *
 * The caller (sqlora_hf/kernels/cpu) validates every buffer length before calling; the kernel
 * re-checks the lengths it is told about and returns a negative code instead of reading past them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define SQ_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#define SQ_ARM 1
#include <arm_neon.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_NEON = 3, ISA_DOTPROD = 4 };
enum { SQ_OK = 0, SQ_EBADARG = -1, SQ_EBADLEN = -2, SQ_EISA = -3, SQ_ENOMEM = -4 };
/* flags of sqlora_cpu_linear_desc: the opt-in, inexact integer-activation paths (12-bit and 8-bit x);
 * SQ_FLAG_BF16_X: every x value is a bfloat16 (the caller's tensor was bf16), so the exact vdpbf16ps
 * kernel may take batches of 4-bit layers with a bf16 table; SQ_FLAG_EXACT: fp32 x keeps fp32
 * arithmetic (no two-term bf16 split) */
enum { SQ_FLAG_INT_ACT = 1, SQ_FLAG_INT8_ACT = 2, SQ_FLAG_BF16_X = 4, SQ_FLAG_EXACT = 8 };

/* ---------------------------------------------------------------------------------------------- */
/* ISA detection                                                                                  */

int sqlora_cpu_isa_supported(int isa) {
    switch (isa) {
    case ISA_SCALAR: return 1;
#ifdef SQ_X86
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
#endif
#ifdef SQ_ARM
    case ISA_NEON: return 1;
    case ISA_DOTPROD: return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
    default: return 0;
    }
}

/* 1 if this CPU has the bf16 dot product (AVX-512 BF16) that SQ_FLAG_BF16_X can use, else 0. */
int sqlora_cpu_bf16_supported(void) {
#ifdef SQ_X86
    return sqlora_cpu_isa_supported(ISA_AVX512) && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

int sqlora_cpu_best_isa(void) {
    static const int order[] = {ISA_AVX512, ISA_AVX2, ISA_DOTPROD, ISA_NEON, ISA_SCALAR};
    for (int i = 0; i < 5; i++)
        if (sqlora_cpu_isa_supported(order[i])) return order[i];
    return ISA_SCALAR;
}

int sqlora_cpu_abi_version(void) { return 6; }

/* ---------------------------------------------------------------------------------------------- */
/* Scalar pieces (also the reference for the SIMD ones)                                           */

/* Codes of one 32-weight block (docs/format.md "Code packing"). */
static void unpack_block(const uint8_t *b, int bits, uint8_t c[32]) {
    if (bits == 4) {
        for (int j = 0; j < 16; j++) { c[j] = b[j] & 15; c[j + 16] = b[j] >> 4; }
    } else if (bits == 2) {
        for (int j = 0; j < 8; j++)
            for (int q = 0; q < 4; q++) c[j + 8 * q] = (b[j] >> (2 * q)) & 3;
    } else { /* 3 bits: 2-bit plane then a little-endian uint32 of high bits */
        uint32_t hi = (uint32_t)b[8] | ((uint32_t)b[9] << 8) | ((uint32_t)b[10] << 16) | ((uint32_t)b[11] << 24);
        for (int j = 0; j < 8; j++)
            for (int q = 0; q < 4; q++) {
                int i = j + 8 * q;
                c[i] = (uint8_t)(((b[j] >> (2 * q)) & 3) | (((hi >> i) & 1) << 2));
            }
    }
}

/* Decode `n_stored` stored weights of one row into out[] (scaled). `per_group` = stored per scale. */
static void decode_row_scalar(const uint8_t *row, int bits, const float *lut, const float *scales,
                              int per_group, int64_t n_stored, float *out) {
    if (bits == 8) {
        for (int64_t k = 0; k < n_stored; k++) out[k] = (float)(int8_t)row[k] * scales[k / per_group];
        return;
    }
    const int bpb = 4 * bits; /* bytes per 32-weight block */
    uint8_t c[32];
    for (int64_t t = 0; t < n_stored / 32; t++) {
        unpack_block(row + t * bpb, bits, c);
        float s = scales[(t * 32) / per_group];
        for (int i = 0; i < 32; i++) out[t * 32 + i] = lut[c[i]] * s;
    }
}

static float dot_scalar(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

/* Integer activations (the opt-in SQ_FLAG_INT8_ACT paths; x86 AVX2 and aarch64 dotprod share these).
 * x is quantized per 32 columns to int8 in [-127, 127] (absmax, one fp32 scale per block) and the 16
 * table values to levels m = round(64 c / max|c|) in [-64, 64]. */
#define SQ_X8_MAX 127.0f
#define SQ_L8_MAX 64.0f

/* x -> int8 per 32-block; xs[b] = the block's scale, xsum[b] (unless NULL) = the sum of its int8 values. Layout:
 * natural order, or (`interleave`, AVX2) per 64 columns [0..15 | 32..47] [16..31 | 48..63]: the order
 * in which one 32-byte load of two blocks' codes splits into low and high nibbles. */
static void quantize_x_int8(const float *x, int64_t K, int interleave, int8_t *xq, float *xs, int32_t *xsum) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) { float a = xb[i] < 0 ? -xb[i] : xb[i]; if (a > amax) amax = a; }
        const float inv = amax > 0 ? SQ_X8_MAX / amax : 0.0f;
        xs[b] = amax / SQ_X8_MAX;
        int8_t *dst = interleave ? xq + 64 * (b / 2) + 16 * (b & 1) : xq + 32 * b;
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) {
            float q = xb[i] * inv;
            q = q > SQ_X8_MAX ? SQ_X8_MAX : q < -SQ_X8_MAX ? -SQ_X8_MAX : q;
            const int8_t v = (int8_t)(q < 0 ? q - 0.5f : q + 0.5f);
            dst[interleave ? (i < 16 ? 0 : 32) + (i & 15) : i] = v;
            sum += v;
        }
        if (xsum) xsum[b] = sum;
    }
}

/* levels m of a 16-entry table; returns the factor that turns m back into a table value */
static float int8_levels(const float *lut, int8_t m[16]) {
    float amax = 0.0f;
    for (int e = 0; e < 16; e++) { float a = lut[e] < 0 ? -lut[e] : lut[e]; if (a > amax) amax = a; }
    const float inv = amax > 0 ? SQ_L8_MAX / amax : 0.0f;
    for (int e = 0; e < 16; e++) {
        const float q = lut[e] * inv;
        m[e] = (int8_t)(q < 0 ? q - 0.5f : q + 0.5f);
    }
    return amax / SQ_L8_MAX;
}

/* Whether every table value is a bfloat16 (format version 2's codebook: the low 16 bits are zero),
 * which lets the 4-bit kernels look up two byte planes instead of four. */
static int lut_is_bf16(const float *lut, int n) {
    for (int e = 0; e < n; e++) {
        uint32_t u; memcpy(&u, &lut[e], 4);
        if (u & 0xFFFFu) return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------------------------------------- */
/* x86: AVX2 + FMA and AVX-512                                                                    */

#ifdef SQ_X86
#define T_AVX2 __attribute__((target("avx2,fma")))

/* Nonzero if one of the 8 mask bytes at m does not keep exactly 4 columns (SWAR popcount per byte; 2:4 and
 * 4:8 both keep 4 of every 8). The sparse rows only read inside the row whatever the mask holds, so a bad
 * mask gives wrong numbers, which this turns into an error. */
static inline uint64_t mask_bytes_bad(const uint8_t *m) {
    uint64_t w;
    memcpy(&w, m, 8);
    w = w - ((w >> 1) & 0x5555555555555555ULL);
    w = (w & 0x3333333333333333ULL) + ((w >> 2) & 0x3333333333333333ULL);
    return ((w + (w >> 4)) & 0x0F0F0F0F0F0F0F0FULL) ^ 0x0404040404040404ULL;
}

#define T_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

T_AVX2 static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

T_AVX2 static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

typedef struct { __m256i t0, t1, t2, t3, m4; } lut4_avx2_t;

T_AVX512 static float dot_avx512(const float *a, const float *b, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), a1);
    }
    if (i < n) { /* masked tail: no read past n */
        int64_t rem = n - i;
        __mmask16 k0 = (__mmask16)(rem >= 16 ? 0xFFFF : ((1u << rem) - 1));
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k0, a + i), _mm512_maskz_loadu_ps(k0, b + i), a0);
        if (rem > 16) {
            __mmask16 k1 = (__mmask16)((1u << (rem - 16)) - 1);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k1, a + i + 16), _mm512_maskz_loadu_ps(k1, b + i + 16), a1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

T_AVX2 static void decode23_avx2(const uint8_t *row, int bits, const float *lut, const float *scales,
                                 int per_group, int64_t n_stored, float *out);

T_AVX512 static void decode_row_avx512(const uint8_t *row, int bits, const float *lut, const float *scales,
                                       int per_group, int64_t n_stored, float *out) {
    if (bits == 8) {
        for (int64_t t = 0; t < n_stored / 16; t++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 16 * t))));
            _mm512_storeu_ps(out + 16 * t, _mm512_mul_ps(v, _mm512_set1_ps(scales[(t * 16) / per_group])));
        }
        return;
    }
    if (bits != 4) { decode23_avx2(row, bits, lut, scales, per_group, n_stored, out); return; }
    const __m512 table = _mm512_loadu_ps(lut);
    const __m128i m4 = _mm_set1_epi8(15);
    for (int64_t t = 0; t < n_stored / 32; t++) {
        __m128i b = _mm_loadu_si128((const __m128i *)(row + 16 * t));
        __m512 s = _mm512_set1_ps(scales[(t * 32) / per_group]);
        __m512i cl = _mm512_cvtepu8_epi32(_mm_and_si128(b, m4));
        __m512i ch = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m4));
        _mm512_storeu_ps(out + 32 * t, _mm512_mul_ps(_mm512_permutexvar_ps(cl, table), s));
        _mm512_storeu_ps(out + 32 * t + 16, _mm512_mul_ps(_mm512_permutexvar_ps(ch, table), s));
    }
}
/* Batch-1 kernels stream every row once; the hardware prefetcher alone leaves the single-threaded int8
 * path waiting on memory (4096x4096 g64 on the dev VM: 944 -> 785 us with this, min of 9; the exact
 * path is compute-bound and gains ~4 %). Prefetches past the end of a buffer are harmless hints. The 4-bit
 * dense kernels of batches 1-2 (nibble and word lanes) prefetch the same columns 4 rows ahead instead: a row
 * is only 2 KB at K = 4096, so 2 KB ahead is the next row, already streaming (cold weights, 1 thread: Zen 4
 * 0.39 -> 0.32 ms at 4096^2 and 1.28 -> 0.89 at 4096 x 11008; Xeon (Emerald Rapids) 1.07-1.38x faster at
 * batch 1, unchanged at batches 2-16). */
#define SQ_PREFETCH 2048
#define SQ_BF16_MB 8 /* rows of x per pass of the bf16 kernel (the dispatch instantiates 1..8, not more) */
#ifndef SQ_WORDS_MAX_M
#define SQ_WORDS_MAX_M 2 /* AVX-512 BF16, 4-bit dense: batches up to this take the word-lane kernel, larger ones the
                          * panel kernel (at batch 2 the panel kernel was no faster than the fp32 one: 1.04 vs
                          * 1.35 ms at 4096 x 4096, 1 thread; the word-lane one takes 0.33 ms) */
#endif
#ifndef SQ_SMALL_M
#define SQ_SMALL_M 6 /* AVX-512 2/3/4-bit: batches up to 6 take the fused small-batch kernels (measured for 4-bit:
                        * at 7 it ties, at 8 it loses; 3-bit gains 1.1-3x at 2-6) */
#endif

/* Batch-1 4-bit dense, exact fp32, with byte-table lookups (vpshufb) instead of float permutes.
 * Each table value is split into its 4 bytes; 4 vpshufb look up the 4 byte planes of 32 codes at
 * once and two rounds of unpacks rebuild the 32-bit floats (bit-exact table values). The unpacks
 * leave the weights of a 32-block in the order `PSHUFB_ORDER` (64-blocks: `PSHUFB_ORDER64`), so for
 * batch 1 x is permuted once per call into that order (`permute_x64`) and every row and thread reuses
 * it; decoding for batch > 1 stores the 128-bit halves straight to their natural columns.
 * Measured on the AMD EPYC (Zen 3) dev VM, 4096x4096 g64, 1 thread: 1.42 ms vs 3.26 ms for the previous
 * two-vpermps-and-blend lookup (benchmarks: docs/kernels_cpu.md). */
static const uint8_t PSHUFB_ORDER[32] = {0, 1, 2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                                         8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};

T_AVX2 static lut4_avx2_t lut4_avx2_init(const float *lut) {
    uint8_t p[4][16];
    for (int e = 0; e < 16; e++) {
        uint32_t u; memcpy(&u, &lut[e], 4);
        for (int q = 0; q < 4; q++) p[q][e] = (uint8_t)(u >> (8 * q));
    }
    lut4_avx2_t t;
    t.t0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p[0]));
    t.t1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p[1]));
    t.t2 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p[2]));
    t.t3 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p[3]));
    t.m4 = _mm256_set1_epi8(15);
    return t;
}

/* 32 codes already split into nibble bytes `v` (one per byte) -> 32 table values as 4 x 8 floats:
 * each fp32 value is rebuilt exactly from its 4 bytes, looked up by vpshufb and interleaved. */
#define LUT4_AVX2_16(T, v, f0, f1, f2, f3)                                                                 \
    do {                                                                                                  \
        __m256i b0_ = _mm256_shuffle_epi8((T).t0, v), b1_ = _mm256_shuffle_epi8((T).t1, v);                \
        __m256i b2_ = _mm256_shuffle_epi8((T).t2, v), b3_ = _mm256_shuffle_epi8((T).t3, v);                \
        __m256i l01_ = _mm256_unpacklo_epi8(b0_, b1_), h01_ = _mm256_unpackhi_epi8(b0_, b1_);             \
        __m256i l23_ = _mm256_unpacklo_epi8(b2_, b3_), h23_ = _mm256_unpackhi_epi8(b2_, b3_);             \
        f0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01_, l23_));                                      \
        f1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01_, l23_));                                      \
        f2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01_, h23_));                                      \
        f3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01_, h23_));                                      \
    } while (0)

/* 16 code bytes (one 32-weight block) -> 32 table values as 4 x 8 floats in PSHUFB_ORDER. */
#define LUT4_AVX2_BLOCK(T, src, f0, f1, f2, f3)                                                            \
    do {                                                                                                  \
        __m256i v_ = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(src)));                \
        v_ = _mm256_and_si256(_mm256_blend_epi32(v_, _mm256_srli_epi16(v_, 4), 0xF0), (T).m4);            \
        LUT4_AVX2_16(T, v_, f0, f1, f2, f3);                                                              \
    } while (0)

/* Decode (scaled) in natural order: the lookup's 128-bit halves are stored to their own columns. */
T_AVX2 static void decode4_pshufb_avx2(const uint8_t *row, const float *lut, const float *scales, int per_group,
                                       int64_t n_stored, float *out) {
    const lut4_avx2_t T = lut4_avx2_init(lut);
    const int64_t bpg = per_group / 32; /* blocks per scale (per_group is a multiple of 32) */
    for (int64_t t = 0; t < n_stored / 32; t++) {
        __m256 f0, f1, f2, f3;
        LUT4_AVX2_BLOCK(T, row + 16 * t, f0, f1, f2, f3);
        const __m256 s = _mm256_set1_ps(scales[bpg == 1 ? t : bpg == 2 ? t >> 1 : t / bpg]);
        f0 = _mm256_mul_ps(f0, s); f1 = _mm256_mul_ps(f1, s); f2 = _mm256_mul_ps(f2, s); f3 = _mm256_mul_ps(f3, s);
        float *o = out + 32 * t;
        _mm_storeu_ps(o, _mm256_castps256_ps128(f0)); _mm_storeu_ps(o + 16, _mm256_extractf128_ps(f0, 1));
        _mm_storeu_ps(o + 4, _mm256_castps256_ps128(f1)); _mm_storeu_ps(o + 20, _mm256_extractf128_ps(f1, 1));
        _mm_storeu_ps(o + 8, _mm256_castps256_ps128(f2)); _mm_storeu_ps(o + 24, _mm256_extractf128_ps(f2, 1));
        _mm_storeu_ps(o + 12, _mm256_castps256_ps128(f3)); _mm_storeu_ps(o + 28, _mm256_extractf128_ps(f3, 1));
    }
}

/* 8-bit codes are int8 levels: widened to fp32 in registers (exact) and scaled, 8 at a time. */
T_AVX2 static void decode8_avx2(const uint8_t *row, const float *scales, int per_group, int64_t n_stored,
                                float *out) {
    for (int64_t k = 0; k < n_stored; k += 8) { /* n_stored and per_group are multiples of 32 */
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k))));
        _mm256_storeu_ps(out + k, _mm256_mul_ps(w, _mm256_set1_ps(scales[k / per_group])));
    }
}

/* 2- and 3-bit codes (docs/format.md "Code packing"): byte j of a block's 2-bit plane holds weights
 * j, j+8, j+16, j+24 in its bit pairs, and the 3-bit block's uint32 high-bit word holds weight i's
 * bit 2 at bit i. Widened to one int32 per lane (lane j = byte j), weights 8q..8q+7 are the pair at
 * bits 2q..2q+1, in natural column order, and `vpermps` is an exact 8-entry fp32 table lookup that
 * reads only the low 3 bits of each index.
 * 2-bit: the 4 levels are repeated in lanes 4-7, so whatever lands in bit 2 selects the same value
 * and `v >> 2q` is the whole decode.
 * 3-bit: the table is reordered to index `pair << 1 | high bit`, so the high bit goes to bit 0, where
 * `min(hi & (1 << (8q + j)), 1)` puts it with two plain ALU ops, and the pair needs one shift (an add
 * for q = 0) and an AND. Shifts and `vpermps` share the two shuffle pipes (AMD Zen), which bound this loop:
 * 3 shifts + 4 `vpermps` + 1 widening per 32 weights (a variable shift per high bit cost 4 more). */
typedef struct { __m256 lut; __m256i bit[4], six, one; } lut23_avx2_t;

T_AVX2 static lut23_avx2_t lut23_avx2_init(const float *lut, int bits) {
    lut23_avx2_t T;
    if (bits == 2) {
        T.lut = _mm256_setr_ps(lut[0], lut[1], lut[2], lut[3], lut[0], lut[1], lut[2], lut[3]);
    } else {
        float r[8]; /* r[pair << 1 | high] = lut[pair | high << 2] */
        for (int i = 0; i < 8; i++) r[i] = lut[(i >> 1) | ((i & 1) << 2)];
        T.lut = _mm256_loadu_ps(r);
    }
    for (int q = 0; q < 4; q++) {
        uint32_t m[8];
        for (int j = 0; j < 8; j++) m[j] = 1u << (8 * q + j);
        T.bit[q] = _mm256_loadu_si256((const __m256i *)m);
    }
    T.six = _mm256_set1_epi32(6);
    T.one = _mm256_set1_epi32(1);
    return T;
}

/* The 32 table values of one block, in column order: w[q] = weights 8q..8q+7. */
__attribute__((target("avx2,fma"), always_inline)) static inline void block23_avx2(
    const uint8_t *b, int bits, const lut23_avx2_t *T, __m256 w[4]) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b));
    if (bits == 2) {
        w[0] = _mm256_permutevar8x32_ps(T->lut, v);
        w[1] = _mm256_permutevar8x32_ps(T->lut, _mm256_srli_epi32(v, 2));
        w[2] = _mm256_permutevar8x32_ps(T->lut, _mm256_srli_epi32(v, 4));
        w[3] = _mm256_permutevar8x32_ps(T->lut, _mm256_srli_epi32(v, 6));
        return;
    }
    uint32_t hi;
    memcpy(&hi, b + 8, 4);
    const __m256i h = _mm256_set1_epi32((int)hi);
#define SQ_HB(q) _mm256_min_epu32(_mm256_and_si256(h, T->bit[q]), T->one)
    w[0] = _mm256_permutevar8x32_ps(T->lut, _mm256_or_si256(_mm256_and_si256(_mm256_add_epi32(v, v), T->six), SQ_HB(0)));
    w[1] = _mm256_permutevar8x32_ps(T->lut, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(v, 1), T->six), SQ_HB(1)));
    w[2] = _mm256_permutevar8x32_ps(T->lut, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(v, 3), T->six), SQ_HB(2)));
    w[3] = _mm256_permutevar8x32_ps(T->lut, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(v, 5), T->six), SQ_HB(3)));
#undef SQ_HB
}

/* Decode (batch > 1, sparse rows): the block's values times the group scale, stored in column order. */
T_AVX2 static void decode23_avx2(const uint8_t *row, int bits, const float *lut, const float *scales,
                                 int per_group, int64_t n_stored, float *out) {
    const lut23_avx2_t T = lut23_avx2_init(lut, bits);
    const int bpb = 4 * bits;
    for (int64_t t = 0; t < n_stored / 32; t++) {
        __m256 w[4];
        if (bits == 2) block23_avx2(row + t * bpb, 2, &T, w);
        else block23_avx2(row + t * bpb, 3, &T, w);
        const __m256 s = _mm256_set1_ps(scales[(t * 32) / per_group]);
        for (int q = 0; q < 4; q++) _mm256_storeu_ps(out + 32 * t + 8 * q, _mm256_mul_ps(w[q], s));
    }
}

/* Batch 1, 2/3-bit dense: lookup and dot in one pass, each group's sum scaled once. */
__attribute__((target("avx2,fma"), always_inline)) static inline float row_dot23_body(
    const uint8_t *row, int bits, const lut23_avx2_t *T, const float *scales, int group, int64_t K, const float *x) {
    const int bpb = 4 * bits, bpg = group / 32;
    __m256 total = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / group; g++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t t = g * bpg; t < (g + 1) * bpg; t++) {
            const uint8_t *b = row + t * bpb;
            _mm_prefetch((const char *)(b + SQ_PREFETCH), _MM_HINT_T0);
            __m256 w[4];
            block23_avx2(b, bits, T, w);
            const float *xk = x + 32 * t;
            a0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xk), a0);
            a1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xk + 8), a1);
            a0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xk + 16), a0);
            a1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xk + 24), a1);
        }
        total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(scales[g]), total);
    }
    return hsum256(total);
}

T_AVX2 static float row_dot2_avx2(const uint8_t *row, const lut23_avx2_t *T, const float *scales, int group,
                                  int64_t K, const float *x) {
    return row_dot23_body(row, 2, T, scales, group, K, x);
}

T_AVX2 static float row_dot3_avx2(const uint8_t *row, const lut23_avx2_t *T, const float *scales, int group,
                                  int64_t K, const float *x) {
    return row_dot23_body(row, 3, T, scales, group, K, x);
}

T_AVX2 static void decode_row_avx2(const uint8_t *row, int bits, const float *lut, const float *scales,
                                   int per_group, int64_t n_stored, float *out) {
    if (bits == 8) { decode8_avx2(row, scales, per_group, n_stored, out); return; }
    if (bits != 4) { decode23_avx2(row, bits, lut, scales, per_group, n_stored, out); return; }
    decode4_pshufb_avx2(row, lut, scales, per_group, n_stored, out);
}

/* Batch 1, 8-bit dense: one pass per row, int8 widened to fp32 and dotted per group, then scaled
 * (SmolLM2's packed 49152 x 576 output head with SQLoRAConfig(head_bits=8): docs/benchmarks.md). */
T_AVX2 static float row_dot8_avx2(const uint8_t *row, const float *scales, int group, int64_t K, const float *x) {
    __m256 total = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < K; g0 += group) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t k = g0; k < g0 + group; k += 16) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(row + k));
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
        }
        total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(scales[g0 / group]), total);
    }
    return hsum256(total);
}

/* Same lookup, two blocks (64 weights) per step from one 32-byte load: lane 0 holds block A's 16
 * bytes, lane 1 block B's, so one shift and two ANDs give all 64 codes. Order per 64 weights:
 * PSHUFB_ORDER64. The scale vector carries block A's scale in lanes 0-3 and B's in 4-7, so groups
 * of 32 work too. */
static const uint8_t PSHUFB_ORDER64[64] = {
    0,  1,  2,  3,  32, 33, 34, 35, 4,  5,  6,  7,  36, 37, 38, 39, 8,  9,  10, 11, 40, 41, 42, 43,
    12, 13, 14, 15, 44, 45, 46, 47, 16, 17, 18, 19, 48, 49, 50, 51, 20, 21, 22, 23, 52, 53, 54, 55,
    24, 25, 26, 27, 56, 57, 58, 59, 28, 29, 30, 31, 60, 61, 62, 63};

static void permute_x64(const float *x, int64_t n, float *xp) {
    int64_t b = 0;
    for (; b + 64 <= n; b += 64)
        for (int p = 0; p < 64; p++) xp[b + p] = x[b + PSHUFB_ORDER64[p]];
    for (; b < n; b += 32)
        for (int p = 0; p < 32; p++) xp[b + p] = x[b + PSHUFB_ORDER[p]];
}


/* 64 weights (two 32-blocks) of one row against xp; a0/a1 get the two halves' partial sums. */
#define DOT4_AVX2_64(T, src, xq, a0, a1)                                                                 \
    do {                                                                                                  \
        _mm_prefetch((const char *)(src) + SQ_PREFETCH, _MM_HINT_T0);                                     \
        const __m256i v_ = _mm256_loadu_si256((const __m256i *)(src));                                    \
        const __m256i lo_ = _mm256_and_si256(v_, (T).m4);                                                 \
        const __m256i hi_ = _mm256_and_si256(_mm256_srli_epi16(v_, 4), (T).m4);                          \
        __m256 f0_, f1_, f2_, f3_, e0_, e1_, e2_, e3_;                                                    \
        LUT4_AVX2_16(T, lo_, f0_, f1_, f2_, f3_);                                                         \
        LUT4_AVX2_16(T, hi_, e0_, e1_, e2_, e3_);                                                         \
        a0 = _mm256_mul_ps(f0_, _mm256_loadu_ps((xq)));                                                   \
        a1 = _mm256_mul_ps(f1_, _mm256_loadu_ps((xq) + 8));                                               \
        a0 = _mm256_fmadd_ps(f2_, _mm256_loadu_ps((xq) + 16), a0);                                        \
        a1 = _mm256_fmadd_ps(f3_, _mm256_loadu_ps((xq) + 24), a1);                                        \
        a0 = _mm256_fmadd_ps(e0_, _mm256_loadu_ps((xq) + 32), a0);                                        \
        a1 = _mm256_fmadd_ps(e1_, _mm256_loadu_ps((xq) + 40), a1);                                        \
        a0 = _mm256_fmadd_ps(e2_, _mm256_loadu_ps((xq) + 48), a0);                                        \
        a1 = _mm256_fmadd_ps(e3_, _mm256_loadu_ps((xq) + 56), a1);                                        \
    } while (0)

T_AVX2 static float row_dot4_pshufb64_avx2(const uint8_t *row, const float *scales, int group, int64_t K,
                                           const float *xp, const lut4_avx2_t *T) {
    __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
    if (group == 32) { /* lanes 0-3 carry block A (scale k/32), lanes 4-7 block B (scale k/32 + 1) */
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            __m256 a0, a1;
            DOT4_AVX2_64(*T, row + k / 2, xp + k, a0, a1);
            const __m256 s = _mm256_set_m128(_mm_set1_ps(scales[(k >> 5) + 1]), _mm_set1_ps(scales[k >> 5]));
            tot0 = _mm256_fmadd_ps(a0, s, tot0);
            tot1 = _mm256_fmadd_ps(a1, s, tot1);
        }
        if (k < K) { /* odd number of 32-blocks: the last one alone */
            __m256 f0, f1, f2, f3;
            LUT4_AVX2_BLOCK(*T, row + k / 2, f0, f1, f2, f3);
            __m256 a0 = _mm256_mul_ps(f0, _mm256_loadu_ps(xp + k));
            __m256 a1 = _mm256_mul_ps(f1, _mm256_loadu_ps(xp + k + 8));
            a0 = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xp + k + 16), a0);
            a1 = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xp + k + 24), a1);
            const __m256 s = _mm256_set1_ps(scales[k >> 5]);
            tot0 = _mm256_fmadd_ps(a0, s, tot0);
            tot1 = _mm256_fmadd_ps(a1, s, tot1);
        }
    } else { /* group >= 64: whole 64-steps inside one group */
        const float *sc = scales;
        for (int64_t g0 = 0; g0 < K; g0 += group, sc++) {
            __m256 a0, a1;
            DOT4_AVX2_64(*T, row + g0 / 2, xp + g0, a0, a1);
            for (int64_t k = g0 + 64; k < g0 + group; k += 64) {
                __m256 b0, b1;
                DOT4_AVX2_64(*T, row + k / 2, xp + k, b0, b1);
                a0 = _mm256_add_ps(a0, b0);
                a1 = _mm256_add_ps(a1, b1);
            }
            const __m256 s = _mm256_set1_ps(*sc);
            tot0 = _mm256_fmadd_ps(a0, s, tot0);
            tot1 = _mm256_fmadd_ps(a1, s, tot1);
        }
    }
    return hsum256(_mm256_add_ps(tot0, tot1));
}

/* Batch-1 4-bit dense with bfloat16-exact table values (format version 2's codebook: the low 16 bits of
 * every fp32 value are zero). Only the two high byte planes are looked up: 2 vpshufb per 32 codes, one
 * byte unpack per 16 of them gives the bf16 words, and each word becomes its fp32 value with a shift
 * (even words) or an AND (odd words): 8 shuffle-port µops per 32 weights instead of 12, same exact
 * products. Measured on the Zen 3 dev VM, 4096x4096 g64, 1 thread, cold weights: 0.93 ms vs 1.39 ms
 * for the 4-plane lookup (docs/kernels_cpu.md). Weight order per 64: BF16_ORDER64 (x is permuted once
 * per call); lanes 0-3 of every vector come from the first 32-block, 4-7 from the second, as above. */
static const uint8_t BF16_ORDER64[64] = {
    0,  2,  4,  6,  32, 34, 36, 38, 1,  3,  5,  7,  33, 35, 37, 39, 8,  10, 12, 14, 40, 42, 44, 46,
    9,  11, 13, 15, 41, 43, 45, 47, 16, 18, 20, 22, 48, 50, 52, 54, 17, 19, 21, 23, 49, 51, 53, 55,
    24, 26, 28, 30, 56, 58, 60, 62, 25, 27, 29, 31, 57, 59, 61, 63};
static const uint8_t BF16_ORDER32[32] = {0, 2, 4,  6,  16, 18, 20, 22, 1, 3, 5,  7,  17, 19, 21, 23,
                                         8, 10, 12, 14, 24, 26, 28, 30, 9, 11, 13, 15, 25, 27, 29, 31};

static void permute_x64_bf16(const float *x, int64_t n, float *xp) {
    int64_t b = 0;
    for (; b + 64 <= n; b += 64)
        for (int p = 0; p < 64; p++) xp[b + p] = x[b + BF16_ORDER64[p]];
    for (; b < n; b += 32)
        for (int p = 0; p < 32; p++) xp[b + p] = x[b + BF16_ORDER32[p]];
}

typedef struct { __m256i lo, hi, m4, top; } lut2_avx2_t;

T_AVX2 static lut2_avx2_t lut2_avx2_init(const float *lut) {
    uint8_t p[2][16];
    for (int e = 0; e < 16; e++) {
        uint32_t u; memcpy(&u, &lut[e], 4);
        p[0][e] = (uint8_t)(u >> 16);
        p[1][e] = (uint8_t)(u >> 24);
    }
    lut2_avx2_t t;
    t.lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p[0]));
    t.hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p[1]));
    t.m4 = _mm256_set1_epi8(15);
    t.top = _mm256_set1_epi32((int)0xFFFF0000u);
    return t;
}

/* 32 codes in nibble bytes `v` -> 32 exact fp32 table values as 4 x 8 floats. */
#define LUT2_AVX2_16(T, v, f0, f1, f2, f3)                                                                 \
    do {                                                                                                  \
        const __m256i lo_ = _mm256_shuffle_epi8((T).lo, v), hi_ = _mm256_shuffle_epi8((T).hi, v);         \
        const __m256i wl_ = _mm256_unpacklo_epi8(lo_, hi_), wh_ = _mm256_unpackhi_epi8(lo_, hi_);         \
        f0 = _mm256_castsi256_ps(_mm256_slli_epi32(wl_, 16));                                             \
        f1 = _mm256_castsi256_ps(_mm256_and_si256(wl_, (T).top));                                         \
        f2 = _mm256_castsi256_ps(_mm256_slli_epi32(wh_, 16));                                             \
        f3 = _mm256_castsi256_ps(_mm256_and_si256(wh_, (T).top));                                         \
    } while (0)

#define DOT2_AVX2_64(T, src, xq, a0, a1)                                                                 \
    do {                                                                                                  \
        _mm_prefetch((const char *)(src) + SQ_PREFETCH, _MM_HINT_T0);                                     \
        const __m256i v_ = _mm256_loadu_si256((const __m256i *)(src));                                    \
        const __m256i cl_ = _mm256_and_si256(v_, (T).m4);                                                 \
        const __m256i ch_ = _mm256_and_si256(_mm256_srli_epi16(v_, 4), (T).m4);                          \
        __m256 f0_, f1_, f2_, f3_, e0_, e1_, e2_, e3_;                                                    \
        LUT2_AVX2_16(T, cl_, f0_, f1_, f2_, f3_);                                                         \
        LUT2_AVX2_16(T, ch_, e0_, e1_, e2_, e3_);                                                         \
        a0 = _mm256_mul_ps(f0_, _mm256_loadu_ps((xq)));                                                   \
        a1 = _mm256_mul_ps(f1_, _mm256_loadu_ps((xq) + 8));                                               \
        a0 = _mm256_fmadd_ps(f2_, _mm256_loadu_ps((xq) + 16), a0);                                        \
        a1 = _mm256_fmadd_ps(f3_, _mm256_loadu_ps((xq) + 24), a1);                                        \
        a0 = _mm256_fmadd_ps(e0_, _mm256_loadu_ps((xq) + 32), a0);                                        \
        a1 = _mm256_fmadd_ps(e1_, _mm256_loadu_ps((xq) + 40), a1);                                        \
        a0 = _mm256_fmadd_ps(e2_, _mm256_loadu_ps((xq) + 48), a0);                                        \
        a1 = _mm256_fmadd_ps(e3_, _mm256_loadu_ps((xq) + 56), a1);                                        \
    } while (0)

T_AVX2 static float row_dot4_bf16_avx2(const uint8_t *row, const float *scales, int group, int64_t K,
                                       const float *xp, const lut2_avx2_t *T) {
    __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
    if (group == 32) { /* lanes 0-3 carry block A (scale k/32), lanes 4-7 block B (scale k/32 + 1) */
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            __m256 a0, a1;
            DOT2_AVX2_64(*T, row + k / 2, xp + k, a0, a1);
            const __m256 s = _mm256_set_m128(_mm_set1_ps(scales[(k >> 5) + 1]), _mm_set1_ps(scales[k >> 5]));
            tot0 = _mm256_fmadd_ps(a0, s, tot0);
            tot1 = _mm256_fmadd_ps(a1, s, tot1);
        }
        if (k < K) { /* odd number of 32-blocks: the last one alone (lane 0: low nibbles, lane 1: high) */
            __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + k / 2)));
            v = _mm256_and_si256(_mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xF0), T->m4);
            __m256 f0, f1, f2, f3;
            LUT2_AVX2_16(*T, v, f0, f1, f2, f3);
            __m256 a0 = _mm256_mul_ps(f0, _mm256_loadu_ps(xp + k));
            __m256 a1 = _mm256_mul_ps(f1, _mm256_loadu_ps(xp + k + 8));
            a0 = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xp + k + 16), a0);
            a1 = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xp + k + 24), a1);
            const __m256 s = _mm256_set1_ps(scales[k >> 5]);
            tot0 = _mm256_fmadd_ps(a0, s, tot0);
            tot1 = _mm256_fmadd_ps(a1, s, tot1);
        }
    } else { /* group >= 64: whole 64-steps inside one group */
        const float *sc = scales;
        for (int64_t g0 = 0; g0 < K; g0 += group, sc++) {
            __m256 a0, a1;
            DOT2_AVX2_64(*T, row + g0 / 2, xp + g0, a0, a1);
            for (int64_t k = g0 + 64; k < g0 + group; k += 64) {
                __m256 b0, b1;
                DOT2_AVX2_64(*T, row + k / 2, xp + k, b0, b1);
                a0 = _mm256_add_ps(a0, b0);
                a1 = _mm256_add_ps(a1, b1);
            }
            const __m256 s = _mm256_set1_ps(*sc);
            tot0 = _mm256_fmadd_ps(a0, s, tot0);
            tot1 = _mm256_fmadd_ps(a1, s, tot1);
        }
    }
    return hsum256(_mm256_add_ps(tot0, tot1));
}

/* Sparse batch 1 without cross-lane permutes. Per call, x is laid out in two arrays (`sparse_x_pq`):
 * for stored vector r of block t (mask bytes j = 8t + r and j' = j + 4)
 *   P = [x cols 8j..8j+3 | x cols 8j'+4..8j'+7],  Q = [x cols 8j+4..8j+7 | x cols 8j'..8j'+3].
 * Lane 0 of the compressed x (the 4 kept columns of j) is pshufb(P, ctl) | pshufb(Q, ctl'), where the
 * controls move the kept low-half columns to the front and the kept high-half ones behind them
 * (0x80 zeroes the rest); lane 1 likewise for j' with the halves swapped. CTLA[m] = [lo(m) | hi(m)]
 * and CTLB[m] = [hi(m) | lo(m)], and one vpblendd per control picks lane 0 from m_j and lane 1 from
 * m_j'. Two in-lane byte shuffles per 8 kept columns instead of two vpermps (4096x4096 g64 on the
 * Zen 3 dev VM: 1.52 ms vs 1.72 ms; the 4-bit dense kernel takes 1.43 ms, so sparse is still not
 * faster: 25 vector loads per 32 kept weights make it load-bound, see docs/kernels_cpu.md). Every mask
 * byte must keep exactly 4 columns (2:4 and 4:8 both do); the row checks it on the side and reports. */
static uint8_t CTLA[256][32], CTLB[256][32];

static void init_ctl_tables(void) {
    for (int m = 0; m < 256; m++) {
        uint8_t lo[16], hi[16];
        int L[4], H[4], nl = 0, nh = 0;
        for (int b = 0; b < 4; b++) if (m >> b & 1) L[nl++] = b;
        for (int b = 4; b < 8; b++) if (m >> b & 1) { if (nh < 4) H[nh++] = b - 4; }
        memset(lo, 0x80, 16);
        memset(hi, 0x80, 16);
        for (int q = 0; q < nl; q++)
            for (int i = 0; i < 4; i++) lo[4 * q + i] = (uint8_t)(4 * L[q] + i);
        for (int q = nl; q < 4 && q - nl < nh; q++)
            for (int i = 0; i < 4; i++) hi[4 * q + i] = (uint8_t)(4 * H[q - nl] + i);
        memcpy(CTLA[m], lo, 16); memcpy(CTLA[m] + 16, hi, 16);
        memcpy(CTLB[m], hi, 16); memcpy(CTLB[m] + 16, lo, 16);
    }
}

static void sparse_x_pq(const float *x, int64_t K, float *xP, float *xQ) {
    for (int64_t t = 0; t < K / 64; t++)
        for (int r = 0; r < 4; r++) {
            const float *a = x + 64 * t + 8 * r, *b = a + 32;
            float *p = xP + 32 * t + 8 * r, *q = xQ + 32 * t + 8 * r;
            for (int i = 0; i < 4; i++) {
                p[i] = a[i]; p[4 + i] = b[4 + i];
                q[i] = a[4 + i]; q[4 + i] = b[i];
            }
        }
}

/* 16 code bytes (one 32-weight block) -> 32 bfloat16-exact table values as 4 x 8 floats in PSHUFB_ORDER
 * (the 4-plane lookup's order, which the sparse x layout below is built for): the two high byte planes
 * are looked up and the bf16 words widened with 16-bit unpacks against zero. 8 shuffle-port µops per
 * 32 weights instead of the 4-plane lookup's 12. */
#define LUT2_AVX2_BLOCK_NAT(T, src, f0, f1, f2, f3)                                                        \
    do {                                                                                                  \
        __m256i v_ = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(src)));                \
        v_ = _mm256_and_si256(_mm256_blend_epi32(v_, _mm256_srli_epi16(v_, 4), 0xF0), (T).m4);            \
        const __m256i lo_ = _mm256_shuffle_epi8((T).lo, v_), hi_ = _mm256_shuffle_epi8((T).hi, v_);       \
        const __m256i wl_ = _mm256_unpacklo_epi8(lo_, hi_), wh_ = _mm256_unpackhi_epi8(lo_, hi_);         \
        const __m256i z_ = _mm256_setzero_si256();                                                        \
        f0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z_, wl_));                                         \
        f1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z_, wl_));                                         \
        f2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z_, wh_));                                         \
        f3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z_, wh_));                                         \
    } while (0)

/* `bf16` is a compile-time constant in each of the two wrappers below (format 2's bfloat16 levels take
 * the 2-plane lookup, format 1's float32 levels the 4-plane one). */
T_AVX2 static inline __attribute__((always_inline)) float
row_dot4_sparse_pq_avx2_impl(const uint8_t *row, const uint8_t *mrow, const float *scales, int per_group,
                             int64_t n_stored, const float *xP, const float *xQ, const lut4_avx2_t *T,
                             const lut2_avx2_t *T2, const int bf16, int *bad_row) {
    __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
    uint64_t bad = 0; /* nonzero if a mask byte does not keep exactly 4 columns (idle ALUs) */
    const int64_t bpg = per_group / 32;
    const float *sc = scales;
    for (int64_t t0 = 0; t0 < n_stored / 32; t0 += bpg, sc++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t t = t0; t < t0 + bpg; t++) {
            __m256 f0, f1, f2, f3;
            if (bf16) LUT2_AVX2_BLOCK_NAT(*T2, row + 16 * t, f0, f1, f2, f3);
            else LUT4_AVX2_BLOCK(*T, row + 16 * t, f0, f1, f2, f3);
            const uint8_t *m = mrow + 8 * t;
            const float *P = xP + 32 * t, *Q = xQ + 32 * t;
            bad |= mask_bytes_bad(m);
#define SQ_XK(r) _mm256_castsi256_ps(_mm256_or_si256(                                                      \
        _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(P + 8 * (r))),                              \
                            _mm256_blend_epi32(_mm256_loadu_si256((const __m256i *)CTLA[m[r]]),               \
                                               _mm256_loadu_si256((const __m256i *)CTLA[m[(r) + 4]]), 0xF0)), \
        _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(Q + 8 * (r))),                              \
                            _mm256_blend_epi32(_mm256_loadu_si256((const __m256i *)CTLB[m[r]]),               \
                                               _mm256_loadu_si256((const __m256i *)CTLB[m[(r) + 4]]), 0xF0))))
            a0 = _mm256_fmadd_ps(f0, SQ_XK(0), a0);
            a1 = _mm256_fmadd_ps(f1, SQ_XK(1), a1);
            a0 = _mm256_fmadd_ps(f2, SQ_XK(2), a0);
            a1 = _mm256_fmadd_ps(f3, SQ_XK(3), a1);
#undef SQ_XK
        }
        const __m256 s = _mm256_set1_ps(*sc);
        tot0 = _mm256_fmadd_ps(a0, s, tot0);
        tot1 = _mm256_fmadd_ps(a1, s, tot1);
    }
    *bad_row = bad != 0;
    return hsum256(_mm256_add_ps(tot0, tot1));
}

T_AVX2 static float row_dot4_sparse_pq_avx2(const uint8_t *row, const uint8_t *mrow, const float *scales,
                                            int per_group, int64_t n_stored, const float *xP, const float *xQ,
                                            const lut4_avx2_t *T, int *bad_row) {
    return row_dot4_sparse_pq_avx2_impl(row, mrow, scales, per_group, n_stored, xP, xQ, T, NULL, 0, bad_row);
}

T_AVX2 static float row_dot4_sparse_pq_bf16_avx2(const uint8_t *row, const uint8_t *mrow, const float *scales,
                                                 int per_group, int64_t n_stored, const float *xP, const float *xQ,
                                                 const lut2_avx2_t *T2, int *bad_row) {
    return row_dot4_sparse_pq_avx2_impl(row, mrow, scales, per_group, n_stored, xP, xQ, NULL, T2, 1, bad_row);
}

/* Opt-in integer-activation batch-1 path (SQ_FLAG_INT_ACT; Python: SQLORA_CPU_INT_ACT=1), 4-bit dense.
 * NOT exact: x is quantized per 64 columns to integers in [-2047, 2047] (12 bits, symmetric, absmax),
 * the 16 table values to int16 with 14 fraction bits (|error| <= 2^-15), and products are summed
 * exactly in int32 (|w| <= 2^14, |x| <= 2^11: 8 products per lane and chunk stay below 2^28), then
 * converted once per 64 columns and scaled by (weight scale x activation scale). The lookup is 2 vpshufb
 * + 2 unpacks per 32 codes (the exact path needs 4 + 8); vpmaddwd does the multiplies.
 * Lane order per 64-chunk (blocks A, B of 32): vector v covers columns [8v..8v+7 | 32+8v..32+8v+7]. */
#define SQ_XQ_MAX 2047.0f
#define SQ_WQ_ONE 16384.0f

static void quantize_x_int(const float *x, int64_t K, int16_t *xq, float *xs) {
    for (int64_t c = 0; c < K / 64; c++) {
        const float *xc = x + 64 * c;
        float amax = 0.0f;
        for (int i = 0; i < 64; i++) { float a = xc[i] < 0 ? -xc[i] : xc[i]; if (a > amax) amax = a; }
        const float s = amax / SQ_XQ_MAX, inv = amax > 0 ? SQ_XQ_MAX / amax : 0.0f;
        xs[c] = s;
        for (int v = 0; v < 4; v++)
            for (int i = 0; i < 16; i++) {
                const int col = i < 8 ? 8 * v + i : 32 + 8 * v + (i - 8);
                float q = xc[col] * inv;
                q = q > SQ_XQ_MAX ? SQ_XQ_MAX : q < -SQ_XQ_MAX ? -SQ_XQ_MAX : q;
                xq[64 * c + 16 * v + i] = (int16_t)(q < 0 ? q - 0.5f : q + 0.5f);
            }
    }
}

typedef struct { __m256i tl, th, m4; } lut4i_avx2_t;

T_AVX2 static lut4i_avx2_t lut4i_avx2_init(const float *lut) {
    uint8_t lo[16], hi[16];
    for (int e = 0; e < 16; e++) {
        float q = lut[e] * SQ_WQ_ONE;
        q = q > 32767.0f ? 32767.0f : q < -32767.0f ? -32767.0f : q;
        const int16_t w = (int16_t)(q < 0 ? q - 0.5f : q + 0.5f);
        lo[e] = (uint8_t)((uint16_t)w & 0xFF);
        hi[e] = (uint8_t)((uint16_t)w >> 8);
    }
    lut4i_avx2_t t;
    t.tl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lo));
    t.th = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)hi));
    t.m4 = _mm256_set1_epi8(15);
    return t;
}

/* sum over one 64-chunk of int16 weight level x int16 activation, as 8 int32 lanes (A: 0-3, B: 4-7) */
T_AVX2 static inline __m256i chunk_dot_int_avx2(const uint8_t *src, const int16_t *xq, const lut4i_avx2_t *T) {
    _mm_prefetch((const char *)src + SQ_PREFETCH, _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256((const __m256i *)src);
    const __m256i lo = _mm256_and_si256(v, T->m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), T->m4);
    const __m256i l0 = _mm256_shuffle_epi8(T->tl, lo), h0 = _mm256_shuffle_epi8(T->th, lo);
    const __m256i l1 = _mm256_shuffle_epi8(T->tl, hi), h1 = _mm256_shuffle_epi8(T->th, hi);
    const __m256i *xv = (const __m256i *)xq;
    __m256i a = _mm256_madd_epi16(_mm256_unpacklo_epi8(l0, h0), _mm256_loadu_si256(xv));
    __m256i b = _mm256_madd_epi16(_mm256_unpackhi_epi8(l0, h0), _mm256_loadu_si256(xv + 1));
    a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_unpacklo_epi8(l1, h1), _mm256_loadu_si256(xv + 2)));
    b = _mm256_add_epi32(b, _mm256_madd_epi16(_mm256_unpackhi_epi8(l1, h1), _mm256_loadu_si256(xv + 3)));
    return _mm256_add_epi32(a, b);
}

T_AVX2 static float row_dot4_int_avx2(const uint8_t *row, const float *scales, int group, int64_t K,
                                      const int16_t *xq, const float *xs, const lut4i_avx2_t *T) {
    __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
    if (group == 32) {
        for (int64_t c = 0; c < K / 64; c++) {
            const __m256 f = _mm256_cvtepi32_ps(chunk_dot_int_avx2(row + 32 * c, xq + 64 * c, T));
            const __m256 s = _mm256_set_m128(_mm_set1_ps(scales[2 * c + 1] * xs[c]), _mm_set1_ps(scales[2 * c] * xs[c]));
            if (c & 1) tot1 = _mm256_fmadd_ps(f, s, tot1); else tot0 = _mm256_fmadd_ps(f, s, tot0);
        }
    } else {
        const int64_t cpg = group / 64;
        int64_t c = 0;
        for (int64_t g = 0; g < K / group; g++) {
            const float sw = scales[g];
            for (int64_t e = c + cpg; c < e; c++) {
                const __m256 f = _mm256_cvtepi32_ps(chunk_dot_int_avx2(row + 32 * c, xq + 64 * c, T));
                if (c & 1) tot1 = _mm256_fmadd_ps(f, _mm256_set1_ps(sw * xs[c]), tot1);
                else tot0 = _mm256_fmadd_ps(f, _mm256_set1_ps(sw * xs[c]), tot0);
            }
        }
    }
    return hsum256(_mm256_add_ps(tot0, tot1)) * (1.0f / SQ_WQ_ONE);
}

T_AVX2 static int gemv4_int_avx2(int n_threads, const float *x, int64_t N, int64_t K, int group,
                                 const uint8_t *codes, const float *scales, const float *lut,
                                 const float *t, const float *L, int64_t rank, const float *bias, float *y) {
    const lut4i_avx2_t T = lut4i_avx2_init(lut);
    int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * (size_t)K + sizeof(float) * (size_t)(K / 64 + 1));
    if (!xq) return SQ_ENOMEM;
    float *xs = (float *)(void *)(xq + K); /* K is a multiple of 64: 4-byte aligned */
    quantize_x_int(x, K, xq, xs);
    const int64_t spr = K / group;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t n = 0; n < N; n++) {
        float acc = row_dot4_int_avx2(codes + n * (K / 2), scales + n * spr, group, K, xq, xs, &T);
        if (bias) acc += bias[n];
        if (rank > 0) acc += dot_avx2(t, L + n * rank, rank);
        y[n] = acc;
    }
    free(xq);
    return SQ_OK;
}

/* Opt-in 8-bit-activation batch-1 path (SQ_FLAG_INT8_ACT; Python: SQLORA_CPU_INT_ACT=8), 4-bit dense.
 * NOT exact, and coarser than the 12-bit path above, in exchange for the cheapest inner loop AVX2 has:
 *   - x and the table as in `quantize_x_int8` / `int8_levels` (int8 x per 32 columns, as llama.cpp's
 *     Q8_0; levels m on a 129-step grid, which moves a weight by at most 1/128 of its group's scale),
 *     the levels stored offset by 64 as unsigned bytes u = m + 64 in [0, 128];
 *   - vpmaddubsw multiplies 32 (u, x) byte pairs and adds neighbours: |u x + u' x'| <= 2 * 128 * 127
 *     < 2^15, so it never saturates, and because u >= 0 no sign fix-up is needed;
 *   - the offset is removed once per block: sum(m x) = sum(u x) - 64 sum(x), and 64 sum(x) times the
 *     block's scale is computed per call (`corr`), so a row pays one scalar FMA per weight group.
 * Per 64 weights: 1 load, 2 vpshufb, 2 vpmaddubsw, 2 vpmaddwd, 1 add, 1 conversion, 1 FMA, against 8
 * vpshufb + 16 unpacks for the exact lookup. x is interleaved (`quantize_x_int8`) so lane 0 of every
 * vector is block A of a 64-column chunk and lane 1 block B. */
/* one 64-column chunk: 8 int32 partial sums of u x, lanes 0-3 block A, 4-7 block B */
T_AVX2 static inline __m256i chunk_dot_int8_avx2(const uint8_t *src, const int8_t *xq, __m256i table, __m256i m4,
                                                 __m256i ones) {
    _mm_prefetch((const char *)src + SQ_PREFETCH, _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256((const __m256i *)src);
    const __m256i ul = _mm256_shuffle_epi8(table, _mm256_and_si256(v, m4));
    const __m256i uh = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
    const __m256i pl = _mm256_maddubs_epi16(ul, _mm256_loadu_si256((const __m256i *)xq));
    const __m256i ph = _mm256_maddubs_epi16(uh, _mm256_loadu_si256((const __m256i *)(xq + 32)));
    return _mm256_add_epi32(_mm256_madd_epi16(pl, ones), _mm256_madd_epi16(ph, ones));
}

/* xsv: per 64-column chunk, the two blocks' activation scales as [A x4 | B x4] (table factor folded in);
 * corr: per weight group, sum over its blocks of (block scale) * 64 * sum(x), the offset the unsigned
 * levels added, removed with one dot product per row at the end. */
T_AVX2 static float row_dot4_int8_avx2(const uint8_t *row, const float *scales, int group, int64_t K,
                                       const int8_t *xq, const float *xsv, const float *corr, __m256i table) {
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
    const int64_t nc = K / 64;
    if (group == 32) {
        for (int64_t c = 0; c < nc; c++) {
            const __m256 f = _mm256_cvtepi32_ps(chunk_dot_int8_avx2(row + 32 * c, xq + 64 * c, table, m4, ones));
            const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xsv + 8 * c),
                                           _mm256_set_m128(_mm_set1_ps(scales[2 * c + 1]), _mm_set1_ps(scales[2 * c])));
            if (c & 1) tot1 = _mm256_fmadd_ps(f, s, tot1); else tot0 = _mm256_fmadd_ps(f, s, tot0);
        }
    } else { /* group >= 64: every chunk lies in one group; two chunks per step, two accumulators */
        const int cshift = group == 64 ? 0 : group == 128 ? 1 : group == 256 ? 2 : -1;
        int64_t c = 0;
        for (; c + 2 <= nc; c += 2) {
            const float s0 = scales[cshift >= 0 ? c >> cshift : c / (group / 64)];
            const float s1 = scales[cshift >= 0 ? (c + 1) >> cshift : (c + 1) / (group / 64)];
            const __m256 f0 = _mm256_cvtepi32_ps(chunk_dot_int8_avx2(row + 32 * c, xq + 64 * c, table, m4, ones));
            const __m256 f1 = _mm256_cvtepi32_ps(chunk_dot_int8_avx2(row + 32 * c + 32, xq + 64 * c + 64, table, m4, ones));
            tot0 = _mm256_fmadd_ps(f0, _mm256_mul_ps(_mm256_loadu_ps(xsv + 8 * c), _mm256_set1_ps(s0)), tot0);
            tot1 = _mm256_fmadd_ps(f1, _mm256_mul_ps(_mm256_loadu_ps(xsv + 8 * c + 8), _mm256_set1_ps(s1)), tot1);
        }
        if (c < nc) {
            const float s0 = scales[c / (group / 64)];
            const __m256 f0 = _mm256_cvtepi32_ps(chunk_dot_int8_avx2(row + 32 * c, xq + 64 * c, table, m4, ones));
            tot0 = _mm256_fmadd_ps(f0, _mm256_mul_ps(_mm256_loadu_ps(xsv + 8 * c), _mm256_set1_ps(s0)), tot0);
        }
    }
    return hsum256(_mm256_add_ps(tot0, tot1)) - dot_avx2(scales, corr, K / group);
}

T_AVX2 static int gemv4_int8_avx2(int n_threads, const float *x, int64_t N, int64_t K, int group,
                                  const uint8_t *codes, const float *scales, const float *lut,
                                  const float *t, const float *L, int64_t rank, const float *bias, float *y) {
    int8_t m[16];
    uint8_t u[16];
    const float lscale = int8_levels(lut, m);
    for (int e = 0; e < 16; e++) u[e] = (uint8_t)(m[e] + (int)SQ_L8_MAX); /* unsigned: see above */
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)u));
    /* one buffer: xq (K bytes), then per 32-block its scale, sum(x) and offset, then the chunk scale
     * vectors (8 floats per 64 columns) */
    const int64_t nb = K / 32;
    int8_t *xq = (int8_t *)malloc((size_t)K + sizeof(float) * (size_t)(3 * nb + K / 8 + 1));
    if (!xq) return SQ_ENOMEM;
    float *xs = (float *)(void *)(xq + K); /* K is a multiple of 64: 4-byte aligned */
    int32_t *xsum = (int32_t *)(void *)(xs + nb);
    float *corr = (float *)(void *)(xsum + nb), *xsv = corr + nb;
    quantize_x_int8(x, K, 1, xq, xs, xsum);
    for (int64_t b = 0; b < nb; b++) { xs[b] *= lscale; corr[b] = xs[b] * SQ_L8_MAX * (float)xsum[b]; }
    for (int64_t c = 0; c < K / 64; c++)
        for (int i = 0; i < 4; i++) { xsv[8 * c + i] = xs[2 * c]; xsv[8 * c + 4 + i] = xs[2 * c + 1]; }
    if (group > 32) { /* one offset per weight group: sum its blocks' */
        const int64_t bpg = group / 32;
        for (int64_t g = 0; g < K / group; g++) {
            float sum = 0.0f;
            for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) sum += corr[b];
            corr[g] = sum;
        }
    }
    const int64_t spr = K / group;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t n = 0; n < N; n++) {
        float acc = row_dot4_int8_avx2(codes + n * (K / 2), scales + n * spr, group, K, xq, xsv, corr, table);
        if (bias) acc += bias[n];
        if (rank > 0) acc += dot_avx2(t, L + n * rank, rank);
        y[n] = acc;
    }
    free(xq);
    return SQ_OK;
}

/* Batch 1, 4-bit dense, AVX-512: "nibble lanes". 64 code bytes (4 blocks, 128 weights) are loaded as 16
 * dwords, and vector j (0..7) is the table looked up at (v >> 4j): vpermps reads only bits 0-3 of each
 * index, so no AND and no widening is needed. The former row (one vpmovzxbd per 16 codes, then vpermps)
 * was bound by those widenings on the shuffle pipes: with weights in cache this one is 1.4x faster on the
 * AVX-512 (Zen 4) VM of 2026-12-04, from DRAM 1.16-1.32x (docs/kernels_cpu.md). Exact for any float32
 * table (format 1 and 2 alike). Lane l of vector j holds nibble j of dword l, i.e. weight
 * 32(l/4) + 4(l%4) + (j>>1) + 16(j&1) of the chunk (the format's block layout), so x is permuted to that
 * order once per call (`permute_x_nib`) and every lane of 128-bit lane q carries block q's scale.
 * For long rows (K >= 6144) rows are taken four at a time so that each x load serves four rows: at
 * K = 11008 x (44 KB) does not fit L1, and one row at a time streamed it from L2 for every row. */
static void permute_x_nib(const float *x, int64_t K, float *xp) {
    int64_t c = 0;
    for (; c + 128 <= K; c += 128)
        for (int j = 0; j < 8; j++)
            for (int l = 0; l < 16; l++) xp[c + 16 * j + l] = x[c + 32 * (l / 4) + 4 * (l % 4) + (j >> 1) + 16 * (j & 1)];
    for (; c < K; c++) xp[c] = x[c]; /* the last 1-3 blocks keep the natural order */
}

/* the scale of each lane's block for the chunk at column k: lanes 4i..4i+3 belong to block i */
T_AVX512 static inline __attribute__((always_inline)) __m512 nib_scales(const float *srow, int64_t k, int group) {
    if (group >= 128) return _mm512_set1_ps(srow[k / group]);
    if (group == 64) /* blocks 0-1 | 2-3 */
        return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                     _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(srow + k / 64)))));
    return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), /* group 32 */
                                 _mm512_castps128_ps512(_mm_loadu_ps(srow + k / 32)));
}

/* The bias and the low-rank term of output (m, n), once its dot product is done. */
T_AVX512 static inline __attribute__((always_inline)) float
finish_avx512(float v, int64_t m, int64_t n, const float *bias, const float *t, const float *L, int64_t rank) {
    if (bias) v += bias[n];
    if (rank > 0) v += dot_avx512(t + m * rank, L + n * rank, rank);
    return v;
}

/* Outputs (m0 + j, n0 + r) of an R x mb block of the small-batch kernels, from acc[r * mb + j]. */
T_AVX512 static inline __attribute__((always_inline)) void
store_block_avx512(float *y, const float *acc, int R, int mb, int64_t m0, int64_t n0, int64_t N, const float *bias,
                   const float *t, const float *L, int64_t rank) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < mb; j++)
            y[(m0 + j) * N + n0 + r] = finish_avx512(acc[r * mb + j], m0 + j, n0 + r, bias, t, L, rank);
}

/* R consecutive weight rows (codes at stride K/2, scales at K/group) against MB rows of permuted x
 * (stride K): out[r * MB + m]. R x MB is 4x1 (long rows at batch 1: each x load serves 4 rows), or
 * R x MB for R = 1, 2 and MB = 1, 2, 4 (small batches: one weight row's lookups serve MB rows of x, each x
 * load serves R weight rows, and the weights are never stored decoded). R, MB and group are compile-time constants in every caller (`nib_block`): with
 * a run-time group the scale index cost an integer division per chunk. */
T_AVX512 static inline __attribute__((always_inline)) void
nib_block_avx512(const uint8_t *row, const float *scales, const __m512 table, int group, int64_t K,
                 const float *xp, float *out, const int R, const int MB) {
    const int64_t rs = K / 2, ss = K / group;
    __m512 tot[8];
#pragma GCC unroll 8
    for (int i = 0; i < R * MB; i++) tot[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        __m512i v[4];
        __m512 a0[8], a1[8];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(row + r * rs + k / 2) + 4 * rs, _MM_HINT_T0); /* 4 rows on */
            v[r] = _mm512_loadu_si512((const void *)(row + r * rs + k / 2));
        }
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) { /* j = 0, 1 start the two accumulators with a product */
            __m512 w[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) w[r] = _mm512_permutexvar_ps(j ? _mm512_srli_epi32(v[r], 4 * j) : v[r], table);
#pragma GCC unroll 4
            for (int m = 0; m < MB; m++) {
                const __m512 xv = _mm512_loadu_ps(xp + m * K + k + 16 * j);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const int i = r * MB + m;
                    if (j == 0) a0[i] = _mm512_mul_ps(w[r], xv);
                    else if (j == 1) a1[i] = _mm512_mul_ps(w[r], xv);
                    else if (j & 1) a1[i] = _mm512_fmadd_ps(w[r], xv, a1[i]);
                    else a0[i] = _mm512_fmadd_ps(w[r], xv, a0[i]);
                }
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m512 sv = nib_scales(scales + r * ss, k, group);
#pragma GCC unroll 4
            for (int m = 0; m < MB; m++) {
                const int i = r * MB + m;
                tot[i] = _mm512_fmadd_ps(_mm512_add_ps(a0[i], a1[i]), sv, tot[i]);
            }
        }
    }
    const __m128i m4 = _mm_set1_epi8(15);
    for (; k < K; k += 32) /* 1-3 trailing blocks of 32, x in natural order */
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(row + r * rs + k / 2));
            const __m512 wl = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, m4)), table);
            const __m512 wh = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m4)), table);
            const __m512 sv = _mm512_set1_ps(scales[r * ss + k / group]);
#pragma GCC unroll 4
            for (int m = 0; m < MB; m++) {
                const float *xk = xp + m * K + k;
                const __m512 p = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xk + 16), _mm512_mul_ps(wl, _mm512_loadu_ps(xk)));
                tot[r * MB + m] = _mm512_fmadd_ps(p, sv, tot[r * MB + m]);
            }
        }
#pragma GCC unroll 8
    for (int i = 0; i < R * MB; i++) out[i] = _mm512_reduce_add_ps(tot[i]);
}

T_AVX512 static void nib_block(const uint8_t *row, const float *scales, const __m512 table, int group, int64_t K,
                               const float *xp, float *out, int R, int MB) {
#define SQ_NIB_R(G, RR) (MB == 4 ? nib_block_avx512(row, scales, table, G, K, xp, out, RR, 4) \
                         : MB == 2 ? nib_block_avx512(row, scales, table, G, K, xp, out, RR, 2) \
                                   : nib_block_avx512(row, scales, table, G, K, xp, out, RR, 1))
#define SQ_NIB(G) (R == 4 ? nib_block_avx512(row, scales, table, G, K, xp, out, 4, 1) \
                   : R == 2 ? SQ_NIB_R(G, 2) : SQ_NIB_R(G, 1))
    switch (group) {
    case 32: SQ_NIB(32); break;
    case 64: SQ_NIB(64); break;
    case 128: SQ_NIB(128); break;
    default: SQ_NIB(256); break; /* linear_impl admits only 32, 64, 128, 256 */
    }
#undef SQ_NIB
#undef SQ_NIB_R
}

/* Batches 1..SQ_SMALL_M, 4-bit dense. Each row of x is permuted once per call. At batch 1, long rows
 * (K >= 6144) go in fours: with x (4K bytes) in L1, four interleaved row streams were slower from DRAM
 * than one (0.80x at 4096 x 4096), at K = 11008 1.40x faster. At larger batches pairs of weight rows meet
 * the batch in blocks of 4, 2 and 1 rows of x. */
T_AVX512 static int gemm4_avx512(int n_threads, const float *x, int64_t M, int64_t N, int64_t K, int group,
                                 const uint8_t *codes, const float *scales, const float *lut, const float *t,
                                 const float *L, int64_t rank, const float *bias, float *y) {
    float *xp = (float *)malloc(sizeof(float) * (size_t)(M * K));
    if (!xp) return SQ_ENOMEM;
    for (int64_t m = 0; m < M; m++) permute_x_nib(x + m * K, K, xp + m * K);
    const __m512 table = _mm512_loadu_ps(lut);
    /* Weight rows go in blocks of RB, so that each x load serves RB rows: 4 for long rows at batch 1, and
     * pairs at batches of 2+ (pairs vs single rows, 1 thread, cold weights, 2026-12-07: 1.3-1.8x faster at
     * batches 4 and 6, 1.0-1.4x at batch 2; docs/kernels_cpu.md); then single rows. */
    const int RB = M == 1 ? (K >= 6144 ? 4 : 1) : 2;
    const int64_t blocks = N / RB, units = blocks + (N - RB * blocks);
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t u = 0; u < units; u++) {
        const int R = u < blocks ? RB : 1;
        const int64_t n0 = u < blocks ? RB * u : RB * blocks + (u - blocks);
        const uint8_t *row = codes + n0 * (K / 2);
        const float *srow = scales + n0 * (K / group);
        float acc[8]; /* R x mb <= 8 */
        for (int64_t m0 = 0; m0 < M;) {
            const int mb = R == 4 ? 1 : M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;
            nib_block(row, srow, table, group, K, xp + m0 * K, acc, R, mb);
            store_block_avx512(y, acc, R, mb, m0, n0, N, bias, t, L, rank);
            m0 += mb;
        }
    }
    free(xp);
    return SQ_OK;
}

/* Batches 1-6, 4-bit 2:4 and 4:8 (both keep exactly 4 of every 8 columns), AVX-512 VBMI2 (Ice Lake, Zen 4 and
 * later), when the table has an exact zero (every normal-float codebook does): the 32 stored codes of a
 * 64-column block (16 code bytes, 8 mask bytes) are laid out as bytes (a broadcast load, a shift, a blend
 * and an AND) and spread to their columns by one `vpexpandb` under the 64-bit mask, pruned columns getting
 * the zero level's code. The row then runs like a dense one: dword lane l of vector j (the expanded bytes
 * shifted right by 8j; `vpermps` reads bits 0-3) is column 4l + j, so x is permuted to that order once per
 * call; four lookups and four FMAs per 64 columns. Every read stays inside the row whatever the mask holds;
 * a mask byte that does not keep exactly 4 columns marks the row bad (`mask_bytes_bad`, as in the AVX2 row).
 * Tried and dropped: looking the kept weights up in stored order and moving them with four `vexpandps`
 * (nine shuffles per 64 columns: 1.4x the old row's speed where this one gives 1.5-1.7x), and rows in
 * fours to share x loads at long K (no faster: the expand and the lookups bound it, not x). Groups are
 * multiples of 64 columns for sparse layers. */
#define T_VBMI2 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx2,fma")))

static int cpu_has_vbmi2(void) { return __builtin_cpu_supports("avx512vbmi2"); }

static void permute_x_bytes(const float *x, int64_t K, float *xp) { /* xp[64c + 16j + l] = x[64c + 4l + j] */
    for (int64_t c = 0; c < K; c += 64)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 16; l++) xp[c + 16 * j + l] = x[c + 4 * l + j];
}

/* One row against MB rows of permuted x (row stride K; MB = 1, 2 or 4, a compile-time constant): out[m]. */
T_VBMI2 static inline __attribute__((always_inline)) void
row_dot4_sparse_vbmi2(const uint8_t *row, const uint8_t *mrow, const float *srow, const __m512 table,
                      const __m512i zfill, int group, int64_t K, const float *xp, float *out, int *bad_row,
                      const int MB) {
    __m512 tot[4];
#pragma GCC unroll 4
    for (int m = 0; m < MB; m++) tot[m] = _mm512_setzero_ps();
    uint64_t bad = 0;
    const __m256i m4 = _mm256_set1_epi8(15);
    const int64_t cpg = group / 64;
    for (int64_t c0 = 0; c0 < K / 64; c0 += cpg) {
        __m512 a0[4], a1[4];
#pragma GCC unroll 4
        for (int m = 0; m < MB; m++) a0[m] = a1[m] = _mm512_setzero_ps();
        for (int64_t c = c0; c < c0 + cpg; c++) {
            __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + 16 * c)));
            b = _mm256_and_si256(_mm256_blend_epi32(b, _mm256_srli_epi16(b, 4), 0xF0), m4); /* stored weights 0..31 */
            uint64_t mk;
            memcpy(&mk, mrow + 8 * c, 8);
            bad |= mask_bytes_bad(mrow + 8 * c);
            const __m512i v = _mm512_mask_expand_epi8(zfill, (__mmask64)mk, _mm512_castsi256_si512(b));
            const __m512 w0 = _mm512_permutexvar_ps(v, table), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), table);
            const __m512 w2 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), table);
            const __m512 w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), table);
#pragma GCC unroll 4
            for (int m = 0; m < MB; m++) {
                const float *xc = xp + m * K + 64 * c;
                a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xc), a0[m]);
                a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xc + 16), a1[m]);
                a0[m] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xc + 32), a0[m]);
                a1[m] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xc + 48), a1[m]);
            }
        }
        const __m512 sv = _mm512_set1_ps(srow[c0 / cpg]);
#pragma GCC unroll 4
        for (int m = 0; m < MB; m++) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(a0[m], a1[m]), sv, tot[m]);
    }
    *bad_row = bad != 0;
#pragma GCC unroll 4
    for (int m = 0; m < MB; m++) out[m] = _mm512_reduce_add_ps(tot[m]);
}

/* Batches 1..SQ_SMALL_M: each weight row is decoded once for blocks of 4, 2 and 1 rows of x. */
T_VBMI2 static int gemm4_sparse_vbmi2(int n_threads, const float *x, int64_t M, int64_t N, int64_t K, int group,
                                      int zero_code, const uint8_t *codes, const float *scales, const uint8_t *mask,
                                      const float *lut, const float *t, const float *L, int64_t rank, const float *bias,
                                      float *y) {
    float *xp = (float *)malloc(sizeof(float) * (size_t)(M * K));
    if (!xp) return SQ_ENOMEM;
    for (int64_t m = 0; m < M; m++) permute_x_bytes(x + m * K, K, xp + m * K);
    const __m512 table = _mm512_loadu_ps(lut);
    const __m512i zfill = _mm512_set1_epi8((char)zero_code);
    const int64_t rb = K / 4, spr = K / group;
    int bad_mask = 0;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M;) {
            const int mb = M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;
            float acc[4];
            int bad_row;
#define SQ_RS(MB) row_dot4_sparse_vbmi2(codes + n * rb, mask + n * (K / 8), scales + n * spr, table, zfill, group, K, \
                                        xp + m0 * K, acc, &bad_row, MB)
            if (mb == 4) SQ_RS(4); else if (mb == 2) SQ_RS(2); else SQ_RS(1);
#undef SQ_RS
            if (bad_row) { /* wrong numbers only (every read stays inside the row), but an error */
                #pragma omp atomic write
                bad_mask = 1;
                break;
            }
            store_block_avx512(y, acc, 1, mb, m0, n, N, bias, t, L, rank);
            m0 += mb;
        }
    }
    free(xp);
    return bad_mask ? SQ_EBADLEN : SQ_OK;
}

/* The index of an exact zero in a 16-entry table, or -1. */
static int zero_code(const float *lut) {
    for (int i = 0; i < 16; i++)
        if (lut[i] == 0.0f) return i;
    return -1;
}

/* Batches of bfloat16 activations, 4-bit dense, AVX-512 BF16 (Zen 4, Sapphire Rapids): `vdpbf16ps` does
 * 32 multiply-adds per instruction, twice as many as an fp32 FMA, which is what torch's own bf16
 * F.linear uses; the exact fp32 kernels cannot beat it at batch 16 (docs/kernels_cpu.md). Taken when
 * every x value is a bfloat16 (a bf16 model: flag SQ_FLAG_BF16_X) and the table is bfloat16-exact
 * (format 2's codebook), so every product is exact and only the fp32 summation order differs from the
 * float32 reference (the reference backend itself rounds the weights to bf16 for bf16 inputs).
 * fp32 x (batches of more than SQ_SMALL_M rows, unless SQ_FLAG_EXACT) is split into two bf16 terms,
 * x = hi + lo + e with |e| <= 2^-18 |x| (`split16_avx512`), and both terms meet the same looked-up weights:
 * twice the dot products, still 1.2-1.6x faster than the fp32 kernels at batches 7-24, ~2.5e-6
 * relative error on the outputs (the fp32 kernels: ~1e-7; the issue's bound for the default: 1e-4).
 * Batches of 3..SQ_SMALL_M rows take the exact row-pair kernel instead, which is no slower there.
 *
 * Layout: lanes are 16 weight rows (a panel), not columns, so no horizontal sums are needed and a
 * group's scale is one vector (one FMA per group and batch row). The panel's codes are loaded 64
 * columns at a time and transposed (`transpose16x8`), so that vector d holds dword d (8 nibbles) of
 * every row. Pair q (0..3) of a dword is its nibbles q and q + 4, the low bits of its two words after
 * one `vpsrlw` by 4q; one `vpermw` looks both up in the bf16 table (duplicated to 32 entries: vpermw
 * reads 5 index bits), giving 16 rows x 2 weights, which one `vdpbf16ps` per batch row multiplies with
 * that row's broadcast x pair, permuted to match once per call (`pairs_x_bf16`). On Zen 4 the shifts,
 * lookups and transposes run beside the vdpbf16ps (a `vpmultishiftqb` in their place did not: it shares
 * the dot product's pipe and cost 30 % at batch 8). */
#define SQ_BF16_ACCS(MB) ((MB) <= 2 ? 4 : (MB) <= 4 ? 2 : 1)
#define T_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

static int cpu_has_bf16(void) { return __builtin_cpu_supports("avx512bf16"); }

static inline uint16_t bf16_round(float f) { /* round to nearest even (finite x) */
    uint32_t u; memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* xp[(4d + q) T + u]: term u (T = 1: x itself; T = 2: hi, lo) of the x pair of dword d's nibbles q and
 * q + 4 (bf16, low word first). Nibble i of dword d is weight base + i/2 + 16(i&1), base = 32(d/4) +
 * 4(d%4) (the format's block layout). This is T = 1, where every x is a bfloat16 (SQ_FLAG_BF16_X) and its
 * top 16 bits are that value; T = 2 is `pairs_x_split_avx512`. */
static void pairs_x_bf16(const float *x, int64_t K, uint32_t *xp) {
    for (int64_t d = 0; d < K / 8; d++) {
        const int64_t base = 32 * (d / 4) + 4 * (d % 4);
        for (int q = 0; q < 4; q++) {
            const int64_t k = base + (q >> 1) + 16 * (q & 1);
            uint32_t u0, u1;
            memcpy(&u0, x + k, 4);
            memcpy(&u1, x + k + 2, 4);
            xp[4 * d + q] = (u0 >> 16) | (u1 & 0xFFFF0000u);
        }
    }
}

/* Lane l of a panel holds row SQ_PI(l): rows 0-3, 8-11, 4-7, 12-15, the order the transpose below
 * leaves them in (it saves one shuffle per vector). */
#define SQ_PI(l) ((l) ^ ((((l) >> 2) ^ ((l) >> 3)) & 1) * 12)

/* Dwords d0 .. d0+7 of 16 rows (row r at codes + r*rb) as 8 vectors, vector j lane l = dword d0+j of
 * row SQ_PI(l): a 16 x 8 transpose in 32 shuffles (two rows per register, then 4 x 4 within 128-bit
 * lanes, then one lane shuffle). */
T_BF16 static inline __attribute__((always_inline)) void
transpose16x8(const uint8_t *codes, int64_t rb, int64_t d0, __m512i V[8]) {
    __m512i a[8], t[8];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(codes + i * rb + 4 * d0))),
                                  _mm256_loadu_si256((const __m256i *)(codes + (i + 8) * rb + 4 * d0)), 1);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
    }
    /* u[e] (e = element 0-3 of a 128-bit lane) for rows 0-3 and, below, rows 4-7 */
    const __m512i u0 = _mm512_unpacklo_epi64(t[0], t[2]), u1 = _mm512_unpackhi_epi64(t[0], t[2]);
    const __m512i u2 = _mm512_unpacklo_epi64(t[1], t[3]), u3 = _mm512_unpackhi_epi64(t[1], t[3]);
    const __m512i u4 = _mm512_unpacklo_epi64(t[4], t[6]), u5 = _mm512_unpackhi_epi64(t[4], t[6]);
    const __m512i u6 = _mm512_unpacklo_epi64(t[5], t[7]), u7 = _mm512_unpackhi_epi64(t[5], t[7]);
    /* lanes of u: [d e | d e+4 | d e (rows +8) | d e+4 (rows +8)]; pick lanes 0, 2 (dword e) or 1, 3 (e+4) */
    V[0] = _mm512_shuffle_i32x4(u0, u4, 0x88); V[4] = _mm512_shuffle_i32x4(u0, u4, 0xDD);
    V[1] = _mm512_shuffle_i32x4(u1, u5, 0x88); V[5] = _mm512_shuffle_i32x4(u1, u5, 0xDD);
    V[2] = _mm512_shuffle_i32x4(u2, u6, 0x88); V[6] = _mm512_shuffle_i32x4(u2, u6, 0xDD);
    V[3] = _mm512_shuffle_i32x4(u3, u7, 0x88); V[7] = _mm512_shuffle_i32x4(u3, u7, 0xDD);
}

/* Pair q (0..3) of every lane's dword v, looked up: 16 rows x 2 bf16 weights (nibbles q and q + 4). */
T_BF16 static inline __attribute__((always_inline)) __m512i bf16_pair(const __m512i v, int q, const __m512i table) {
    return _mm512_permutexvar_epi16(q ? _mm512_srli_epi16(v, 4 * q) : v, table);
}

/* Lane l's row (SQ_PI(l)) times `stride`, for the gathers. */
T_BF16 static inline __attribute__((always_inline)) __m512i bf16_lane_offsets(int64_t stride) {
    const __m512i pi = _mm512_setr_epi32(SQ_PI(0), SQ_PI(1), SQ_PI(2), SQ_PI(3), SQ_PI(4), SQ_PI(5), SQ_PI(6),
                                         SQ_PI(7), SQ_PI(8), SQ_PI(9), SQ_PI(10), SQ_PI(11), SQ_PI(12), SQ_PI(13),
                                         SQ_PI(14), SQ_PI(15));
    return _mm512_mullo_epi32(pi, _mm512_set1_epi32((int)stride));
}

/* Pair q of dword d (w: 16 rows x 2 weights) against MB rows of paired x, T terms each. A = 8 / MB
 * accumulators per row of x (term u of pair q goes to acc[m * A + (qT + u) % A]): a vdpbf16ps waits for
 * the one before it on the same accumulator (latency ~6 cycles), so fewer than ~8 chains leave the unit
 * idle. */
T_BF16 static inline __attribute__((always_inline)) void
bf16_dots(const __m512bh w, int64_t d, int q, int64_t K, const uint32_t *xp, __m512 acc[16], const int MB,
          const int T) {
    const int A = SQ_BF16_ACCS(MB);
#pragma GCC unroll 8
    for (int m = 0; m < MB; m++)
#pragma GCC unroll 2
        for (int u = 0; u < T; u++) {
            const int i = m * A + (q * T + u) % A;
            acc[i] = _mm512_dpbf16_ps(acc[i], w,
                                      (__m512bh)_mm512_set1_epi32((int)xp[(m * (K / 2) + 4 * d + q) * T + u]));
        }
}

/* Row m's accumulators summed, and zeroed for the next group. */
T_BF16 static inline __attribute__((always_inline)) __m512 bf16_take(__m512 acc[16], int m, const int MB) {
    const int A = SQ_BF16_ACCS(MB);
    __m512 a = acc[m * A];
#pragma GCC unroll 4
    for (int i = 1; i < A; i++) a = _mm512_add_ps(a, acc[m * A + i]);
#pragma GCC unroll 4
    for (int i = 0; i < A; i++) acc[m * A + i] = _mm512_setzero_ps();
    return a;
}

/* The 8 weights of dword d of every row (v: one dword per lane) against MB rows of paired x. */
T_BF16 static inline __attribute__((always_inline)) void
bf16_dword(const __m512i v, int64_t d, const __m512i table, int64_t K, const uint32_t *xp,
           __m512 acc[16], const int MB, const int T) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) bf16_dots((__m512bh)bf16_pair(v, q, table), d, q, K, xp, acc, MB, T);
}

/* A group ends: o += acc * (its scales, one per lane), acc = 0. */
T_BF16 static inline __attribute__((always_inline)) void
bf16_flush(const float *scales, int64_t g, __mmask16 lanes, const __m512i sidx, __m512 acc[16], float *o, const int MB) {
    const __m512 sv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, sidx, scales + g, 4);
#pragma GCC unroll 8
    for (int m = 0; m < MB; m++)
        _mm512_storeu_ps(o + 16 * m, _mm512_fmadd_ps(bf16_take(acc, m, MB), sv, _mm512_loadu_ps(o + 16 * m)));
}

/* One panel (16 rows; lanes outside `lanes` are rows past the layer's end) against MB <= 8 rows of paired
 * x (stride K/2 dwords): o[m * 16 + l] receives the dot products of row SQ_PI(l), scales applied. Full
 * panels load 64 k at a time and transpose (G32: groups of 32, two per 64 k); the last panel, and the
 * trailing 32 k of a K that is an odd multiple of 32, gather one dword per row. MB and G32 are
 * compile-time constants: with 8 accumulators, 8 code vectors and the constants, every register is
 * used, and a run-time group test in the unrolled loop made GCC keep the accumulators on the stack. */
T_BF16 static inline __attribute__((always_inline)) void
bf16_panel(const uint8_t *codes, const float *scales, __mmask16 lanes, const __m512i table, int group, int64_t K,
           const uint32_t *xp, float *o, const int MB, const int G32, const int T) {
    const int64_t rb = K / 2, spr = K / group, nd = K / 8, gd = group / 8;
    const __m512i cidx = bf16_lane_offsets(rb), sidx = bf16_lane_offsets(spr);
    __m512 acc[16];
    for (int m = 0; m < MB; m++) _mm512_storeu_ps(o + 16 * m, _mm512_setzero_ps());
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int64_t d0 = 0, g = 0;
    if (lanes == 0xFFFF) {
        const int64_t chunks_per_group = G32 ? 1 : group / 64;
        int64_t left = chunks_per_group;
        for (; d0 + 8 <= nd; d0 += 8) {
            __m512i V[8];
            transpose16x8(codes, rb, d0, V);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                bf16_dword(V[j], d0 + j, table, K, xp, acc, MB, T);
                if (G32 && j == 3) bf16_flush(scales, g++, lanes, sidx, acc, o, MB);
            }
            if (--left == 0) {
                left = chunks_per_group;
                bf16_flush(scales, g++, lanes, sidx, acc, o, MB);
            }
        }
    }
    for (int64_t left = gd; d0 < nd; d0++) {
        bf16_dword(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, cidx, codes + 4 * d0, 1), d0, table,
                   K, xp, acc, MB, T);
        if (--left == 0) {
            left = gd;
            bf16_flush(scales, g++, lanes, sidx, acc, o, MB);
        }
    }
}

T_BF16 static void bf16_panel_mb(const uint8_t *codes, const float *scales, __mmask16 lanes, const __m512i table,
                                 int group, int64_t K, const uint32_t *xp, float *o, int MB, int T) {
    switch ((MB * 2 + (group == 32)) * 2 + (T == 2)) {
#define SQ_MB(n) case 4 * n: bf16_panel(codes, scales, lanes, table, group, K, xp, o, n, 0, 1); break; \
                 case 4 * n + 1: bf16_panel(codes, scales, lanes, table, group, K, xp, o, n, 0, 2); break; \
                 case 4 * n + 2: bf16_panel(codes, scales, lanes, table, 32, K, xp, o, n, 1, 1); break; \
                 case 4 * n + 3: bf16_panel(codes, scales, lanes, table, 32, K, xp, o, n, 1, 2); break;
    SQ_MB(1) SQ_MB(2) SQ_MB(3) SQ_MB(4) SQ_MB(5) SQ_MB(6) SQ_MB(7) SQ_MB(8)
#undef SQ_MB
    }
}

/* Batches of more than SQ_BF16_MB rows take several passes over a panel. Its weights are then decoded
 * once into wb[4d + q] (16 rows x 2 bf16 weights per vector, K * 32 bytes: in L2), and every pass loads
 * them instead of transposing and looking up again: at batch 256 the lookups had cost ~25 % of the time. */
T_BF16 static void bf16_decode_panel(const uint8_t *codes, const float *scales, __mmask16 lanes, const __m512i table,
                                     int64_t K, int group, __m512i *wb, __m512 *sb) {
    const int64_t rb = K / 2, nd = K / 8, spr = K / group;
    const __m512i sidx = bf16_lane_offsets(spr);
    for (int64_t g = 0; g < spr; g++)
        sb[g] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, sidx, scales + g, 4);
    int64_t d0 = 0;
    if (lanes == 0xFFFF)
        for (; d0 + 8 <= nd; d0 += 8) {
            __m512i V[8];
            transpose16x8(codes, rb, d0, V);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++)
#pragma GCC unroll 4
                for (int q = 0; q < 4; q++) _mm512_store_si512(wb + 4 * (d0 + j) + q, bf16_pair(V[j], q, table));
        }
    const __m512i cidx = bf16_lane_offsets(rb);
    for (; d0 < nd; d0++) {
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, cidx, codes + 4 * d0, 1);
        for (int q = 0; q < 4; q++) _mm512_store_si512(wb + 4 * d0 + q, bf16_pair(v, q, table));
    }
}

/* One pass of MB <= SQ_BF16_MB rows of paired x over a decoded panel (weights wb, scales sb[g], one vector
 * per group in lane order): o as in bf16_panel. The totals stay in registers here (no code vectors to
 * hold), and the scales are loads, not gathers. */
T_BF16 static inline __attribute__((always_inline)) void
bf16_pass(const __m512i *wb, const __m512 *sb, int group, int64_t K, const uint32_t *xp, float *o, const int MB,
          const int T) {
    const int64_t spr = K / group, gd = group / 8;
    __m512 acc[16], tot[8];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int m = 0; m < MB; m++) tot[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < spr; g++) {
        for (int64_t d = g * gd; d < (g + 1) * gd; d++)
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) bf16_dots((__m512bh)_mm512_load_si512(wb + 4 * d + q), d, q, K, xp, acc, MB, T);
        const __m512 sv = _mm512_load_ps((const float *)(sb + g));
#pragma GCC unroll 8
        for (int m = 0; m < MB; m++) tot[m] = _mm512_fmadd_ps(bf16_take(acc, m, MB), sv, tot[m]);
    }
    for (int m = 0; m < MB; m++) _mm512_storeu_ps(o + 16 * m, tot[m]);
}

T_BF16 static void bf16_pass_mb(const __m512i *wb, const __m512 *sb, int group, int64_t K, const uint32_t *xp,
                                float *o, int MB, int T) {
    switch (MB * 2 + (T == 2)) {
#define SQ_MB(n) case 2 * n: bf16_pass(wb, sb, group, K, xp, o, n, 1); break; \
                 case 2 * n + 1: bf16_pass(wb, sb, group, K, xp, o, n, 2); break;
    SQ_MB(1) SQ_MB(2) SQ_MB(3) SQ_MB(4) SQ_MB(5) SQ_MB(6) SQ_MB(7) SQ_MB(8)
#undef SQ_MB
    }
}

T_BF16 static void pairs_x_split_avx512(const float *x, int64_t K, uint32_t *xp); /* below */

T_BF16 static int gemm4_bf16_avx512(int n_threads, const int T, const float *x, int64_t M, int64_t N, int64_t K,
                                    int group, const uint8_t *codes, const float *scales, const float *lut,
                                    const float *t, const float *L, int64_t rank, const float *bias, float *y) {
    const int64_t xs = T * (K / 2); /* dwords per row of paired x */
    uint32_t *xp = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(M * xs));
    if (!xp) return SQ_ENOMEM;
    for (int64_t m = 0; m < M; m++) {
        if (T == 2) pairs_x_split_avx512(x + m * K, K, xp + m * xs);
        else pairs_x_bf16(x + m * K, K, xp + m * xs);
    }
    uint16_t tw[32];
    for (int i = 0; i < 32; i++) tw[i] = (uint16_t)(bf16_round(lut[i & 15])); /* exact: lut_is_bf16 */
    const __m512i table = _mm512_loadu_si512((const void *)tw);
    const int64_t panels = (N + 15) / 16, spr = K / group;
    const int decoded = M > 2 * SQ_BF16_MB; /* three passes or more: decode each panel once (at two, the
                                               * same speed either way) */
    const size_t wb_vectors = (size_t)(K / 2 + K / group); /* 4 per dword of a row (K / 8 dwords), 1 per group */
    __m512i *wbuf = decoded ? (__m512i *)aligned_alloc(64, sizeof(__m512i) * wb_vectors * (size_t)n_threads) : NULL;
    if (decoded && !wbuf) { free(xp); return SQ_ENOMEM; }
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
#ifdef _OPENMP
        __m512i *wb = decoded ? wbuf + wb_vectors * (size_t)omp_get_thread_num() : NULL;
#else
        __m512i *wb = wbuf;
#endif
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t n0 = 16 * p, nr = N - n0 < 16 ? N - n0 : 16;
            __mmask16 lanes = 0; /* lane l holds row SQ_PI(l) */
            for (int l = 0; l < 16; l++) lanes |= (__mmask16)((SQ_PI(l) < nr) << l);
            const uint8_t *pc = codes + n0 * (K / 2);
            const float *ps = scales + n0 * spr;
            if (decoded) bf16_decode_panel(pc, ps, lanes, table, K, group, wb, (__m512 *)(wb + K / 2));
            float o[16 * SQ_BF16_MB];
            for (int64_t m0 = 0; m0 < M; m0 += SQ_BF16_MB) {
                const int mb = M - m0 < SQ_BF16_MB ? (int)(M - m0) : SQ_BF16_MB;
                if (decoded) bf16_pass_mb(wb, (const __m512 *)(wb + K / 2), group, K, xp + m0 * xs, o, mb, T);
                else bf16_panel_mb(pc, ps, lanes, table, group, K, xp + m0 * xs, o, mb, T);
                for (int j = 0; j < mb; j++)
                    for (int l = 0; l < 16; l++)
                        if (SQ_PI(l) < nr)
                            y[(m0 + j) * N + n0 + SQ_PI(l)] =
                                finish_avx512(o[16 * j + l], m0 + j, n0 + SQ_PI(l), bias, t, L, rank);
            }
        }
    }
    free(wbuf);
    free(xp);
    return SQ_OK;
}

/* Batches of 1 and 2 rows, 4-bit dense, AVX-512 BF16: "word lanes". The panel kernel above needs a
 * broadcast of x per pair and batch row, which at batch 1-2 costs more than it saves (1.35 ms at 4096²
 * against the fp32 nibble-lane row's 0.86). Here lanes are columns, as in the fp32 nibble-lane row, but
 * the lookup is a `vpermw`: word w of 64 code bytes holds 4 nibbles; shifted right by 4j, its low 5 bits
 * index the bf16 table (duplicated to 32 entries, so the next nibble's low bit does not matter), and one
 * vpermw gives 32 bf16 weights, which one `vdpbf16ps` per x term multiplies in pairs. Per 128 weights:
 * 3 shifts, 4 lookups and 4T dot products, against the fp32 row's 7 shifts, 8 `vpermps` and 8 FMAs, and
 * on Zen 4 the lookups run beside the dot products (docs/kernels_cpu.md). fp32 x is split into hi + lo
 * bf16 terms (T = 2, `split16_avx512`), bf16 x is one term (T = 1).
 *
 * Word w of a chunk (128 columns, 64 bytes) is bytes 2w, 2w+1 of block w/8; byte i of a block holds
 * weights i (low nibble) and i + 16, so nibble j of word w is column 32(w/8) + 2(w%8) + (j>>1) + 16(j&1).
 * Dword lane l (words 2l, 2l+1) lies in block l/4 for every j, so the chunk's scales are the fp32
 * nibble-lane row's (`nib_scales`). x is laid out once per call to match: xw[((c T + u) 4 + j) 32 + w]
 * for chunk c, term u, nibble j; a partial last chunk is padded with zeros (its codes are loaded
 * masked, so the padding meets code 0 and adds 0). */
T_BF16 static inline __attribute__((always_inline)) __m512i bf16_round16(const __m512i u) {
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
}

/* x as the sum of two bfloat16 terms, 16 lanes at a time (the bits of hi and lo in the low words of 16
 * dwords): hi = x rounded to bf16, lo = (x - hi) rounded to bf16, so |x - hi - lo| <= 2^-18 |x|; x - hi is
 * exact in fp32. A finite x that would round to infinity keeps its truncation as hi instead; an infinite
 * or NaN x is truncated (a NaN kept quiet) and has lo = 0, so it passes through as with fp32. */
T_BF16 static inline __attribute__((always_inline)) void split16_avx512(const __m512 v, __m512i *hi, __m512i *lo) {
    const __m512i u = _mm512_castps_si512(v), e = _mm512_set1_epi32(0x7F800000);
    const __mmask16 nonfinite = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, e), e);
    __m512i h = bf16_round16(u);
    const __mmask16 trunc = nonfinite | _mm512_cmpeq_epi32_mask(_mm512_and_si512(h, _mm512_set1_epi32(0x7F80)),
                                                                _mm512_set1_epi32(0x7F80));
    h = _mm512_mask_mov_epi32(h, trunc, _mm512_srli_epi32(u, 16));
    const __mmask16 nan = _mm512_mask_test_epi32_mask(nonfinite, u, _mm512_set1_epi32(0x7FFFFF));
    h = _mm512_mask_or_epi32(h, nan, h, _mm512_set1_epi32(0x40));
    *hi = h;
    const __m512 r = _mm512_maskz_sub_ps((__mmask16)~nonfinite, v, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
    *lo = bf16_round16(_mm512_castps_si512(r));
}

/* pairs_x_bf16's layout for T = 2 (fp32 x split into hi + lo), 32 columns at a time: `split16_avx512` on
 * each half, hi and lo narrowed to 32 words each in column order, and two `vpermt2w` put entry e = 4d + q
 * (k = 4d + (q >> 1) + 16 (q & 1) within the block) at words 4e..4e+3 = hi[k], hi[k + 2], lo[k], lo[k + 2].
 * 1.02-1.13x faster bf16-kernel calls at batches 8-24 than the scalar split it replaced. */
T_BF16 static void pairs_x_split_avx512(const float *x, int64_t K, uint32_t *xp) {
    uint16_t idx[64];
    for (int e = 0; e < 16; e++) {
        const int k = 4 * (e / 4) + ((e % 4) >> 1) + 16 * (e & 1);
        idx[4 * e] = (uint16_t)k, idx[4 * e + 1] = (uint16_t)(k + 2);
        idx[4 * e + 2] = (uint16_t)(32 + k), idx[4 * e + 3] = (uint16_t)(34 + k);
    }
    const __m512i i0 = _mm512_loadu_si512((const void *)idx), i1 = _mm512_loadu_si512((const void *)(idx + 32));
    for (int64_t b = 0; b < K / 32; b++) {
        __m512i h0, l0, h1, l1;
        split16_avx512(_mm512_loadu_ps(x + 32 * b), &h0, &l0);
        split16_avx512(_mm512_loadu_ps(x + 32 * b + 16), &h1, &l1);
        const __m512i hw = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(h0)), _mm512_cvtepi32_epi16(h1), 1);
        const __m512i lw = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(l0)), _mm512_cvtepi32_epi16(l1), 1);
        _mm512_storeu_si512((void *)(xp + 32 * b), _mm512_permutex2var_epi16(hw, i0, lw));
        _mm512_storeu_si512((void *)(xp + 32 * b + 16), _mm512_permutex2var_epi16(hw, i1, lw));
    }
}

/* x laid out for the word-lane kernel (see above): per 128 columns, 8 loads, the split, and for each term
 * 4 `vpermt2w` + 4 lane shuffles that pick column 32b + base_j + 2i (base_j = 0, 16, 1, 17) of block b
 * into words 8b + i of vector j. Columns past K read as zeros (masked loads). */
T_BF16 static void words_x_bf16(const float *x, int64_t K, int T, uint16_t *xw) {
    __m512i sel[2]; /* sel[p]: words 0-15 for j = 2p, words 16-31 for j = 2p + 1, from a block pair */
    for (int p = 0; p < 2; p++) {
        uint16_t id[32];
        for (int h = 0; h < 2; h++) {
            const int j = 2 * p + h, base = (j >> 1) + 16 * (j & 1);
            for (int i = 0; i < 16; i++) id[16 * h + i] = (uint16_t)(32 * (i / 8) + base + 2 * (i % 8));
        }
        sel[p] = _mm512_loadu_si512((const void *)id);
    }
    const int64_t chunks = (K + 127) / 128;
    for (int64_t c = 0; c < chunks; c++) {
        __m512i hw[4], lw[4]; /* block b's 32 columns as words */
        for (int b = 0; b < 4; b++) {
            __m512i h[2], l[2];
            for (int e = 0; e < 2; e++) {
                const int64_t k = 128 * c + 32 * b + 16 * e;
                const int64_t left = K - k;
                const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
                split16_avx512(_mm512_maskz_loadu_ps(mk, x + (left > 0 ? k : 0)), &h[e], &l[e]);
            }
            hw[b] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(h[0])), _mm512_cvtepi32_epi16(h[1]), 1);
            lw[b] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(l[0])), _mm512_cvtepi32_epi16(l[1]), 1);
        }
        for (int u = 0; u < T; u++) {
            const __m512i *w = u ? lw : hw;
            uint16_t *dst = xw + (c * T + u) * 128;
            for (int p = 0; p < 2; p++) {
                const __m512i lo2 = _mm512_permutex2var_epi16(w[0], sel[p], w[1]); /* blocks 0, 1 */
                const __m512i hi2 = _mm512_permutex2var_epi16(w[2], sel[p], w[3]); /* blocks 2, 3 */
                _mm512_storeu_si512((void *)(dst + 32 * (2 * p)), _mm512_shuffle_i64x2(lo2, hi2, 0x44));
                _mm512_storeu_si512((void *)(dst + 32 * (2 * p + 1)), _mm512_shuffle_i64x2(lo2, hi2, 0xEE));
            }
        }
    }
}

/* The scales of the chunk at column k (as nib_scales), for a last chunk with only `blocks` (1-3) blocks:
 * a masked load, so no scale past the row's end is read. */
T_BF16 static inline __attribute__((always_inline)) __m512 words_tail_scales(const float *srow, int64_t k, int group,
                                                                            int blocks) {
    if (group >= 128) return _mm512_set1_ps(srow[k / group]);
    const int per = group / 32, n = (blocks + per - 1) / per; /* scales the chunk's blocks use */
    const __m512 s = _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), srow + k / group);
    return group == 64
               ? _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), s)
               : _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), s);
}

/* R consecutive weight rows against MB rows of x laid out by words_x_bf16 (stride xs words): out[r MB + m].
 * R, MB, T and group are compile-time constants in every caller. */
T_BF16 static inline __attribute__((always_inline)) void
words_rows(const uint8_t *row, const float *scales, const __m512i table, int group, int64_t K, const uint16_t *xw,
           int64_t xs, float *out, const int R, const int MB, const int T) {
    const int64_t rs = K / 2, ss = K / group, full = K / 128;
    __m512 tot[8];
#pragma GCC unroll 8
    for (int i = 0; i < R * MB; i++) tot[i] = _mm512_setzero_ps();
    const int tail_blocks = (int)((K % 128) / 32);
    for (int64_t c = 0; c < full + (tail_blocks > 0); c++) {
        const int64_t k = 128 * c;
        const int tail = c == full;
        __m512i v[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const uint8_t *src = row + r * rs + k / 2;
            if (tail) v[r] = _mm512_maskz_loadu_epi8((__mmask64)((1ull << (16 * tail_blocks)) - 1ull), src);
            else {
                _mm_prefetch((const char *)src + 4 * rs, _MM_HINT_T0); /* the same columns 4 rows on */
                v[r] = _mm512_loadu_si512((const void *)src);
            }
        }
        __m512 a[16];
#pragma GCC unroll 16
        for (int i = 0; i < 2 * R * MB; i++) a[i] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            __m512bh w[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                w[r] = (__m512bh)_mm512_permutexvar_epi16(j ? _mm512_srli_epi16(v[r], 4 * j) : v[r], table);
#pragma GCC unroll 2
            for (int m = 0; m < MB; m++)
#pragma GCC unroll 2
                for (int u = 0; u < T; u++) {
                    const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xw + m * xs + ((c * T + u) * 4 + j) * 32));
#pragma GCC unroll 4
                    for (int r = 0; r < R; r++) {
                        const int i = 2 * (r * MB + m) + (j & 1);
                        a[i] = _mm512_dpbf16_ps(a[i], w[r], xv);
                    }
                }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m512 sv = tail ? words_tail_scales(scales + r * ss, k, group, tail_blocks)
                                   : nib_scales(scales + r * ss, k, group);
#pragma GCC unroll 2
            for (int m = 0; m < MB; m++) {
                const int i = r * MB + m;
                tot[i] = _mm512_fmadd_ps(_mm512_add_ps(a[2 * i], a[2 * i + 1]), sv, tot[i]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R * MB; i++) out[i] = _mm512_reduce_add_ps(tot[i]);
}

T_BF16 static void words_rows_g(const uint8_t *row, const float *scales, const __m512i table, int group, int64_t K,
                                const uint16_t *xw, int64_t xs, float *out, int R, int MB, int T) {
    const int g = group == 32 ? 0 : group == 64 ? 1 : group == 128 ? 2 : 3; /* linear_impl admits only these */
    switch (((g * 2 + (R == 4)) * 2 + (MB - 1)) * 2 + (T - 1)) { /* R: 1 or 4 */
#define SQ_W(G, GI, RR, RI) \
    case ((GI * 2 + RI) * 2 + 0) * 2 + 0: words_rows(row, scales, table, G, K, xw, xs, out, RR, 1, 1); break; \
    case ((GI * 2 + RI) * 2 + 0) * 2 + 1: words_rows(row, scales, table, G, K, xw, xs, out, RR, 1, 2); break; \
    case ((GI * 2 + RI) * 2 + 1) * 2 + 0: words_rows(row, scales, table, G, K, xw, xs, out, RR, 2, 1); break; \
    case ((GI * 2 + RI) * 2 + 1) * 2 + 1: words_rows(row, scales, table, G, K, xw, xs, out, RR, 2, 2); break;
#define SQ_WG(G, GI) SQ_W(G, GI, 1, 0) SQ_W(G, GI, 4, 1)
    SQ_WG(32, 0) SQ_WG(64, 1) SQ_WG(128, 2) SQ_WG(256, 3)
#undef SQ_WG
#undef SQ_W
    }
}

/* Batch 1 or 2 (M), 4-bit dense, bf16 table. Rows go in fours (each x load then serves four rows) on short
 * and long rows and at batch 2 from K = 4096 (below), one at a time otherwise; both prefetch the same
 * columns 4 rows ahead. Side by side on cold weights (1 thread, Zen 4): with the old 2 KB-ahead prefetch (which at
 * K = 4096 points into the row that is already being read), four rows took 0.6 ms at 4096^2 against 0.31
 * for one row with the 4-rows-ahead prefetch. */
T_BF16 static int gemv4_words_avx512(int n_threads, const int T, const float *x, int64_t M, int64_t N, int64_t K,
                                     int group, const uint8_t *codes, const float *scales, const float *lut,
                                     const float *t, const float *L, int64_t rank, const float *bias, float *y) {
    const int64_t xs = (K + 127) / 128 * 128 * T; /* words per row of laid-out x */
    uint16_t *xw = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (size_t)(M * xs));
    if (!xw) return SQ_ENOMEM;
    for (int64_t m = 0; m < M; m++) words_x_bf16(x + m * K, K, T, xw + m * xs);
    uint16_t tw[32];
    for (int i = 0; i < 32; i++) tw[i] = (uint16_t)(bf16_round(lut[i & 15])); /* exact: lut_is_bf16 */
    const __m512i table = _mm512_loadu_si512((const void *)tw);
    const int MB = (int)M;
    /* Rows in fours where that measured faster (1 thread, cold weights, 2026-12-07, side by side): short rows
     * (K = 576: 1.17-1.27x at batches 1 and 2; the per-row reduction and tail are shared), long ones, and
     * batch 2 at K >= 4096 (1.23-1.27x). At K = 1024-4096, batch 1, single rows were faster (quads 0.71-0.92x). */
    const int fours = K < 1536 || K >= 6144 || (M == 2 && K >= 4096);
    const int64_t quads = fours ? N / 4 : 0, units = quads + (N - 4 * quads);
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t u = 0; u < units; u++) {
        const int64_t n0 = u < quads ? 4 * u : 4 * quads + (u - quads);
        const int R = u < quads ? 4 : 1;
        float acc[8];
        words_rows_g(codes + n0 * (K / 2), scales + n0 * (K / group), table, group, K, xw, xs, acc, R, MB, T);
        for (int r = 0; r < R; r++)
            for (int m = 0; m < MB; m++)
                y[m * N + n0 + r] = finish_avx512(acc[r * MB + m], m, n0 + r, bias, t, L, rank);
    }
    free(xw);
    return SQ_OK;
}


/* ---------------------------------------------------------------------------------------------- */
/* Sparse 2:4 / 4:8, batches 1-16, AVX-512 BF16 + VBMI2: codes spread by `vpexpandb`, dot by vdpbf16ps */

#ifndef SQ_SPARSE_WORDS_MAX_M
#define SQ_SPARSE_WORDS_MAX_M 16 /* 4-bit 2:4 / 4:8 batches up to this take the word-lane sparse kernel (bf16 table) */
#endif
#define T_VBMI2_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16,avx2,fma")))

/* x for `sparse_words_rows`: per 64-column block, T terms (T = 1: x itself, every x a bfloat16; T = 2: the
 * split hi, lo of `split16_avx512`), each as 32 words of the even columns then 32 of the odd ones. */
T_BF16 static void sparse_words_x(const float *x, int64_t K, int T, uint16_t *xw) {
    for (int64_t c = 0; c < K / 64; c++) {
        uint16_t h[64], l[64];
        for (int e = 0; e < 4; e++) {
            const __m512 v = _mm512_loadu_ps(x + 64 * c + 16 * e);
            __m512i hi, lo;
            if (T == 2) split16_avx512(v, &hi, &lo);
            else hi = _mm512_srli_epi32(_mm512_castps_si512(v), 16), lo = _mm512_setzero_si512();
            _mm256_storeu_si256((__m256i *)(h + 16 * e), _mm512_cvtepi32_epi16(hi));
            _mm256_storeu_si256((__m256i *)(l + 16 * e), _mm512_cvtepi32_epi16(lo));
        }
        uint16_t *d = xw + c * 64 * T;
        for (int j = 0; j < 32; j++) {
            d[j] = h[2 * j], d[32 + j] = h[2 * j + 1];
            if (T == 2) d[64 + j] = l[2 * j], d[96 + j] = l[2 * j + 1];
        }
    }
}

/* R consecutive sparse rows against MB rows of x laid out by sparse_words_x (stride xs words): out[r MB + m].
 * Per 64 columns the 32 stored nibbles become bytes (a broadcast load, a shift and a blend: a byte's bits
 * 4-7 are left over from its neighbour, which the lookup ignores), one `vpexpandb` under the block's 64-bit
 * mask puts each at its column (pruned columns get the table's exact zero), and two `vpermw` look up the
 * even and the odd columns as bfloat16, whose `vdpbf16ps` with the matching x words is the dense word-lane
 * kernel's. R x MB is 4 x 1, 2 x MB (MB = 1, 2) or 1 x MB (MB = 1, 2, 4); R, MB and T are compile-time
 * constants in every caller. */
T_VBMI2_BF16 static inline __attribute__((always_inline)) void
sparse_words_rows(const uint8_t *row, const uint8_t *mrow, const float *srow, const __m512i table,
                  const __m512i zfill, int group, int64_t K, const uint16_t *xw, int64_t xs, float *out, const int R,
                  const int MB, const int T) {
    const int64_t rb = K / 4, mb = K / 8, ss = K / group, ahead = 4 * rb; /* prefetch the same columns 4 rows on */
    __m512 tot[8];
#pragma GCC unroll 8
    for (int i = 0; i < R * MB; i++) tot[i] = _mm512_setzero_ps();
    const int64_t cpg = group / 64;
    for (int64_t c0 = 0; c0 < K / 64; c0 += cpg) {
        __m512 a0[8], a1[8];
#pragma GCC unroll 8
        for (int i = 0; i < R * MB; i++) a0[i] = a1[i] = _mm512_setzero_ps();
        for (int64_t c = c0; c < c0 + cpg; c++) {
            __m512bh we[4], wo[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const uint8_t *cr = row + r * rb, *mr = mrow + r * mb;
                if ((c & 3) == 0) _mm_prefetch((const char *)(cr + 16 * c + R * ahead), _MM_HINT_T0);
                if ((c & 7) == 0) _mm_prefetch((const char *)(mr + 8 * c + R * ahead / 2), _MM_HINT_T0);
                __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(cr + 16 * c)));
                b = _mm256_blend_epi32(b, _mm256_srli_epi16(b, 4), 0xF0); /* stored weight i in byte i, bits 0-3 */
                uint64_t mk;
                memcpy(&mk, mr + 8 * c, 8);
                const __m512i v = _mm512_mask_expand_epi8(zfill, (__mmask64)mk, _mm512_castsi256_si512(b));
                we[r] = (__m512bh)_mm512_permutexvar_epi16(v, table);
                wo[r] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table);
            }
#pragma GCC unroll 4
            for (int m = 0; m < MB; m++)
#pragma GCC unroll 2
                for (int u = 0; u < T; u++) {
                    const uint16_t *xc = xw + m * xs + (c * T + u) * 64;
                    const __m512bh xe = (__m512bh)_mm512_loadu_si512((const void *)xc);
                    const __m512bh xo = (__m512bh)_mm512_loadu_si512((const void *)(xc + 32));
#pragma GCC unroll 4
                    for (int r = 0; r < R; r++) {
                        a0[r * MB + m] = _mm512_dpbf16_ps(a0[r * MB + m], we[r], xe);
                        a1[r * MB + m] = _mm512_dpbf16_ps(a1[r * MB + m], wo[r], xo);
                    }
                }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m512 sv = _mm512_set1_ps(srow[r * ss + c0 / cpg]);
#pragma GCC unroll 4
            for (int m = 0; m < MB; m++)
                tot[r * MB + m] = _mm512_fmadd_ps(_mm512_add_ps(a0[r * MB + m], a1[r * MB + m]), sv, tot[r * MB + m]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R * MB; i++) out[i] = _mm512_reduce_add_ps(tot[i]);
}

/* Whether any of a row's `n` mask bytes keeps other than 4 columns: 64 bytes at a time, popcounts from two
 * nibble lookups. Checked once per row before its dot product (the per-block scalar check cost the row
 * about a fifth of its time); a bad mask gives wrong numbers but no read outside the row. */
T_VBMI2_BF16 static inline __attribute__((always_inline)) int sparse_mask_row_bad(const uint8_t *mrow, int64_t n) {
    const __m512i pop4 = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
    const __m512i lo4 = _mm512_set1_epi8(15), four = _mm512_set1_epi8(4);
    __mmask64 bad = 0;
    for (int64_t i = 0; i < n; i += 64) {
        const __mmask64 mk = n - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (n - i)) - 1);
        const __m512i v = _mm512_maskz_loadu_epi8(mk, mrow + i);
        const __m512i cnt = _mm512_add_epi8(_mm512_shuffle_epi8(pop4, _mm512_and_si512(v, lo4)),
                                            _mm512_shuffle_epi8(pop4, _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4)));
        bad |= _mm512_mask_cmpneq_epi8_mask(mk, cnt, four);
    }
    return bad != 0;
}

/* Batches 1-SQ_SPARSE_WORDS_MAX_M (M) of a 4-bit 2:4 / 4:8 layer whose table is bfloat16-exact and has an
 * exact zero. Batch 1: rows in fours (each x load serves four rows); batch 2: rows in pairs (fours spill);
 * larger batches: pairs of rows against blocks of 2 and 1 rows of x on long rows, single rows against blocks
 * of 4, 2 and 1 on short ones (each row's lookups serve a block; its codes stay in L1 between blocks). */
T_VBMI2_BF16 static int gemm4_sparse_words(int n_threads, const int T, const float *x, int64_t M, int64_t N,
                                           int64_t K, int group, int zero_code, const uint8_t *codes,
                                           const float *scales, const uint8_t *mask, const float *lut, const float *t,
                                           const float *L, int64_t rank, const float *bias, float *y) {
    const int64_t xs = K * T; /* words per row of laid-out x */
    uint16_t *xw = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (size_t)(M * xs));
    if (!xw) return SQ_ENOMEM;
    for (int64_t m = 0; m < M; m++) sparse_words_x(x + m * K, K, T, xw + m * xs);
    uint16_t tw[32];
    for (int i = 0; i < 32; i++) tw[i] = bf16_round(lut[i & 15]); /* exact: lut_is_bf16 */
    const __m512i table = _mm512_loadu_si512((const void *)tw);
    const __m512i zfill = _mm512_set1_epi8((char)zero_code);
    const int64_t rb = K / 4, spr = K / group;
    /* weight rows per unit; at 3-16 rows of x, pairs share the x loads on long rows (1.05-1.13x single rows at
     * K = 4096 and 11008, 1 and 2 threads) but not on short ones (0.85-1.0x at K = 576 and 1536) */
    const int G = M == 1 ? 4 : M == 2 || K >= 4096 ? 2 : 1;
    const int64_t groups = N / G, units = groups + (N - G * groups);
    int bad_mask = 0;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t u = 0; u < units; u++) {
        const int64_t n0 = u < groups ? G * u : G * groups + (u - groups);
        const int R = u < groups ? G : 1;
        if (sparse_mask_row_bad(mask + n0 * (K / 8), R * (K / 8))) {
            #pragma omp atomic write
            bad_mask = 1;
            continue;
        }
        const int most = R == 4 ? 1 : R == 2 ? 2 : 4; /* rows of x per block: R x most accumulators fit */
        for (int64_t m0 = 0; m0 < M;) {
            const int mb = M - m0 >= 4 && most == 4 ? 4 : M - m0 >= 2 && most >= 2 ? 2 : 1;
            float acc[8];
#define SQ_SW(RR, MB) do { if (T == 2) sparse_words_rows(codes + n0 * rb, mask + n0 * (K / 8), scales + n0 * spr, \
                              table, zfill, group, K, xw + m0 * xs, xs, acc, RR, MB, 2); \
                           else sparse_words_rows(codes + n0 * rb, mask + n0 * (K / 8), scales + n0 * spr, \
                              table, zfill, group, K, xw + m0 * xs, xs, acc, RR, MB, 1); } while (0)
            if (R == 4) SQ_SW(4, 1);
            else if (R == 2) { if (mb == 2) SQ_SW(2, 2); else SQ_SW(2, 1); }
            else if (mb == 4) SQ_SW(1, 4);
            else if (mb == 2) SQ_SW(1, 2);
            else SQ_SW(1, 1);
#undef SQ_SW
            store_block_avx512(y, acc, R, mb, m0, n0, N, bias, t, L, rank);
            m0 += mb;
        }
    }
    free(xw);
    return bad_mask ? SQ_EBADLEN : SQ_OK;
}

T_AVX512 static inline __attribute__((always_inline)) __m512 _mm512_insertf32x8_avx512f(float s0, float s1) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(s0)), _mm256_castps_pd(_mm256_set1_ps(s1)), 1));
}

/* Batch 1, 8-bit dense, AVX-512: 64 int8 codes loaded as 16 dwords; byte b of every lane becomes an
 * int32 with one left shift and one arithmetic right shift (byte 3: the right shift alone) instead of a
 * widening shuffle, then `vcvtdq2ps` and an FMA. Lane l of vector b holds weight 4l + b of the chunk, so
 * x is permuted to that order once per call; with groups of 32, lanes 0-7 carry the first group's scale
 * and lanes 8-15 the second's. Rows in fours for K >= 6144, as for 4-bit. */
static void permute_x_byte(const float *x, int64_t K, float *xp) {
    int64_t c = 0;
    for (; c + 64 <= K; c += 64)
        for (int b = 0; b < 4; b++)
            for (int l = 0; l < 16; l++) xp[c + 16 * b + l] = x[c + 4 * l + b];
    for (; c < K; c++) xp[c] = x[c];
}

T_AVX512 static inline __attribute__((always_inline)) void
rows_dot8_avx512(const uint8_t *row, const float *scales, int group, int64_t K, const float *xp, float *out,
                 const int R) {
    const int64_t ss = K / group;
    __m512 tot[4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) tot[r] = _mm512_setzero_ps();
    int64_t k = 0; /* K is a multiple of 32: one trailing half chunk at most */
    for (; k + 64 <= K; k += 64) {
        const __m512 x0 = _mm512_loadu_ps(xp + k), x1 = _mm512_loadu_ps(xp + k + 16);
        const __m512 x2 = _mm512_loadu_ps(xp + k + 32), x3 = _mm512_loadu_ps(xp + k + 48);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const uint8_t *b = row + r * K + k;
            _mm_prefetch((const char *)b + SQ_PREFETCH, _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512((const void *)b);
            __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)), x0);
            __m512 c = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24)), x1);
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24)), x2, a);
            c = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24)), x3, c);
            const __m512 sv = group == 32 ? _mm512_insertf32x8_avx512f(scales[r * ss + k / 32], scales[r * ss + k / 32 + 1])
                                          : _mm512_set1_ps(scales[r * ss + k / group]);
            tot[r] = _mm512_fmadd_ps(_mm512_add_ps(a, c), sv, tot[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        float tail = 0.0f;
        if (k < K) { /* the last 32 codes, x in natural order */
            const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + r * K + k)));
            const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + r * K + k + 16)));
            const __m512 p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(w), _mm512_loadu_ps(xp + k + 16),
                                             _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_loadu_ps(xp + k)));
            tail = _mm512_reduce_add_ps(p) * scales[r * ss + k / group];
        }
        out[r] = _mm512_reduce_add_ps(tot[r]) + tail;
    }
}

T_AVX512 static void rows8(const uint8_t *row, const float *scales, int group, int64_t K, const float *xp, float *out, int R) {
#define SQ_R8(G) (R == 4 ? rows_dot8_avx512(row, scales, G, K, xp, out, 4) : rows_dot8_avx512(row, scales, G, K, xp, out, 1))
    switch (group) {
    case 32: SQ_R8(32); break;
    case 64: SQ_R8(64); break;
    case 128: SQ_R8(128); break;
    default: SQ_R8(256); break;
    }
#undef SQ_R8
}

T_AVX512 static int gemv8_avx512(int n_threads, const float *x, int64_t N, int64_t K, int group, const uint8_t *codes,
                                 const float *scales, const float *t, const float *L, int64_t rank, const float *bias,
                                 float *y) {
    float *xp = (float *)malloc(sizeof(float) * (size_t)K);
    if (!xp) return SQ_ENOMEM;
    permute_x_byte(x, K, xp);
    const int64_t quads = K >= 6144 ? N / 4 : 0, units = quads + (N - 4 * quads);
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t u = 0; u < units; u++) {
        const int64_t n0 = u < quads ? 4 * u : 4 * quads + (u - quads);
        const int nr = u < quads ? 4 : 1;
        float acc[4];
        rows8(codes + n0 * K, scales + n0 * (K / group), group, K, xp, acc, nr);
        for (int r = 0; r < nr; r++) y[n0 + r] = finish_avx512(acc[r], 0, n0 + r, bias, t, L, rank);
    }
    free(xp);
    return SQ_OK;
}

/* Batch 1, 2- and 3-bit dense, AVX-512: the same idea on the 2-bit plane. A chunk is 8 blocks (256
 * weights); its sixteen 2-bit-plane dwords (two per block) sit in one zmm, and vector i (0..15) is the
 * table looked up at (v >> 2i): vpermps reads bits 0-3, i.e. pair i and, in bits 2-3, pair i+1.
 * 2-bit: the 4 levels are repeated 4 times in the 16-entry table, so bits 2-3 do not matter.
 * 3-bit: the 12-byte blocks are gathered into the pair dwords and the high-bit words with two vpermt2d;
 * per vector one more shift brings each weight's high bit to bit 2, and one vpternlogd keeps bits 0-1
 * from the pairs and the rest from that word (the 8 levels are repeated twice, so bit 3 does not matter).
 * Lane l of vector i holds weight 32(l/2) + 8(i%4) + 4(l%2) + i/4 of the chunk; x is permuted to that
 * order once per call, and lanes 2b, 2b+1 carry block b's scale. The last 1-7 blocks of a row use the
 * AVX2 block decode with x in natural order. */
static void permute_x_crumb(const float *x, int64_t K, float *xp) {
    int64_t c = 0;
    for (; c + 256 <= K; c += 256)
        for (int i = 0; i < 16; i++)
            for (int l = 0; l < 16; l++) xp[c + 16 * i + l] = x[c + 32 * (l / 2) + 8 * (i % 4) + 4 * (l % 2) + i / 4];
    for (; c < K; c++) xp[c] = x[c];
}

/* R weight rows (R = 1 or 2; codes at stride rb bytes, scales at stride spr) against MB rows of permuted x
 * (row stride K; MB = 1, 2 or 4): out[r * MB + m]. R and MB are compile-time constants in every caller. */
T_AVX512 static inline __attribute__((always_inline)) void
row_dot23_avx512(const uint8_t *row, const int bits, const __m512 table, const lut23_avx2_t *T, const float *scales,
                 int gshift, const __m512i sidx, const __mmask16 smask, int group, int64_t K, int64_t rb, int64_t spr,
                 const float *xp, float *out, const int R, const int MB) {
    const int64_t bpb = 4 * bits; /* bytes per block */
    const __m512i pidx = _mm512_set_epi32(22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 7, 6, 4, 3, 1, 0); /* 3(l/2) + l%2 */
    const __m512i hidx = _mm512_set_epi32(23, 23, 20, 20, 17, 17, 14, 14, 11, 11, 8, 8, 5, 5, 2, 2); /* 3(l/2) + 2 */
    const __m512i hshift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);         /* 4(l%2) */
    __m512 tot[8];
#pragma GCC unroll 8
    for (int i = 0; i < R * MB; i++) tot[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 256 <= K; k += 256) {
        __m512i v[2], h[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            const uint8_t *b = row + r * rb + k / 32 * bpb;
            _mm_prefetch((const char *)(b + SQ_PREFETCH), _MM_HINT_T0);
            if (bits == 3) _mm_prefetch((const char *)(b + SQ_PREFETCH + 64), _MM_HINT_T0);
            h[r] = _mm512_setzero_si512();
            if (bits == 2) {
                v[r] = _mm512_loadu_si512((const void *)b);
            } else {
                const __m512i lo = _mm512_loadu_si512((const void *)b), hi = _mm512_maskz_loadu_epi32(0x00FF, b + 64);
                v[r] = _mm512_permutex2var_epi32(lo, pidx, hi);
                h[r] = _mm512_srlv_epi32(_mm512_permutex2var_epi32(lo, hidx, hi), hshift);
            }
        }
        __m512 a0[8], a1[8];
#pragma GCC unroll 8
        for (int i = 0; i < R * MB; i++) { a0[i] = _mm512_setzero_ps(); a1[i] = _mm512_setzero_ps(); }
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            __m512 w[2];
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                __m512i idx = i ? _mm512_srli_epi32(v[r], 2 * i) : v[r];
                if (bits == 3) { /* weight's high bit: bit 8(i%4) + i/4 of h, moved to bit 2 */
                    const int sh = 8 * (i % 4) + i / 4;
                    const __m512i hb = sh >= 2 ? _mm512_srli_epi32(h[r], sh - 2) : _mm512_slli_epi32(h[r], 2 - sh);
                    idx = _mm512_ternarylogic_epi32(idx, hb, _mm512_set1_epi32(3), 0xE4); /* c ? a : b */
                }
                w[r] = _mm512_permutexvar_ps(idx, table);
            }
#pragma GCC unroll 4
            for (int m = 0; m < MB; m++) {
                const __m512 xv = _mm512_loadu_ps(xp + m * K + k + 16 * i);
#pragma GCC unroll 2
                for (int r = 0; r < R; r++) {
                    const int j = r * MB + m;
                    if (i & 1) a1[j] = _mm512_fmadd_ps(w[r], xv, a1[j]); else a0[j] = _mm512_fmadd_ps(w[r], xv, a0[j]);
                }
            }
        }
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            const __m512 sv = _mm512_permutexvar_ps(sidx, _mm512_maskz_loadu_ps(smask, scales + r * spr + (k >> gshift)));
#pragma GCC unroll 4
            for (int m = 0; m < MB; m++) tot[r * MB + m] = _mm512_fmadd_ps(_mm512_add_ps(a0[r * MB + m], a1[r * MB + m]), sv, tot[r * MB + m]);
        }
    }
    __m256 tail[8];
#pragma GCC unroll 8
    for (int i = 0; i < R * MB; i++) tail[i] = _mm256_setzero_ps();
    for (; k < K; k += 32)
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            __m256 w[4];
            block23_avx2(row + r * rb + k / 32 * bpb, bits, T, w);
            const __m256 sv = _mm256_set1_ps(scales[r * spr + k / group]);
#pragma GCC unroll 4
            for (int m = 0; m < MB; m++) {
                const float *xk = xp + m * K + k;
                __m256 p = _mm256_mul_ps(w[0], _mm256_loadu_ps(xk));
                p = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xk + 8), p);
                p = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xk + 16), p);
                p = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xk + 24), p);
                tail[r * MB + m] = _mm256_fmadd_ps(p, sv, tail[r * MB + m]);
            }
        }
#pragma GCC unroll 8
    for (int i = 0; i < R * MB; i++) out[i] = _mm512_reduce_add_ps(tot[i]) + hsum256(tail[i]);
}

T_AVX512 static int gemm23_avx512(int n_threads, int bits, const float *x, int64_t M, int64_t N, int64_t K, int group,
                                  const uint8_t *codes, const float *scales, const float *lut, const float *t,
                                  const float *L, int64_t rank, const float *bias, float *y) {
    float *xp = (float *)malloc(sizeof(float) * (size_t)(M * K));
    if (!xp) return SQ_ENOMEM;
    for (int64_t m = 0; m < M; m++) permute_x_crumb(x + m * K, K, xp + m * K);
    float t16[16];
    for (int e = 0; e < 16; e++) t16[e] = lut[bits == 2 ? (e & 3) : (e & 7)];
    const __m512 table = _mm512_loadu_ps(t16);
    const lut23_avx2_t T = lut23_avx2_init(lut, bits);
    /* lanes 2b, 2b+1 take block b's scale: index (32 b) / group among the chunk's 256 / group scales */
    const int gshift = group == 32 ? 5 : group == 64 ? 6 : group == 128 ? 7 : 8;
    const __m512i sidx = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), gshift - 4);
    const __mmask16 smask = (__mmask16)((1u << (256 / group)) - 1);
    const int64_t rb = K / 32 * (4 * bits), spr = K / group;
    /* Weight rows in pairs at batches of 2+ (each x load serves both), as in gemm4_avx512; then single rows. */
    const int RB = M == 1 ? 1 : 2;
    const int64_t blocks = N / RB, units = blocks + (N - RB * blocks);
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t u = 0; u < units; u++) {
        const int R = u < blocks ? RB : 1;
        const int64_t n0 = u < blocks ? RB * u : RB * blocks + (u - blocks);
        const uint8_t *row = codes + n0 * rb;
        const float *srow = scales + n0 * spr;
        for (int64_t m0 = 0; m0 < M;) { /* x rows in blocks of 4, then 2, then 1 */
            const int mb = M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;
            const float *xb = xp + m0 * K;
            float acc[8]; /* R x mb <= 8 */
#define SQ_R23(B, RR, MB) row_dot23_avx512(row, B, table, &T, srow, gshift, sidx, smask, group, K, rb, spr, xb, acc, RR, MB)
#define SQ_R23_MB(B, RR) (mb == 4 ? SQ_R23(B, RR, 4) : mb == 2 ? SQ_R23(B, RR, 2) : SQ_R23(B, RR, 1))
            if (bits == 2) { if (R == 2) SQ_R23_MB(2, 2); else SQ_R23_MB(2, 1); }
            else { if (R == 2) SQ_R23_MB(3, 2); else SQ_R23_MB(3, 1); }
#undef SQ_R23_MB
#undef SQ_R23
            store_block_avx512(y, acc, R, mb, m0, n0, N, bias, t, L, rank);
            m0 += mb;
        }
    }
    free(xp);
    return SQ_OK;
}
#endif


/* ---------------------------------------------------------------------------------------------- */
/* aarch64: NEON (dotprod has no separate exact-fp32 kernel: int8 dot products need int8 activations,
 * which only the opt-in SQ_FLAG_INT8_ACT path uses) */

#ifdef SQ_ARM
static float dot_neon(const float *a, const float *b, int64_t n) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0), a2 = vdupq_n_f32(0), a3 = vdupq_n_f32(0);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(a + i), vld1q_f32(b + i));
        a1 = vfmaq_f32(a1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* The 32 codes of one block as bytes in column order: cs[0] = weights 0-15, cs[1] = 16-31
 * (docs/format.md "Code packing": 4-bit nibbles; the 2-bit plane's byte j holds weights j, j+8,
 * j+16, j+24; 3-bit adds bit i of a uint32 as weight i's bit 2, tested per lane with `vtst`). */
static inline void codes_neon(const uint8_t *b, int bits, uint8x16_t cs[2]) {
    if (bits == 4) {
        const uint8x16_t v = vld1q_u8(b);
        cs[0] = vandq_u8(v, vdupq_n_u8(15));
        cs[1] = vshrq_n_u8(v, 4);
        return;
    }
    const uint8x8_t v = vld1_u8(b), m3 = vdup_n_u8(3);
    cs[0] = vcombine_u8(vand_u8(v, m3), vand_u8(vshr_n_u8(v, 2), m3));
    cs[1] = vcombine_u8(vand_u8(vshr_n_u8(v, 4), m3), vshr_n_u8(v, 6));
    if (bits == 3) {
        static const uint8_t sel[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
        const uint8x16_t bitsel = vld1q_u8(sel), four = vdupq_n_u8(4);
        const uint8x16_t h01 = vcombine_u8(vdup_n_u8(b[8]), vdup_n_u8(b[9]));
        const uint8x16_t h23 = vcombine_u8(vdup_n_u8(b[10]), vdup_n_u8(b[11]));
        cs[0] = vorrq_u8(cs[0], vandq_u8(vtstq_u8(h01, bitsel), four));
        cs[1] = vorrq_u8(cs[1], vandq_u8(vtstq_u8(h23, bitsel), four));
    }
}

static void decode_row_neon(const uint8_t *row, int bits, const float *lut, const float *scales,
                            int per_group, int64_t n_stored, float *out) {
    if (bits == 8) { /* int8 levels widened to fp32 (exact), 16 at a time */
        for (int64_t k = 0; k < n_stored; k += 16) {
            const int8x16_t b = vld1q_s8((const int8_t *)row + k);
            const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_s8(vget_high_s8(b));
            const float32x4_t s = vdupq_n_f32(scales[k / per_group]);
            vst1q_f32(out + k, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), s));
            vst1q_f32(out + k + 4, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))), s));
            vst1q_f32(out + k + 8, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), s));
            vst1q_f32(out + k + 12, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))), s));
        }
        return;
    }
    /* 2-, 3- and 4-bit codes become 32 code bytes per block in column order (`codes_neon`), then one
     * table lookup per byte plane: 2 planes for format 2's bfloat16 levels, 4 otherwise. */
    const int levels = 1 << bits, bpb = 4 * bits;
    if (lut_is_bf16(lut, levels)) { /* format 2's bfloat16 levels: only the two high byte planes */
        uint8_t p[2][16] = {{0}};
        for (int e = 0; e < levels; e++) {
            uint32_t u; memcpy(&u, &lut[e], 4);
            p[0][e] = (uint8_t)(u >> 16);
            p[1][e] = (uint8_t)(u >> 24);
        }
        const uint8x16_t lo_plane = vld1q_u8(p[0]), hi_plane = vld1q_u8(p[1]);
        for (int64_t t = 0; t < n_stored / 32; t++) {
            uint8x16_t cs[2];
            codes_neon(row + bpb * t, bits, cs);
            const float32x4_t s = vdupq_n_f32(scales[(t * 32) / per_group]);
            for (int h = 0; h < 2; h++) {
                /* 16 bf16 words in column order; a word shifted into the top half is its exact float */
                const uint8x16x2_t w = vzipq_u8(vqtbl1q_u8(lo_plane, cs[h]), vqtbl1q_u8(hi_plane, cs[h]));
                const uint16x8_t w0 = vreinterpretq_u16_u8(w.val[0]), w1 = vreinterpretq_u16_u8(w.val[1]);
                float *o = out + 32 * t + 16 * h;
                vst1q_f32(o, vmulq_f32(vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(w0), 16)), s));
                vst1q_f32(o + 4, vmulq_f32(vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(w0), 16)), s));
                vst1q_f32(o + 8, vmulq_f32(vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(w1), 16)), s));
                vst1q_f32(o + 12, vmulq_f32(vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(w1), 16)), s));
            }
        }
        return;
    }
    uint8x16_t plane[4];
    {
        uint8_t p[4][16] = {{0}};
        for (int e = 0; e < levels; e++) {
            uint32_t u; memcpy(&u, &lut[e], 4);
            for (int q = 0; q < 4; q++) p[q][e] = (uint8_t)(u >> (8 * q));
        }
        for (int q = 0; q < 4; q++) plane[q] = vld1q_u8(p[q]);
    }
    for (int64_t t = 0; t < n_stored / 32; t++) {
        uint8x16_t cs[2];
        codes_neon(row + bpb * t, bits, cs);
        float32x4_t s = vdupq_n_f32(scales[(t * 32) / per_group]);
        for (int h = 0; h < 2; h++) {
            uint8x16_t b0 = vqtbl1q_u8(plane[0], cs[h]), b1 = vqtbl1q_u8(plane[1], cs[h]);
            uint8x16_t b2 = vqtbl1q_u8(plane[2], cs[h]), b3 = vqtbl1q_u8(plane[3], cs[h]);
            /* interleave the 4 byte planes into 16 little-endian floats */
            uint8x16x2_t z01 = vzipq_u8(b0, b1), z23 = vzipq_u8(b2, b3);
            uint16x8x2_t lo = vzipq_u16(vreinterpretq_u16_u8(z01.val[0]), vreinterpretq_u16_u8(z23.val[0]));
            uint16x8x2_t hi = vzipq_u16(vreinterpretq_u16_u8(z01.val[1]), vreinterpretq_u16_u8(z23.val[1]));
            float *o = out + 32 * t + 16 * h;
            vst1q_f32(o, vmulq_f32(vreinterpretq_f32_u16(lo.val[0]), s));
            vst1q_f32(o + 4, vmulq_f32(vreinterpretq_f32_u16(lo.val[1]), s));
            vst1q_f32(o + 8, vmulq_f32(vreinterpretq_f32_u16(hi.val[0]), s));
            vst1q_f32(o + 12, vmulq_f32(vreinterpretq_f32_u16(hi.val[1]), s));
        }
    }
}

/* Batch 1, 2/3/4-bit dense, NEON: the decoder's lookups fused with the dot. The table values meet x
 * in registers (natural column order, as `codes_neon` gives them) and each group's sum is scaled
 * once, instead of storing the scaled row and reading it back for a separate dot: per 16 weights
 * 4 multiplies, 4 stores and 4 loads fewer. Checked against scalar C under qemu; not timed on ARM. */
static inline __attribute__((always_inline)) float row_dot_neon(const uint8_t *row, const int bits, const int bf16,
                                                                const uint8x16_t plane[4], const float *scales,
                                                                int group, int64_t K, const float *x) {
    const int bpb = 4 * bits;
    float32x4_t tot = vdupq_n_f32(0);
    for (int64_t g0 = 0; g0 < K; g0 += group) {
        float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0);
        for (int64_t k = g0; k < g0 + group; k += 32) {
            uint8x16_t cs[2];
            codes_neon(row + k / 32 * bpb, bits, cs);
            for (int h = 0; h < 2; h++) {
                const float *xk = x + k + 16 * h;
                float32x4_t f0, f1, f2, f3;
                if (bf16) { /* format 2: two byte planes give bf16 words; a word in the top half is its float */
                    const uint8x16x2_t w = vzipq_u8(vqtbl1q_u8(plane[0], cs[h]), vqtbl1q_u8(plane[1], cs[h]));
                    const uint16x8_t w0 = vreinterpretq_u16_u8(w.val[0]), w1 = vreinterpretq_u16_u8(w.val[1]);
                    f0 = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(w0), 16));
                    f1 = vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(w0), 16));
                    f2 = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(w1), 16));
                    f3 = vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(w1), 16));
                } else { /* four byte planes interleaved into little-endian floats */
                    const uint8x16x2_t z01 = vzipq_u8(vqtbl1q_u8(plane[0], cs[h]), vqtbl1q_u8(plane[1], cs[h]));
                    const uint8x16x2_t z23 = vzipq_u8(vqtbl1q_u8(plane[2], cs[h]), vqtbl1q_u8(plane[3], cs[h]));
                    const uint16x8x2_t lo = vzipq_u16(vreinterpretq_u16_u8(z01.val[0]), vreinterpretq_u16_u8(z23.val[0]));
                    const uint16x8x2_t hi = vzipq_u16(vreinterpretq_u16_u8(z01.val[1]), vreinterpretq_u16_u8(z23.val[1]));
                    f0 = vreinterpretq_f32_u16(lo.val[0]);
                    f1 = vreinterpretq_f32_u16(lo.val[1]);
                    f2 = vreinterpretq_f32_u16(hi.val[0]);
                    f3 = vreinterpretq_f32_u16(hi.val[1]);
                }
                a0 = vfmaq_f32(a0, f0, vld1q_f32(xk));
                a1 = vfmaq_f32(a1, f1, vld1q_f32(xk + 4));
                a0 = vfmaq_f32(a0, f2, vld1q_f32(xk + 8));
                a1 = vfmaq_f32(a1, f3, vld1q_f32(xk + 12));
            }
        }
        tot = vfmaq_n_f32(tot, vaddq_f32(a0, a1), scales[g0 / group]);
    }
    return vaddvq_f32(tot);
}

/* Batch 1, 8-bit dense, NEON (the packed output head of head_bits=8): int8 codes widened to fp32 in
 * registers (exact) and dotted per group, one scale multiply per group. */
static float row_dot8_neon(const uint8_t *row, const float *scales, int group, int64_t K, const float *x) {
    float32x4_t tot = vdupq_n_f32(0);
    for (int64_t g0 = 0; g0 < K; g0 += group) {
        float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0);
        for (int64_t k = g0; k < g0 + group; k += 16) {
            const int8x16_t b = vld1q_s8((const int8_t *)row + k);
            const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_s8(vget_high_s8(b));
            a0 = vfmaq_f32(a0, vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vld1q_f32(x + k));
            a1 = vfmaq_f32(a1, vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))), vld1q_f32(x + k + 4));
            a0 = vfmaq_f32(a0, vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vld1q_f32(x + k + 8));
            a1 = vfmaq_f32(a1, vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))), vld1q_f32(x + k + 12));
        }
        tot = vfmaq_n_f32(tot, vaddq_f32(a0, a1), scales[g0 / group]);
    }
    return vaddvq_f32(tot);
}

static int gemv_neon(int n_threads, int bits, const float *x, int64_t N, int64_t K, int group, const uint8_t *codes,
                     const float *scales, const float *lut, const float *t, const float *L, int64_t rank,
                     const float *bias, float *y) {
    const int levels = bits == 8 ? 0 : 1 << bits, bf16 = bits != 8 && lut_is_bf16(lut, levels);
    uint8_t p[4][16] = {{0}};
    for (int e = 0; e < levels; e++) { /* (8-bit: no table) */
        uint32_t u; memcpy(&u, &lut[e], 4);
        if (bf16) { p[0][e] = (uint8_t)(u >> 16); p[1][e] = (uint8_t)(u >> 24); }
        else for (int q = 0; q < 4; q++) p[q][e] = (uint8_t)(u >> (8 * q));
    }
    uint8x16_t plane[4];
    for (int q = 0; q < 4; q++) plane[q] = vld1q_u8(p[q]);
    const int64_t rb = bits == 8 ? K : K / 32 * (4 * bits), spr = K / group;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *r = codes + n * rb;
        const float *sr = scales + n * spr;
        float acc;
        /* literal bits / bf16 per call: each combination is its own inlined loop */
        if (bits == 8) acc = row_dot8_neon(r, sr, group, K, x);
        else if (bits == 4) acc = bf16 ? row_dot_neon(r, 4, 1, plane, sr, group, K, x) : row_dot_neon(r, 4, 0, plane, sr, group, K, x);
        else if (bits == 3) acc = bf16 ? row_dot_neon(r, 3, 1, plane, sr, group, K, x) : row_dot_neon(r, 3, 0, plane, sr, group, K, x);
        else acc = bf16 ? row_dot_neon(r, 2, 1, plane, sr, group, K, x) : row_dot_neon(r, 2, 0, plane, sr, group, K, x);
        if (bias) acc += bias[n];
        if (rank > 0) acc += dot_neon(t, L + n * rank, rank);
        y[n] = acc;
    }
    return SQ_OK;
}

__attribute__((target("arch=armv8.2-a+dotprod")))
static float dot_dotprod(const float *a, const float *b, int64_t n) { return dot_neon(a, b, n); }

/* Opt-in 8-bit-activation batch-1 path on dotprod CPUs (SQ_FLAG_INT8_ACT), 4-bit dense: the same
 * approximation as the AVX2 one (same x blocks, same levels, so both give the same integer sums), with
 * signed levels looked up by one vqtbl1q per 16 codes and 16 products per sdot. */
__attribute__((target("arch=armv8.2-a+dotprod")))
static float row_dot4_int8_dotprod(const uint8_t *row, const float *scales, int group, int64_t K,
                                   const int8_t *xq, const float *xs, int8x16_t table) {
    const uint8x16_t m4 = vdupq_n_u8(15);
    float32x4_t tot = vdupq_n_f32(0);
    const int64_t bpg = group / 32;
    for (int64_t g = 0, b = 0; g < K / group; g++) {
        float32x4_t a = vdupq_n_f32(0);
        for (const int64_t e = b + bpg; b < e; b++) {
            const uint8x16_t v = vld1q_u8(row + 16 * b);
            const int8x16_t wl = vqtbl1q_s8(table, vandq_u8(v, m4)), wh = vqtbl1q_s8(table, vshrq_n_u8(v, 4));
            int32x4_t acc = vdotq_s32(vdupq_n_s32(0), wl, vld1q_s8(xq + 32 * b));
            acc = vdotq_s32(acc, wh, vld1q_s8(xq + 32 * b + 16));
            a = vfmaq_n_f32(a, vcvtq_f32_s32(acc), xs[b]);
        }
        tot = vfmaq_n_f32(tot, a, scales[g]);
    }
    return vaddvq_f32(tot);
}

static int gemv4_int8_dotprod(int n_threads, const float *x, int64_t N, int64_t K, int group,
                              const uint8_t *codes, const float *scales, const float *lut,
                              const float *t, const float *L, int64_t rank, const float *bias, float *y) {
    int8_t m[16];
    const float lscale = int8_levels(lut, m);
    const int8x16_t table = vld1q_s8(m);
    const int64_t nb = K / 32;
    int8_t *xq = (int8_t *)malloc((size_t)K + sizeof(float) * (size_t)nb);
    if (!xq) return SQ_ENOMEM;
    float *xs = (float *)(void *)(xq + K); /* K is a multiple of 32: 4-byte aligned */
    quantize_x_int8(x, K, 0, xq, xs, NULL); /* signed levels: no offset to remove */
    for (int64_t b = 0; b < nb; b++) xs[b] *= lscale;
    const int64_t spr = K / group;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t n = 0; n < N; n++) {
        float acc = row_dot4_int8_dotprod(codes + n * (K / 2), scales + n * spr, group, K, xq, xs, table);
        if (bias) acc += bias[n];
        if (rank > 0) acc += dot_neon(t, L + n * rank, rank);
        y[n] = acc;
    }
    free(xq);
    return SQ_OK;
}
#endif

/* ---------------------------------------------------------------------------------------------- */
/* Dispatch and the driver                                                                        */

typedef float (*dot_fn)(const float *, const float *, int64_t);
typedef void (*decode_fn)(const uint8_t *, int, const float *, const float *, int, int64_t, float *);

static int pick(int isa, dot_fn *dot, decode_fn *dec) {
    *dot = dot_scalar; *dec = decode_row_scalar;
    switch (isa) {
    case ISA_SCALAR: return 0;
#ifdef SQ_X86
    case ISA_AVX2: *dot = dot_avx2; *dec = decode_row_avx2; return 0;
    case ISA_AVX512: *dot = dot_avx512; *dec = decode_row_avx512; return 0;
#endif
#ifdef SQ_ARM
    case ISA_NEON: *dot = dot_neon; *dec = decode_row_neon; return 0;
    case ISA_DOTPROD: *dot = dot_dotprod; *dec = decode_row_neon; return 0;
#endif
    default: return -1;
    }
}

/* Scatter the row's kept weights to their dense columns (mask bit i of byte j = column 8j+i).
 * Table driven and branch-free: kept_pos[m] lists the set bits of byte m. Returns how many stored
 * weights the mask consumed; `stored` must have 8 readable floats past the row's n_stored. */
static uint8_t kept_pos[256][8];
static uint8_t kept_cnt[256];
static int32_t kept_idx[256][8]; /* lane i of byte m: rank of bit i among the set bits, or -1 */
static void init_tables(void) {
    /* idempotent; called before any parallel region, and concurrent callers write identical values */
    static int done = 0;
    if (__atomic_load_n(&done, __ATOMIC_ACQUIRE)) return;
    for (int m = 0; m < 256; m++) {
        int c = 0;
        for (int i = 0; i < 8; i++) kept_idx[m][i] = (m >> i & 1) ? c++ : -1;
        c = 0;
        for (int i = 0; i < 8; i++) if (m >> i & 1) kept_pos[m][c++] = (uint8_t)i;
        for (int i = c; i < 8; i++) kept_pos[m][i] = 0;
        kept_cnt[m] = (uint8_t)c;
    }
#ifdef SQ_X86
    init_ctl_tables();
#endif
    __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
}

static int64_t scatter_sparse(const float *stored, const uint8_t *mask, int64_t K, int64_t n_stored, float *dense) {
    int64_t s = 0;
    for (int64_t j = 0; j < K / 8; j++) {
        const unsigned m = mask[j];
        float *d = dense + 8 * j;
        for (int i = 0; i < 8; i++) d[i] = 0.0f;
        if (s + kept_cnt[m] > n_stored) return -1; /* more kept than stored: stop before reading past */
        for (int i = 0; i < kept_cnt[m]; i++) d[kept_pos[m][i]] = stored[s + i];
        s += kept_cnt[m];
    }
    return s;
}

#ifdef SQ_X86
/* Same with one permute per byte: lane i takes stored[s + rank of bit i], zeroed where bit i is clear. */
T_AVX2 static int64_t scatter_sparse_avx2(const float *stored, const uint8_t *mask, int64_t K, int64_t n_stored, float *dense) {
    int64_t s = 0;
    for (int64_t j = 0; j < K / 8; j++) {
        const unsigned m = mask[j];
        if (s + kept_cnt[m] > n_stored) return -1;
        __m256i idx = _mm256_loadu_si256((const __m256i *)kept_idx[m]);
        __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(stored + s), idx);
        v = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(-1))));
        _mm256_storeu_ps(dense + 8 * j, v);
        s += kept_cnt[m];
    }
    return s;
}
#endif

#ifdef SQ_X86
/* Batch > 1: two decoded weight rows times up to four activation rows, 8 accumulators, so each
 * weight load feeds up to 4 FMAs and each x load 2 (K is a multiple of 32). out[r * 4 + j]. */
T_AVX2 static void mk2x4_avx2(const float *w0, const float *w1, const float *x, int64_t K, int64_t mc, float *out) {
    const float *x0 = x, *x1 = x + (mc > 1 ? K : 0), *x2 = x + (mc > 2 ? 2 * K : 0), *x3 = x + (mc > 3 ? 3 * K : 0);
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c02 = _mm256_setzero_ps(), c03 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(), c12 = _mm256_setzero_ps(), c13 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        const __m256 a = _mm256_loadu_ps(w0 + k), b = _mm256_loadu_ps(w1 + k);
        __m256 v = _mm256_loadu_ps(x0 + k);
        c00 = _mm256_fmadd_ps(a, v, c00); c10 = _mm256_fmadd_ps(b, v, c10);
        v = _mm256_loadu_ps(x1 + k);
        c01 = _mm256_fmadd_ps(a, v, c01); c11 = _mm256_fmadd_ps(b, v, c11);
        v = _mm256_loadu_ps(x2 + k);
        c02 = _mm256_fmadd_ps(a, v, c02); c12 = _mm256_fmadd_ps(b, v, c12);
        v = _mm256_loadu_ps(x3 + k);
        c03 = _mm256_fmadd_ps(a, v, c03); c13 = _mm256_fmadd_ps(b, v, c13);
    }
    out[0] = hsum256(c00); out[1] = hsum256(c01); out[2] = hsum256(c02); out[3] = hsum256(c03);
    out[4] = hsum256(c10); out[5] = hsum256(c11); out[6] = hsum256(c12); out[7] = hsum256(c13);
}
#endif

static int64_t row_bytes(int64_t n_stored, int bits) { return bits == 8 ? n_stored : n_stored / 32 * (4 * bits); }

#ifdef SQ_X86
/* Batch 1, 4-bit codes, AVX2 (also used by the AVX-512 path for sparse rows): the fused
 * lookup-and-dot kernels above; x is permuted once (dense) and shared by every row and thread. */
T_AVX2 static int gemv4_avx2(int n_threads, const float *x, int64_t N, int64_t K, int group, int sparsity,
                             const uint8_t *codes, const float *scales, const uint8_t *mask, const float *lut,
                             const float *t, const float *L, int64_t rank, const float *bias, float *y) {
    const lut4_avx2_t T = lut4_avx2_init(lut);
    const int bf16 = lut_is_bf16(lut, 16); /* format 2's codebook: the 2-plane lookup */
    const lut2_avx2_t T2 = lut2_avx2_init(lut);
    const int64_t spr = K / group;
    int bad_mask = 0;
    float *xp = (float *)malloc(sizeof(float) * (size_t)(sparsity ? 2 * K : K));
    if (!xp) return SQ_ENOMEM;
    float *xq = xp + (sparsity ? K : 0);
    if (sparsity) sparse_x_pq(x, K, xp, xq);
    else if (bf16) permute_x64_bf16(x, K, xp);
    else permute_x64(x, K, xp);
    const int64_t rb = sparsity ? K / 4 : K / 2;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t n = 0; n < N; n++) {
        float acc;
        if (sparsity) {
            int bad_row;
            acc = bf16 ? row_dot4_sparse_pq_bf16_avx2(codes + n * rb, mask + n * (K / 8), scales + n * spr, group / 2,
                                                      K / 2, xp, xq, &T2, &bad_row)
                       : row_dot4_sparse_pq_avx2(codes + n * rb, mask + n * (K / 8), scales + n * spr, group / 2, K / 2,
                                                 xp, xq, &T, &bad_row);
            if (bad_row) { /* wrong numbers only (every read stays inside the row), but an error */
                #pragma omp atomic write
                bad_mask = 1;
                continue;
            }
        } else if (bf16) {
            acc = row_dot4_bf16_avx2(codes + n * rb, scales + n * spr, group, K, xp, &T2);
        } else {
            acc = row_dot4_pshufb64_avx2(codes + n * rb, scales + n * spr, group, K, xp, &T);
        }
        if (bias) acc += bias[n];
        if (rank > 0) acc += dot_avx2(t, L + n * rank, rank);
        y[n] = acc;
    }
    free(xp);
    return bad_mask ? SQ_EBADLEN : SQ_OK;
}
#endif

/* Every length a layer's buffers must have, checked before any kernel reads them (0 or SQ_E*). */
static int check_layer(int isa, int64_t N, int64_t K, int bits, int group, int sparsity, int64_t codes_len,
                       int64_t scales_len, const uint8_t *mask, int64_t mask_len, const float *lut, int64_t lut_len,
                       const float *L, const float *R, int64_t rank, int64_t L_len, int64_t R_len,
                       const float *bias, int64_t bias_len) {
    if (N <= 0 || K <= 0 || rank < 0) return SQ_EBADARG;
    if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8)) return SQ_EBADARG;
    if (!(group == 32 || group == 64 || group == 128 || group == 256) || K % group || (sparsity && group == 32))
        return SQ_EBADARG; /* the format's group sizes (docs/format.md); the kernels rely on them */
    if (sparsity < 0 || sparsity > 2) return SQ_EBADARG;
    if (!sqlora_cpu_isa_supported(isa)) return SQ_EISA;
    const int64_t rb = row_bytes(sparsity ? K / 2 : K, bits);
    if (codes_len != N * rb || scales_len != N * (K / group)) return SQ_EBADLEN;
    if (sparsity && (mask == NULL || mask_len != N * (K / 8))) return SQ_EBADLEN;
    if (bits != 8 && (lut == NULL || lut_len != (1 << bits))) return SQ_EBADLEN;
    if (rank > 0 && (L == NULL || R == NULL || L_len != N * rank || R_len != rank * K)) return SQ_EBADLEN;
    if (bias && bias_len != N) return SQ_EBADLEN;
    return SQ_OK;
}

/*
 * x [M, K] fp32, y [M, N] fp32 (written). codes [N, row_bytes] u8, scales [N, K/g] fp32,
 * mask [N, K/8] u8 or NULL (dense), lut: 2^bits fp32 (ignored for 8-bit), L [N, r] fp32, R [r, K]
 * fp32, bias [N] fp32 or NULL. `*_len` are the element counts the caller owns; every read is
 * checked against them before any row is touched. Returns 0 or a negative SQ_E* code.
 */
static int linear_impl(int isa, int flags, int n_threads, const float *x, int64_t M, int64_t N, int64_t K,
                       int bits, int group, int sparsity,
                       const uint8_t *codes, int64_t codes_len, const float *scales, int64_t scales_len,
                       const uint8_t *mask, int64_t mask_len, const float *lut, int64_t lut_len,
                       const float *L, const float *R, int64_t rank, int64_t L_len, int64_t R_len,
                       const float *bias, int64_t bias_len, float *y) {
    if (M <= 0 || n_threads <= 0) return SQ_EBADARG;
    const int rc_layer = check_layer(isa, N, K, bits, group, sparsity, codes_len, scales_len, mask, mask_len, lut,
                                     lut_len, L, R, rank, L_len, R_len, bias, bias_len);
    if (rc_layer) return rc_layer;
    const int64_t n_stored = sparsity ? K / 2 : K;
    const int per_group = sparsity ? group / 2 : group;
    const int64_t rb = row_bytes(n_stored, bits);
    init_tables();
    dot_fn dot; decode_fn dec;
    if (pick(isa, &dot, &dec)) return SQ_EISA;

    float *t = NULL; /* t = x R^T, [M, rank] */
    if (rank > 0) {
        t = (float *)malloc(sizeof(float) * (size_t)(M * rank));
        if (!t) return SQ_ENOMEM;
        #pragma omp parallel for num_threads(n_threads) schedule(static) collapse(2) if (n_threads > 1)
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = 0; i < rank; i++) t[m * rank + i] = dot(x + m * K, R + i * K, K);
    }
    /* Small layers: an OpenMP fork/join costs more than it saves (SmolLM2's 576-wide layers). */
    if (M * N * K < ((int64_t)1 << 19)) n_threads = 1;
#ifdef SQ_ARM
    if ((flags & SQ_FLAG_INT8_ACT) && M == 1 && bits == 4 && !sparsity && isa == ISA_DOTPROD) {
        int rc = gemv4_int8_dotprod(n_threads, x, N, K, group, codes, scales, lut, t, L, rank, bias, y);
        free(t);
        return rc;
    }
    if (M == 1 && !sparsity && (isa == ISA_NEON || isa == ISA_DOTPROD)) {
        int rc = gemv_neon(n_threads, bits, x, N, K, group, codes, scales, lut, t, L, rank, bias, y);
        free(t);
        return rc;
    }
#endif
#ifdef SQ_X86
    if ((flags & (SQ_FLAG_INT_ACT | SQ_FLAG_INT8_ACT)) && M == 1 && bits == 4 && !sparsity && K % 64 == 0 &&
        (isa == ISA_AVX2 || isa == ISA_AVX512)) {
        int rc = (flags & SQ_FLAG_INT8_ACT)
                     ? gemv4_int8_avx2(n_threads, x, N, K, group, codes, scales, lut, t, L, rank, bias, y)
                     : gemv4_int_avx2(n_threads, x, N, K, group, codes, scales, lut, t, L, rank, bias, y);
        free(t);
        return rc;
    }
    if (M == 1 && bits == 8 && !sparsity && isa == ISA_AVX512) {
        int rc = gemv8_avx512(n_threads, x, N, K, group, codes, scales, t, L, rank, bias, y);
        free(t);
        return rc;
    }
    if (M == 1 && bits == 8 && !sparsity && isa == ISA_AVX2) {
        const int64_t spr = K / group;
        #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
        for (int64_t n = 0; n < N; n++) {
            float acc = row_dot8_avx2(codes + n * K, scales + n * spr, group, K, x);
            if (bias) acc += bias[n];
            if (rank > 0) acc += dot_avx2(t, L + n * rank, rank);
            y[n] = acc;
        }
        free(t);
        return SQ_OK;
    }
    if (M <= SQ_SMALL_M && (bits == 2 || bits == 3) && !sparsity && isa == ISA_AVX512) {
        int rc = gemm23_avx512(n_threads, bits, x, M, N, K, group, codes, scales, lut, t, L, rank, bias, y);
        free(t);
        return rc;
    }
    if (M == 1 && (bits == 2 || bits == 3) && !sparsity && isa == ISA_AVX2) {
        const lut23_avx2_t T = lut23_avx2_init(lut, bits);
        const int64_t spr = K / group, rb23 = row_bytes(K, bits);
        #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
        for (int64_t n = 0; n < N; n++) {
            float acc = bits == 2 ? row_dot2_avx2(codes + n * rb23, &T, scales + n * spr, group, K, x)
                                  : row_dot3_avx2(codes + n * rb23, &T, scales + n * spr, group, K, x);
            if (bias) acc += bias[n];
            if (rank > 0) acc += dot_avx2(t, L + n * rank, rank);
            y[n] = acc;
        }
        free(t);
        return SQ_OK;
    }
    if (bits == 4 && !sparsity && isa == ISA_AVX512 && cpu_has_bf16() && lut_is_bf16(lut, 16)) {
        int T = (flags & SQ_FLAG_BF16_X) ? 1 : (flags & SQ_FLAG_EXACT) ? 0 : 2;
        /* fp32 batches of 3..SQ_SMALL_M rows: the exact row-pair kernel (gemm4_avx512) is as fast or faster
         * than the split (1.0-1.6x, 1 and 2 threads, 1536 x 576 to 4096 x 11008, 2026-12-07) */
        if (T == 2 && M > SQ_WORDS_MAX_M && M <= SQ_SMALL_M) T = 0;
        if (T) {
            int rc = M <= SQ_WORDS_MAX_M
                         ? gemv4_words_avx512(n_threads, T, x, M, N, K, group, codes, scales, lut, t, L, rank, bias, y)
                         : gemm4_bf16_avx512(n_threads, T, x, M, N, K, group, codes, scales, lut, t, L, rank, bias, y);
            free(t);
            return rc;
        }
    }
    if (M <= SQ_SMALL_M && bits == 4 && !sparsity && isa == ISA_AVX512) {
        int rc = gemm4_avx512(n_threads, x, M, N, K, group, codes, scales, lut, t, L, rank, bias, y);
        free(t);
        return rc;
    }
    if (M <= SQ_SPARSE_WORDS_MAX_M && bits == 4 && sparsity && isa == ISA_AVX512 && !(flags & SQ_FLAG_EXACT) &&
        cpu_has_vbmi2() && cpu_has_bf16() && lut_is_bf16(lut, 16) && zero_code(lut) >= 0) {
        int rc = gemm4_sparse_words(n_threads, (flags & SQ_FLAG_BF16_X) ? 1 : 2, x, M, N, K, group, zero_code(lut),
                                    codes, scales, mask, lut, t, L, rank, bias, y);
        free(t);
        return rc;
    }
    if (M <= SQ_SMALL_M && bits == 4 && sparsity && isa == ISA_AVX512 && cpu_has_vbmi2()) {
        const int z = zero_code(lut); /* no exact zero level: the AVX2 row below */
        if (z >= 0) {
            int rc = gemm4_sparse_vbmi2(n_threads, x, M, N, K, group, z, codes, scales, mask, lut, t, L, rank, bias, y);
            free(t);
            return rc;
        }
    }
    if (M == 1 && bits == 4 && (isa == ISA_AVX2 || (isa == ISA_AVX512 && sparsity))) {
        int rc = gemv4_avx2(n_threads, x, N, K, group, sparsity, codes, scales, mask, lut, t, L, rank, bias, y);
        free(t);
        return rc;
    }
#endif
    /* Two decode buffers per thread (rows are handled in pairs), allocated up front so no thread can
     * fail inside the region; +16: vector loads past a row's end. */
    const size_t per_thread = (size_t)(2 * K + n_stored + 16);
    int bad_mask = 0;
#ifdef SQ_X86
    const int simd = isa == ISA_AVX2 || isa == ISA_AVX512;
#endif
    int64_t (*scatter)(const float *, const uint8_t *, int64_t, int64_t, float *) = scatter_sparse;
#ifdef SQ_X86
    if (simd) scatter = scatter_sparse_avx2;
#endif
    float *buf = (float *)malloc(sizeof(float) * per_thread * (size_t)n_threads);
    if (!buf) { free(t); return SQ_ENOMEM; }
    const int64_t pairs = (N + 1) / 2;
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
#ifdef _OPENMP
        float *wbuf = buf + per_thread * (size_t)omp_get_thread_num();
#else
        float *wbuf = buf;
#endif
        float *stored = wbuf + 2 * K;
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) {
            const int64_t n0 = 2 * p, nr = n0 + 1 < N ? 2 : 1;
            int ok = 1;
            for (int64_t r = 0; r < nr; r++) {
                const int64_t n = n0 + r;
                const float *srow = scales + n * (K / group);
                float *wrow = wbuf + r * K;
                if (sparsity) {
                    dec(codes + n * rb, bits, lut, srow, per_group, n_stored, stored);
                    for (int i = 0; i < 16; i++) stored[n_stored + i] = 0.0f;
                    if (scatter(stored, mask + n * (K / 8), K, n_stored, wrow) != n_stored) ok = 0;
                } else {
                    dec(codes + n * rb, bits, lut, srow, per_group, n_stored, wrow);
                }
            }
            if (!ok) {
                #pragma omp atomic write
                bad_mask = 1;
                continue;
            }
            const float *w1 = wbuf + (nr == 2 ? K : 0);
            int64_t m = 0;
#ifdef SQ_X86
            if (simd && M > 1) {
                for (; m < M; m += 4) {
                    const int64_t mc = M - m < 4 ? M - m : 4;
                    float o[8];
                    mk2x4_avx2(wbuf, w1, x + m * K, K, mc, o);
                    for (int64_t r = 0; r < nr; r++) {
                        const int64_t n = n0 + r;
                        for (int64_t j = 0; j < mc; j++) {
                            float acc = o[4 * r + j] + (bias ? bias[n] : 0.0f);
                            if (rank > 0) acc += dot(t + (m + j) * rank, L + n * rank, rank);
                            y[(m + j) * N + n] = acc;
                        }
                    }
                }
            }
#endif
            for (; m < M; m++)
                for (int64_t r = 0; r < nr; r++) {
                    const int64_t n = n0 + r;
                    float acc = dot(wbuf + r * K, x + m * K, K) + (bias ? bias[n] : 0.0f);
                    if (rank > 0) acc += dot(t + m * rank, L + n * rank, rank);
                    y[m * N + n] = acc;
                }
        }
    }
    free(buf);
    free(t);
    return bad_mask ? SQ_EBADLEN : SQ_OK;
}


/* The same call with the layer's constant arguments in one int64 array, built once per layer by the
 * Python side (sqlora_hf/kernels/cpu/ops.py `describe`), so a call marshals 6 arguments, not 25:
 * d = [N, K, bits, group, sparsity, codes, codes_len, scales, scales_len, mask, mask_len, lut,
 *      lut_len, L, R, rank, L_len, R_len, bias, bias_len] (pointers as integers, 0 = NULL).
 * Every length is still checked by sqlora_cpu_linear. */
int sqlora_cpu_linear(int isa, int n_threads, const float *x, int64_t M, int64_t N, int64_t K,
                      int bits, int group, int sparsity,
                      const uint8_t *codes, int64_t codes_len, const float *scales, int64_t scales_len,
                      const uint8_t *mask, int64_t mask_len, const float *lut, int64_t lut_len,
                      const float *L, const float *R, int64_t rank, int64_t L_len, int64_t R_len,
                      const float *bias, int64_t bias_len, float *y) {
    return linear_impl(isa, 0, n_threads, x, M, N, K, bits, group, sparsity, codes, codes_len, scales, scales_len,
                       mask, mask_len, lut, lut_len, L, R, rank, L_len, R_len, bias, bias_len, y);
}

/* Rows [n0, n1) of the layer's dequantized weights into w [n1 - n0, K] fp32: table value times group
 * scale, exactly the products the kernels use; sparse rows scattered to their columns; no low-rank
 * term, no bias. Large batches multiply such row tiles with torch's BLAS (sqlora_hf/kernels/cpu/ops.py),
 * so only one small tile per calling thread is ever held in fp32. Same descriptor as `sqlora_cpu_linear_desc`. */
int sqlora_cpu_dequantize_rows_desc(const int64_t *d, int isa, int n_threads, int64_t n0, int64_t n1, float *w) {
    if (d == NULL || w == NULL || n_threads <= 0) return SQ_EBADARG;
#define SQ_P(T, i) ((T)(intptr_t)d[i])
    const int64_t N = d[0], K = d[1];
    const int bits = (int)d[2], group = (int)d[3], sparsity = (int)d[4];
    const uint8_t *codes = SQ_P(const uint8_t *, 5), *mask = SQ_P(const uint8_t *, 9);
    const float *scales = SQ_P(const float *, 7), *lut = SQ_P(const float *, 11);
    const int rc = check_layer(isa, N, K, bits, group, sparsity, d[6], d[8], mask, d[10], lut, d[12],
                               SQ_P(const float *, 13), SQ_P(const float *, 14), d[15], d[16], d[17],
                               SQ_P(const float *, 18), d[19]);
#undef SQ_P
    if (rc) return rc;
    if (n0 < 0 || n1 > N || n0 >= n1) return SQ_EBADARG;
    init_tables();
    dot_fn dot; decode_fn dec;
    if (pick(isa, &dot, &dec)) return SQ_EISA;
    (void)dot;
    const int64_t n_stored = sparsity ? K / 2 : K, rb = row_bytes(n_stored, bits);
    const int per_group = sparsity ? group / 2 : group;
    int64_t (*scatter)(const float *, const uint8_t *, int64_t, int64_t, float *) = scatter_sparse;
#ifdef SQ_X86
    if (isa == ISA_AVX2 || isa == ISA_AVX512) scatter = scatter_sparse_avx2;
#endif
    if ((n1 - n0) * K < ((int64_t)1 << 18)) n_threads = 1;
    const size_t per_thread = (size_t)(n_stored + 16);
    float *buf = sparsity ? (float *)malloc(sizeof(float) * per_thread * (size_t)n_threads) : NULL;
    if (sparsity && !buf) return SQ_ENOMEM;
    int bad_mask = 0;
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
#ifdef _OPENMP
        float *stored = buf ? buf + per_thread * (size_t)omp_get_thread_num() : NULL;
#else
        float *stored = buf;
#endif
        #pragma omp for schedule(static)
        for (int64_t n = n0; n < n1; n++) {
            const float *srow = scales + n * (K / group);
            float *out = w + (n - n0) * K;
            if (!sparsity) {
                dec(codes + n * rb, bits, lut, srow, per_group, n_stored, out);
                continue;
            }
            dec(codes + n * rb, bits, lut, srow, per_group, n_stored, stored);
            for (int i = 0; i < 16; i++) stored[n_stored + i] = 0.0f;
            if (scatter(stored, mask + n * (K / 8), K, n_stored, out) != n_stored) {
                #pragma omp atomic write
                bad_mask = 1;
            }
        }
    }
    free(buf);
    return bad_mask ? SQ_EBADLEN : SQ_OK;
}

int sqlora_cpu_linear_desc(const int64_t *d, int isa, int flags, int n_threads, const float *x, int64_t M, float *y) {
    if (d == NULL || x == NULL || y == NULL) return SQ_EBADARG;
#define SQ_P(T, i) ((T)(intptr_t)d[i])
    return linear_impl(isa, flags, n_threads, x, M, d[0], d[1], (int)d[2], (int)d[3], (int)d[4],
                             SQ_P(const uint8_t *, 5), d[6], SQ_P(const float *, 7), d[8], SQ_P(const uint8_t *, 9), d[10],
                             SQ_P(const float *, 11), d[12], SQ_P(const float *, 13), SQ_P(const float *, 14), d[15],
                             d[16], d[17], SQ_P(const float *, 18), d[19], y);
#undef SQ_P
}


/* ---------------------------------------------------------------------------------------------- */
/* GPTQ's column sweep (sqlora_hf/compression/gptq.py): the hot loop of calibrated compression     */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* The compressors' loops below are plain C that the compiler vectorises; built once per ISA and picked
 * at load (ifunc), they run 512- or 256-bit wide where the baseline build would use 128-bit vectors.
 * Same arithmetic in every clone (no contraction into FMAs under -std=c11), so the same results. */
#define SQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SQ_CLONES
#endif

/* Columns c0 .. c1-1 of one lazy block of GPTQ's sweep, worked on W^T (row i of `w` is column i of
 * the block). For each column i: quantize its N weights against their scales (the nearest NF level,
 * or int8 rounded half to even), write the codes, the dequantized values q and the scaled error
 * e = (w - q) / hinv[i][i], then subtract hinv[i][j] * e from every later row j < nb of the block.
 * The arithmetic is the torch sweep's, element for element (divide, clamp, count midpoints below,
 * multiply, subtract, divide), so codes agree except where a weight sits on a rounding tie.
 * GPTQ's output rows (n) never interact, so threads split n; a thread's slice of the block stays in
 * its cache for the whole block. Layouts: w, codes, q, err are [nb, ld]; hinv is [nb, ldh] (the
 * block's square of the upper inverse-Hessian factor); column i's scales start at scale + i*scale_ld
 * (scale_ld 0: one scale vector for every column, the group-at-a-time sweep). levels/mids: the
 * 2^bits NF levels and their 2^bits - 1 midpoints (unused for bits == 8). */
SQ_CLONES
int sqlora_gptq_columns(int n_threads, int64_t nb, int64_t c0, int64_t c1, int64_t N, float *w, int64_t ld,
                        const float *hinv, int64_t ldh, const float *scale, int64_t scale_ld, int bits,
                        const float *levels, const float *mids, uint8_t *codes, float *q, float *err) {
    if (w == NULL || hinv == NULL || scale == NULL || codes == NULL || q == NULL || err == NULL) return SQ_EBADARG;
    if (nb < 0 || c0 < 0 || c1 > nb || c0 > c1 || N < 0 || ld < N || ldh < nb || scale_ld < 0) return SQ_EBADARG;
    if (bits != 8 && (bits < 2 || bits > 4 || levels == NULL || mids == NULL)) return SQ_EBADARG;
    const int n_mids = bits == 8 ? 0 : (1 << bits) - 1;
    const int64_t chunk = 64;
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    if (n_threads < 1) n_threads = 1;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && n_chunks > 1)
    for (int64_t ch = 0; ch < n_chunks; ch++) {
        const int64_t n0 = ch * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        for (int64_t i = c0; i < c1; i++) {
            float *restrict wi = w + i * ld;
            float *restrict qi = q + i * ld;
            float *restrict ei = err + i * ld;
            uint8_t *restrict ci = codes + i * ld;
            const float *restrict si = scale + i * scale_ld;
            const float d = hinv[i * ldh + i];
            for (int64_t n = n0; n < n1; n++) {
                const float s = si[n];
                const float x = wi[n] / (s == 0.0f ? 1.0f : s);
                float v;
                if (bits == 8) {
                    /* clamp, then round half to even by adding and removing 1.5 * 2^23 (exact in
                     * float arithmetic without -ffast-math; keeps the library free of libm) */
                    v = x < -127.5f ? -127.5f : (x > 127.5f ? 127.5f : x);
                    v = (v + 12582912.0f) - 12582912.0f;
                    v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
                    ci[n] = (uint8_t)(int8_t)v;
                } else {
                    const float xc = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
                    int code = 0;
                    for (int m = 0; m < n_mids; m++) code += xc > mids[m];
                    ci[n] = (uint8_t)code;
                    v = levels[code];
                }
                const float qv = v * s;
                qi[n] = qv;
                ei[n] = (wi[n] - qv) / d;
            }
            for (int64_t j = i + 1; j < nb; j++) {
                const float h = hinv[i * ldh + j];
                float *restrict wj = w + j * ld;
                for (int64_t n = n0; n < n1; n++) wj[n] -= h * ei[n];
            }
        }
    }
    return SQ_OK;
}

/* Coordinate descent on GPTQ's codes (one block of columns; sqlora_hf/compression/gptq.py `refine`).
 * With the scales fixed, the output error tr(E H E^T) of one row is a quadratic in each of its
 * entries: entry j alone is best at e_j - g_j / h_jj, where g = E H, so its best code is the nearest
 * grid point to w_j - e_j + g_j / h_jj. Each step can only lower the error. Layouts as in
 * sqlora_gptq_columns, transposed: row j of w, e, g, scale, keep, codes, delta is column j of the block.
 * e and g are updated in place (g only inside the block: the caller applies the block's changes
 * `delta` to the other columns with one matrix product); keep (0/1 bytes) may be NULL (dense). */

SQ_CLONES
int sqlora_cd_columns(int n_threads, int64_t nb, int64_t N, const float *w, float *e, float *g, int64_t ld,
                      const float *h, int64_t ldh, const float *scale, const uint8_t *keep, int bits,
                      const float *levels, const float *mids, uint8_t *codes, float *delta) {
    if (w == NULL || e == NULL || g == NULL || h == NULL || scale == NULL || codes == NULL || delta == NULL)
        return SQ_EBADARG;
    if (nb < 0 || N < 0 || ld < N || ldh < nb) return SQ_EBADARG;
    if (bits != 8 && (bits < 2 || bits > 4 || levels == NULL || mids == NULL)) return SQ_EBADARG;
    const int n_mids = bits == 8 ? 0 : (1 << bits) - 1;
    enum { chunk = 64 };
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    int failed = 0;
    if (n_threads < 1) n_threads = 1;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && n_chunks > 1)
    for (int64_t ch = 0; ch < n_chunks; ch++) {
        const int64_t n0 = ch * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        const int64_t len = n1 - n0;
        float x[chunk], v[chunk];
        uint8_t c[chunk];
        /* This chunk's columns of g, packed: rows of g lie ld floats apart, and at ld = 1536 or 3072
         * every row's slice falls in the same few L1 sets, so the block's updates ran from L2. */
        float *restrict gl = (float *)malloc((size_t)(nb > 0 ? nb : 1) * chunk * sizeof(float));
        if (gl == NULL) {
            #pragma omp atomic write
            failed = 1;
            continue;
        }
        for (int64_t i = 0; i < nb; i++) memcpy(gl + i * chunk, g + i * ld + n0, (size_t)len * sizeof(float));
        for (int64_t j = 0; j < nb; j++) {
            const float *restrict wj = w + j * ld + n0;
            const float *restrict sj = scale + j * ld + n0;
            const uint8_t *restrict kj = keep ? keep + j * ld + n0 : NULL;
            float *restrict ej = e + j * ld + n0;
            float *restrict dj = delta + j * ld + n0;
            uint8_t *restrict cj = codes + j * ld + n0;
            const float d = h[j * ldh + j];
            if (d <= 0.0f) {  /* a dead input: nothing to change in this column */
                for (int64_t n = 0; n < len; n++) dj[n] = 0.0f;
                continue;
            }
            {
                const float *restrict gj = gl + j * chunk;
                for (int64_t n = 0; n < len; n++) {
                    const float s = sj[n];
                    x[n] = (wj[n] - ej[n] + gj[n] / d) / (s == 0.0f ? 1.0f : s);
                }
            }
            if (bits == 8) {
                for (int64_t n = 0; n < len; n++) {
                    float t = x[n] < -127.5f ? -127.5f : (x[n] > 127.5f ? 127.5f : x[n]);
                    t = (t + 12582912.0f) - 12582912.0f;  /* half to even, as in sqlora_gptq_columns */
                    v[n] = t < -127.0f ? -127.0f : (t > 127.0f ? 127.0f : t);
                    c[n] = (uint8_t)(int8_t)v[n];
                }
            } else {
                for (int64_t n = 0; n < len; n++) {
                    x[n] = x[n] < -1.0f ? -1.0f : (x[n] > 1.0f ? 1.0f : x[n]);
                    c[n] = 0;
                }
                for (int m = 0; m < n_mids; m++) {  /* count the midpoints below: the nearest level */
                    const float mid = mids[m];
                    for (int64_t n = 0; n < len; n++) c[n] += x[n] > mid;
                }
                for (int64_t n = 0; n < len; n++) v[n] = levels[c[n]];
            }
            for (int64_t n = 0; n < len; n++) {
                const float en = wj[n] - v[n] * sj[n];
                const int live = kj ? kj[n] != 0 : 1;  /* a pruned weight keeps its code and error */
                dj[n] = live ? en - ej[n] : 0.0f;
                ej[n] = live ? en : ej[n];
                cj[n] = live ? c[n] : cj[n];
            }
            for (int64_t i = 0; i < nb; i++) {
                const float hji = h[j * ldh + i];
                float *restrict gi = gl + i * chunk;
                for (int64_t n = 0; n < len; n++) gi[n] += hji * dj[n];
            }
        }
        for (int64_t i = 0; i < nb; i++) memcpy(g + i * ld + n0, gl + i * chunk, (size_t)len * sizeof(float));
        free(gl);
    }
    return failed ? SQ_ENOMEM : SQ_OK;
}

/* ---------------------------------------------------------------------------------------------- */
/* Round-to-nearest helpers of the compressors (sqlora_hf/compression/rtn.py, scales.py)            */

/* Nearest-level codes of values already divided by their scale: the number of midpoints below the
 * value clamped to [-1, 1] (torch.bucketize's answer, bit for bit). Codes of one chunk are counted one
 * midpoint at a time so the compiler vectorises the count. */
static void nearest_codes_chunk(const float *restrict x, int64_t n, int n_mids, const float *restrict mids,
                                uint8_t *restrict codes) {
    float xc[256];
    uint8_t c[256];
    for (int64_t i0 = 0; i0 < n; i0 += 256) {
        const int64_t len = n - i0 < 256 ? n - i0 : 256;
        for (int64_t i = 0; i < len; i++) {
            const float v = x[i0 + i];
            xc[i] = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
            c[i] = 0;
        }
        for (int m = 0; m < n_mids; m++) {
            const float mid = mids[m];
            for (int64_t i = 0; i < len; i++) c[i] += xc[i] > mid;
        }
        memcpy(codes + i0, c, (size_t)len);
    }
}

int sqlora_nearest_codes(int n_threads, int64_t n, const float *x, int n_mids, const float *mids, uint8_t *codes) {
    if (x == NULL || codes == NULL || n < 0 || n_mids < 1 || n_mids > 255 || mids == NULL) return SQ_EBADARG;
    const int64_t chunk = 1 << 16;
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    if (n_threads < 1) n_threads = 1;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && n_chunks > 1)
    for (int64_t ch = 0; ch < n_chunks; ch++) {
        const int64_t i0 = ch * chunk, len = i0 + chunk < n ? chunk : n - i0;
        nearest_codes_chunk(x + i0, len, n_mids, mids, codes + i0);
    }
    return SQ_OK;
}

/* The squared error of every group of g values under every candidate scale (search_scales):
 * v [n_groups, g], scales [n_cand, n_groups]; err [n_cand, n_groups] gets sum (v - s * level)^2 with
 * each value's code chosen as the torch path chooses it (v / s, s == 0 read as 1, then
 * sqlora_nearest_codes' rule; 8 bits: round half to even, clamped to +-127), so codes agree with it bit
 * for bit and only the order of the sums differs. vc and cc (both or neither may be NULL) get
 * sum v * level and sum level^2, what a least-squares refit of the scale needs. */
SQ_CLONES
int sqlora_scale_errors(int n_threads, int64_t n_groups, int64_t g, const float *v, int64_t n_cand,
                        const float *scales, int bits, const float *levels, const float *mids, float *err,
                        float *vc, float *cc) {
    if (v == NULL || scales == NULL || err == NULL || n_groups < 0 || n_cand < 0 || g < 1 || g > 4096)
        return SQ_EBADARG;
    if ((vc == NULL) != (cc == NULL)) return SQ_EBADARG;
    if (bits != 8 && (bits < 2 || bits > 4 || levels == NULL || mids == NULL)) return SQ_EBADARG;
    const int n_mids = bits == 8 ? 0 : (1 << bits) - 1;
    if (n_threads < 1) n_threads = 1;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && n_groups > 64)
    for (int64_t gi = 0; gi < n_groups; gi++) {
        const float *restrict vg = v + gi * g;
        float x[4096], val[4096];
        uint8_t c[4096];
        for (int64_t k = 0; k < n_cand; k++) {
            const float s = scales[k * n_groups + gi];
            const float safe = s == 0.0f ? 1.0f : s;
            for (int64_t i = 0; i < g; i++) x[i] = vg[i] / safe;
            if (bits == 8) {
                for (int64_t i = 0; i < g; i++) {
                    float r = x[i] < -127.5f ? -127.5f : (x[i] > 127.5f ? 127.5f : x[i]);
                    r = (r + 12582912.0f) - 12582912.0f;  /* half to even, as in sqlora_gptq_columns */
                    val[i] = r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r);
                }
            } else {
                nearest_codes_chunk(x, g, n_mids, mids, c);
                for (int64_t i = 0; i < g; i++) val[i] = levels[c[i]];
            }
            float e = 0.0f, a = 0.0f, b = 0.0f;
            for (int64_t i = 0; i < g; i++) {
                const float d = vg[i] - s * val[i];
                e += d * d;
                a += vg[i] * val[i];
                b += val[i] * val[i];
            }
            err[k * n_groups + gi] = e;
            if (vc != NULL) {
                vc[k * n_groups + gi] = a;
                cc[k * n_groups + gi] = b;
            }
        }
    }
    return SQ_OK;
}
