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
 * so only the summation order differs from `F.linear(x, dequantize())`.
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

int sqlora_cpu_best_isa(void) {
    static const int order[] = {ISA_AVX512, ISA_AVX2, ISA_DOTPROD, ISA_NEON, ISA_SCALAR};
    for (int i = 0; i < 5; i++)
        if (sqlora_cpu_isa_supported(order[i])) return order[i];
    return ISA_SCALAR;
}

int sqlora_cpu_abi_version(void) { return 1; }

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

/* ---------------------------------------------------------------------------------------------- */
/* x86: AVX2 + FMA and AVX-512                                                                    */

#ifdef SQ_X86
#define T_AVX2 __attribute__((target("avx2,fma")))
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

/* 16-entry float table lookup with two 8-entry permutes and a blend on bit 3 of the index. */
T_AVX2 static __m256 lut16_avx2(__m256 lo, __m256 hi, __m256i idx) {
    __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

T_AVX2 static void decode_row_avx2(const uint8_t *row, int bits, const float *lut, const float *scales,
                                   int per_group, int64_t n_stored, float *out) {
    if (bits != 4) { decode_row_scalar(row, bits, lut, scales, per_group, n_stored, out); return; }
    const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
    const __m128i m4 = _mm_set1_epi8(15);
    for (int64_t t = 0; t < n_stored / 32; t++) {
        __m128i b = _mm_loadu_si128((const __m128i *)(row + 16 * t));
        __m128i cl = _mm_and_si128(b, m4), ch = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
        __m256 s = _mm256_set1_ps(scales[(t * 32) / per_group]);
        float *o = out + 32 * t;
        _mm256_storeu_ps(o, _mm256_mul_ps(lut16_avx2(lo, hi, _mm256_cvtepu8_epi32(cl)), s));
        _mm256_storeu_ps(o + 8, _mm256_mul_ps(lut16_avx2(lo, hi, _mm256_cvtepu8_epi32(_mm_srli_si128(cl, 8))), s));
        _mm256_storeu_ps(o + 16, _mm256_mul_ps(lut16_avx2(lo, hi, _mm256_cvtepu8_epi32(ch)), s));
        _mm256_storeu_ps(o + 24, _mm256_mul_ps(lut16_avx2(lo, hi, _mm256_cvtepu8_epi32(_mm_srli_si128(ch, 8))), s));
    }
}

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

T_AVX512 static void decode_row_avx512(const uint8_t *row, int bits, const float *lut, const float *scales,
                                       int per_group, int64_t n_stored, float *out) {
    if (bits == 8) {
        for (int64_t t = 0; t < n_stored / 16; t++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 16 * t))));
            _mm512_storeu_ps(out + 16 * t, _mm512_mul_ps(v, _mm512_set1_ps(scales[(t * 16) / per_group])));
        }
        return;
    }
    if (bits != 4) { decode_row_scalar(row, bits, lut, scales, per_group, n_stored, out); return; }
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
/* Fused batch-1 row dot for 4-bit dense: table values times x summed per group, one scale multiply
 * per group; no decoded weights are stored. Used when M == 1 (the memory-bound GEMV). */
T_AVX2 static float row_dot4_avx2(const uint8_t *row, const float *lut, const float *scales, int group,
                                  int64_t K, const float *x) {
    const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
    const __m128i m4 = _mm_set1_epi8(15);
    __m256 total = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < K; g0 += group) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t k = g0; k < g0 + group; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(row + k / 2));
            __m128i cl = _mm_and_si128(b, m4), ch = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
            a0 = _mm256_fmadd_ps(lut16_avx2(lo, hi, _mm256_cvtepu8_epi32(cl)), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(lut16_avx2(lo, hi, _mm256_cvtepu8_epi32(_mm_srli_si128(cl, 8))), _mm256_loadu_ps(x + k + 8), a1);
            a0 = _mm256_fmadd_ps(lut16_avx2(lo, hi, _mm256_cvtepu8_epi32(ch)), _mm256_loadu_ps(x + k + 16), a0);
            a1 = _mm256_fmadd_ps(lut16_avx2(lo, hi, _mm256_cvtepu8_epi32(_mm_srli_si128(ch, 8))), _mm256_loadu_ps(x + k + 24), a1);
        }
        total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(scales[g0 / group]), total);
    }
    return hsum256(total);
}

T_AVX512 static float row_dot4_avx512(const uint8_t *row, const float *lut, const float *scales, int group,
                                      int64_t K, const float *x) {
    const __m512 table = _mm512_loadu_ps(lut);
    const __m128i m4 = _mm_set1_epi8(15);
    __m512 total = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < K; g0 += group) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t k = g0; k < g0 + group; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(row + k / 2));
            __m512i cl = _mm512_cvtepu8_epi32(_mm_and_si128(b, m4));
            __m512i ch = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m4));
            a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(cl, table), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(ch, table), _mm512_loadu_ps(x + k + 16), a1);
        }
        total = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(scales[g0 / group]), total);
    }
    return _mm512_reduce_add_ps(total);
}
#endif


/* ---------------------------------------------------------------------------------------------- */
/* aarch64: NEON (dotprod has no separate exact-fp32 kernel: int8 dot products need int8 activations) */

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

/* 4-bit decode: codes widened to 32-bit lanes and looked up in the 16-float table as 4 byte planes. */
static void decode_row_neon(const uint8_t *row, int bits, const float *lut, const float *scales,
                            int per_group, int64_t n_stored, float *out) {
    if (bits != 4) { decode_row_scalar(row, bits, lut, scales, per_group, n_stored, out); return; }
    uint8x16_t plane[4];
    {
        uint8_t p[4][16];
        for (int e = 0; e < 16; e++) {
            uint32_t u; memcpy(&u, &lut[e], 4);
            for (int q = 0; q < 4; q++) p[q][e] = (uint8_t)(u >> (8 * q));
        }
        for (int q = 0; q < 4; q++) plane[q] = vld1q_u8(p[q]);
    }
    const uint8x16_t m4 = vdupq_n_u8(15);
    for (int64_t t = 0; t < n_stored / 32; t++) {
        uint8x16_t b = vld1q_u8(row + 16 * t);
        uint8x16_t cs[2] = {vandq_u8(b, m4), vshrq_n_u8(b, 4)};
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

__attribute__((target("arch=armv8.2-a+dotprod")))
static float dot_dotprod(const float *a, const float *b, int64_t n) { return dot_neon(a, b, n); }
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

static int64_t row_bytes(int64_t n_stored, int bits) { return bits == 8 ? n_stored : n_stored / 32 * (4 * bits); }

/*
 * x [M, K] fp32, y [M, N] fp32 (written). codes [N, row_bytes] u8, scales [N, K/g] fp32,
 * mask [N, K/8] u8 or NULL (dense), lut: 2^bits fp32 (ignored for 8-bit), L [N, r] fp32, R [r, K]
 * fp32, bias [N] fp32 or NULL. `*_len` are the element counts the caller owns; every read is
 * checked against them before any row is touched. Returns 0 or a negative SQ_E* code.
 */
int sqlora_cpu_linear(int isa, int n_threads, const float *x, int64_t M, int64_t N, int64_t K,
                      int bits, int group, int sparsity,
                      const uint8_t *codes, int64_t codes_len, const float *scales, int64_t scales_len,
                      const uint8_t *mask, int64_t mask_len, const float *lut, int64_t lut_len,
                      const float *L, const float *R, int64_t rank, int64_t L_len, int64_t R_len,
                      const float *bias, int64_t bias_len, float *y) {
    if (M <= 0 || N <= 0 || K <= 0 || rank < 0 || n_threads <= 0) return SQ_EBADARG;
    if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8)) return SQ_EBADARG;
    if (group <= 0 || group % 32 || K % group || (sparsity && (group % 64))) return SQ_EBADARG;
    if (sparsity < 0 || sparsity > 2) return SQ_EBADARG;
    if (!sqlora_cpu_isa_supported(isa)) return SQ_EISA;
    const int64_t n_stored = sparsity ? K / 2 : K;
    const int per_group = sparsity ? group / 2 : group;
    const int64_t rb = row_bytes(n_stored, bits);
    if (codes_len != N * rb || scales_len != N * (K / group)) return SQ_EBADLEN;
    if (sparsity && (mask == NULL || mask_len != N * (K / 8))) return SQ_EBADLEN;
    if (bits != 8 && (lut == NULL || lut_len != (1 << bits))) return SQ_EBADLEN;
    if (rank > 0 && (L == NULL || R == NULL || L_len != N * rank || R_len != rank * K)) return SQ_EBADLEN;
    if (bias && bias_len != N) return SQ_EBADLEN;
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
    /* one decode buffer per thread, allocated up front so no thread can fail inside the region */
    const size_t per_thread = (size_t)(K + n_stored + 16); /* +16: vector loads past a row's end */
    int bad_mask = 0;
#ifdef SQ_X86
    float (*fused4)(const uint8_t *, const float *, const float *, int, int64_t, const float *) = NULL;
    if (bits == 4 && !sparsity) fused4 = isa == ISA_AVX512 ? row_dot4_avx512 : isa == ISA_AVX2 ? row_dot4_avx2 : NULL;
#endif
    int64_t (*scatter)(const float *, const uint8_t *, int64_t, int64_t, float *) = scatter_sparse;
#ifdef SQ_X86
    if (isa == ISA_AVX2 || isa == ISA_AVX512) scatter = scatter_sparse_avx2;
#endif
    float *buf = (float *)malloc(sizeof(float) * per_thread * (size_t)n_threads);
    if (!buf) { free(t); return SQ_ENOMEM; }
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
#ifdef _OPENMP
        float *wrow = buf + per_thread * (size_t)omp_get_thread_num();
#else
        float *wrow = buf;
#endif
        float *stored = wrow + K;
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const float *srow = scales + n * (K / group);
            if (sparsity) {
                dec(codes + n * rb, bits, lut, srow, per_group, n_stored, stored);
                for (int i = 0; i < 16; i++) stored[n_stored + i] = 0.0f;
                if (scatter(stored, mask + n * (K / 8), K, n_stored, wrow) != n_stored) {
                    #pragma omp atomic write
                    bad_mask = 1;
                    continue;
                }
            }
            const float b = bias ? bias[n] : 0.0f;
#ifdef SQ_X86
            if (fused4 && M == 1) { /* batch 1, 4-bit dense: decode and dot in one pass */
                float acc = fused4(codes + n * rb, lut, srow, group, K, x) + b;
                if (rank > 0) acc += dot(t, L + n * rank, rank);
                y[n] = acc;
                continue;
            }
#endif
            if (!sparsity) dec(codes + n * rb, bits, lut, srow, per_group, n_stored, wrow);
            for (int64_t m = 0; m < M; m++) {
                float acc = dot(wrow, x + m * K, K) + b;
                if (rank > 0) acc += dot(t + m * rank, L + n * rank, rank);
                y[m * N + n] = acc;
            }
        }
    }
    free(buf);
    free(t);
    return bad_mask ? SQ_EBADLEN : SQ_OK;
}
