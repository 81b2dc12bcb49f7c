/* Checks every SIMD path of csrc/sqlora_cpu.c against its scalar path on random packed layers, for
 * every format option (bits 2/3/4/8, dense/2:4/4:8, several group sizes, with and without the
 * low-rank term and bias, batch 1 and larger, N not a multiple of any SIMD width).
 * Built natively it checks AVX2/AVX-512; cross-compiled for aarch64 (scripts/ci_arm.sh) it checks
 * NEON and dotprod under qemu. Also checks the GPTQ loops (sqlora_gptq_columns, sqlora_cd_columns) on
 * 2 threads against a plain rewrite. Exit status 0 only if every check passed and at least one SIMD path ran.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "../../csrc/sqlora_cpu.c"

static uint32_t rng = 12345u;
static uint32_t next_u32(void) { rng ^= rng << 13; rng ^= rng >> 17; rng ^= rng << 5; return rng; }
static float next_f(void) { return (float)(next_u32() & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f; }

/* A row mask with the 2:4 (sparsity 1) or 4:8 (sparsity 2) pattern. */
static uint8_t random_mask_byte(int sparsity) {
    static const uint8_t pairs[6] = {0x3, 0x5, 0x6, 0x9, 0xA, 0xC};
    if (sparsity == 1) return (uint8_t)(pairs[next_u32() % 6] | (pairs[next_u32() % 6] << 4));
    for (;;) { uint8_t b = (uint8_t)next_u32(); if (__builtin_popcount(b) == 4) return b; }
}

/* Round to the nearest bfloat16 (format version 2's codebook values): selects the 2-plane lookups. */
static float to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
}

static int check_case(int isa, int bits, int group, int sparsity, int64_t M, int64_t N, int64_t K, int64_t rank, int bias_on,
                      int bf16_lut) {
    const int64_t n_stored = sparsity ? K / 2 : K;
    const int64_t rb = bits == 8 ? n_stored : n_stored / 32 * 4 * bits;
    uint8_t *codes = malloc(N * rb), *mask = malloc(N * K / 8);
    float *scales = malloc(sizeof(float) * N * (K / group)), lut[16];
    float *x = malloc(sizeof(float) * M * K), *L = malloc(sizeof(float) * (N * rank + 1));
    float *R = malloc(sizeof(float) * (rank * K + 1)), *bias = malloc(sizeof(float) * N);
    float *y0 = malloc(sizeof(float) * M * N), *y1 = malloc(sizeof(float) * M * N);
    for (int64_t i = 0; i < N * rb; i++) codes[i] = (uint8_t)next_u32();
    for (int64_t i = 0; i < N * K / 8; i++) mask[i] = random_mask_byte(sparsity ? sparsity : 2);
    for (int64_t i = 0; i < N * (K / group); i++) scales[i] = 0.01f + 0.1f * fabsf(next_f());
    for (int i = 0; i < 16; i++) lut[i] = bf16_lut ? to_bf16(next_f()) : next_f();
    for (int64_t i = 0; i < M * K; i++) x[i] = next_f();
    for (int64_t i = 0; i < N * rank; i++) L[i] = next_f();
    for (int64_t i = 0; i < rank * K; i++) R[i] = 0.1f * next_f();
    for (int64_t i = 0; i < N; i++) bias[i] = next_f();
    int64_t lut_len = bits == 8 ? 0 : (1 << bits);
    int rc0 = sqlora_cpu_linear(ISA_SCALAR, 1, x, M, N, K, bits, group, sparsity, codes, N * rb, scales, N * (K / group),
                                sparsity ? mask : NULL, N * K / 8, bits == 8 ? NULL : lut, lut_len, L, R, rank, N * rank,
                                rank * K, bias_on ? bias : NULL, N, y0);
    int rc1 = sqlora_cpu_linear(isa, 2, x, M, N, K, bits, group, sparsity, codes, N * rb, scales, N * (K / group),
                                sparsity ? mask : NULL, N * K / 8, bits == 8 ? NULL : lut, lut_len, L, R, rank, N * rank,
                                rank * K, bias_on ? bias : NULL, N, y1);
    double num = 0, den = 0;
    for (int64_t i = 0; i < M * N; i++) { num += (y1[i] - y0[i]) * (double)(y1[i] - y0[i]); den += (double)y0[i] * y0[i]; }
    double rel = sqrt(num / (den + 1e-30));
    int ok = rc0 == 0 && rc1 == 0 && rel < 1e-5;
    if (!ok)
        printf("FAIL isa=%d bits=%d g=%d sparsity=%d M=%lld N=%lld K=%lld rank=%lld bf16=%d rc=%d/%d rel=%.3g\n", isa, bits,
               group, sparsity, (long long)M, (long long)N, (long long)K, (long long)rank, bf16_lut, rc0, rc1, rel);
    /* a wrong length must be refused */
    int rc_bad = sqlora_cpu_linear(isa, 1, x, M, N, K, bits, group, sparsity, codes, N * rb - 1, scales, N * (K / group),
                                   sparsity ? mask : NULL, N * K / 8, bits == 8 ? NULL : lut, lut_len, L, R, rank,
                                   N * rank, rank * K, NULL, 0, y1);
    if (rc_bad != SQ_EBADLEN) { printf("FAIL short codes buffer accepted (rc=%d)\n", rc_bad); ok = 0; }
    free(codes); free(mask); free(scales); free(x); free(L); free(R); free(bias); free(y0); free(y1);
    return ok;
}

/* The bf16-activation kernel (SQ_FLAG_BF16_X, AVX-512 BF16 CPUs): x and the table hold bfloat16 values,
 * so every product is exact and the result must equal the scalar fp32 path up to summation order. */
static int check_bf16_case(int group, int64_t M, int64_t N, int64_t K, int64_t rank, int threads, int split) {
    uint8_t *codes = malloc(N * K / 2);
    float *scales = malloc(sizeof(float) * N * (K / group)), lut[16], *x = malloc(sizeof(float) * M * K);
    float *L = malloc(sizeof(float) * (N * rank + 1)), *R = malloc(sizeof(float) * (rank * K + 1));
    float *bias = malloc(sizeof(float) * N), *y0 = malloc(sizeof(float) * M * N), *y1 = malloc(sizeof(float) * M * N);
    for (int64_t i = 0; i < N * K / 2; i++) codes[i] = (uint8_t)next_u32();
    for (int64_t i = 0; i < N * (K / group); i++) scales[i] = 0.01f + 0.1f * fabsf(next_f());
    for (int i = 0; i < 16; i++) lut[i] = to_bf16(next_f());
    for (int64_t i = 0; i < M * K; i++) x[i] = split ? next_f() * expf(4.0f * next_f()) : to_bf16(next_f());
    if (split) { /* values that round to infinity in bf16, and tiny ones, must not break the split */
        x[0] = 3.4e38f; x[1] = 0.0f; x[2] = 1e-39f; x[3] = -2e-38f; /* one huge value per row: the kernels sum
                                                                 * unscaled levels, so two could overflow */
        for (int64_t i = 4; i < 16 && i < K; i++) x[i] = 0.0f; /* keeps the huge terms from overflowing */
    }
    for (int64_t i = 0; i < N * rank; i++) L[i] = next_f();
    for (int64_t i = 0; i < rank * K; i++) R[i] = 0.1f * next_f();
    for (int64_t i = 0; i < N; i++) bias[i] = next_f();
    int rc0 = sqlora_cpu_linear(ISA_SCALAR, 1, x, M, N, K, 4, group, 0, codes, N * K / 2, scales, N * (K / group), NULL,
                                0, lut, 16, L, R, rank, N * rank, rank * K, bias, N, y0);
    int rc1 = linear_impl(ISA_AVX512, split ? 0 : SQ_FLAG_BF16_X, threads, x, M, N, K, 4, group, 0, codes, N * K / 2, scales,
                          N * (K / group), NULL, 0, lut, 16, L, R, rank, N * rank, rank * K, bias, N, y1);
    double rel = 0; /* the worst row of the batch (row 0 of the split case holds a huge value) */
    for (int64_t m = 0; m < M; m++) {
        double num = 0, den = 0;
        for (int64_t i = m * N; i < (m + 1) * N; i++) {
            num += (y1[i] - y0[i]) * (double)(y1[i] - y0[i]);
            den += (double)y0[i] * y0[i];
        }
        if (sqrt(num / (den + 1e-30)) > rel) rel = sqrt(num / (den + 1e-30));
    }
    int ok = rc0 == 0 && rc1 == 0 && rel < (split ? 2e-5 : 1e-5);
    for (int64_t i = 0; i < M * N; i++) ok &= isfinite(y1[i]) == isfinite(y0[i]);
    if (!ok)
        printf("FAIL bf16 kernel split=%d g=%d M=%lld N=%lld K=%lld rank=%lld rc=%d/%d rel=%.3g\n", split, group,
               (long long)M, (long long)N, (long long)K, (long long)rank, rc0, rc1, rel);
    free(codes); free(scales); free(x); free(L); free(R); free(bias); free(y0); free(y1);
    return ok;
}

/* The opt-in integer-activation paths (4-bit dense, batch 1), close to the exact scalar path but not
 * equal to it: the 12-bit one (SQ_FLAG_INT_ACT, x86) within 2e-3, the 8-bit one (SQ_FLAG_INT8_ACT, AVX2
 * or dotprod) within 2e-2, and the 8-bit one also against the same arithmetic in plain C (int8 x per
 * 32 columns, table levels, fp32 scales; the integer sums are exact, so only float summation order may
 * differ: < 1e-5). */
static int check_int_act_case(int isa, int flag, int group, int64_t N, int64_t K, int threads) {
    uint8_t *codes = malloc(N * K / 2);
    float *scales = malloc(sizeof(float) * N * (K / group)), lut[16], *x = malloc(sizeof(float) * K);
    float *y0 = malloc(sizeof(float) * N), *y1 = malloc(sizeof(float) * N), *bias = malloc(sizeof(float) * N);
    for (int64_t i = 0; i < N * K / 2; i++) codes[i] = (uint8_t)next_u32();
    for (int64_t i = 0; i < N * (K / group); i++) scales[i] = 0.01f + 0.1f * fabsf(next_f());
    for (int i = 0; i < 16; i++) lut[i] = next_f();
    for (int64_t i = 0; i < K; i++) x[i] = next_f() * (1.0f + (float)(i % 97) / 10.0f);
    for (int64_t i = 0; i < N; i++) bias[i] = next_f();
    int rc0 = sqlora_cpu_linear(ISA_SCALAR, 1, x, 1, N, K, 4, group, 0, codes, N * K / 2, scales, N * (K / group), NULL, 0,
                                lut, 16, NULL, NULL, 0, 0, 0, bias, N, y0);
    int rc1 = linear_impl(isa, flag, threads, x, 1, N, K, 4, group, 0, codes, N * K / 2, scales,
                          N * (K / group), NULL, 0, lut, 16, NULL, NULL, 0, 0, 0, bias, N, y1);
    double num_e = 0, num_a = 0, den = 0;
    for (int64_t n = 0; n < N; n++) {
        num_e += (y1[n] - (double)y0[n]) * (y1[n] - (double)y0[n]);
        den += (double)y0[n] * y0[n];
    }
    const double rel_e = sqrt(num_e / den);
    double rel_a = 0;
    if (flag == SQ_FLAG_INT8_ACT) {
        int8_t m[16], *xq = malloc(K);
        float *xs = malloc(sizeof(float) * (K / 32));
        int32_t *xsum = malloc(sizeof(int32_t) * (K / 32));
        const float lscale = int8_levels(lut, m);
        quantize_x_int8(x, K, 0, xq, xs, xsum);
        double den_a = 0;
        for (int64_t n = 0; n < N; n++) {
            double want = bias[n];
            for (int64_t b = 0; b < K / 32; b++) {
                int32_t isum = 0;
                for (int i = 0; i < 32; i++) {
                    const uint8_t byte = codes[n * (K / 2) + 16 * b + (i & 15)];
                    isum += m[i < 16 ? byte & 15 : byte >> 4] * xq[32 * b + i];
                }
                want += (double)isum * xs[b] * lscale * scales[n * (K / group) + (32 * b) / group];
            }
            num_a += (y1[n] - want) * (y1[n] - want);
            den_a += want * want;
        }
        rel_a = sqrt(num_a / den_a);
        free(xq); free(xs); free(xsum);
    }
    const double tol = flag == SQ_FLAG_INT8_ACT ? 2e-2 : 2e-3;
    int ok = rc0 == 0 && rc1 == 0 && rel_a < 1e-5 && rel_e < tol && rel_e > 0;
    if (!ok)
        printf("FAIL int-activation path flag=%d isa=%d g=%d N=%lld K=%lld rc=%d/%d rel(own arithmetic)=%.3g "
               "rel(exact)=%.3g\n", flag, isa, group, (long long)N, (long long)K, rc0, rc1, rel_a, rel_e);
    free(codes); free(scales); free(x); free(y0); free(y1); free(bias);
    return ok;
}

/* GPTQ's C loops (sqlora_gptq_columns, sqlora_cd_columns) on 2 threads against a plain one-row-at-a-time
 * rewrite of the same arithmetic: the compiler's vectorisation and the thread split must change nothing. */
static int nearest_code(float x, int bits, const float *mids, float *v) {
    if (bits == 8) {
        float c = x < -127.5f ? -127.5f : (x > 127.5f ? 127.5f : x);
        c = (c + 12582912.0f) - 12582912.0f;
        c = c < -127.0f ? -127.0f : (c > 127.0f ? 127.0f : c);
        *v = c;
        return (uint8_t)(int8_t)c;
    }
    const float xc = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
    int code = 0;
    for (int m = 0; m < (1 << bits) - 1; m++) code += xc > mids[m];
    return code;
}

static int check_gptq_loops(int bits) {
    enum { NB = 40, N = 150 };
    static float w[NB * N], w2[NB * N], e[NB * N], e2[NB * N], g[NB * N], g2[NB * N], h[NB * NB], s[NB * N];
    static float q[NB * N], q2[NB * N], err[NB * N], err2[NB * N], d[NB * N], d2[NB * N], levels[16], mids[15];
    static uint8_t c[NB * N], c2[NB * N], keep[NB * N];
    const int nl = 1 << (bits == 8 ? 4 : bits);
    for (int i = 0; i < nl; i++) levels[i] = -1.0f + 2.0f * i / (nl - 1);
    for (int i = 0; i + 1 < nl; i++) mids[i] = (levels[i] + levels[i + 1]) / 2;
    for (int i = 0; i < NB * NB; i++) h[i] = 0.1f * next_f();
    for (int i = 0; i < NB; i++) h[i * NB + i] = 1.0f + 0.5f * (next_f() + 1.0f);
    for (int i = 0; i < NB * N; i++) {
        w[i] = w2[i] = next_f();
        s[i] = i % 97 == 0 ? 0.0f : (bits == 8 ? 1.0f / 127 : 1.0f) * (0.5f + 0.5f * (next_f() + 1.0f));
        keep[i] = (uint8_t)(next_u32() % 4 != 0);
    }
    int ok = sqlora_gptq_columns(2, NB, 0, NB, N, w, N, h, NB, s, N, bits, levels, mids, c, q, err) == SQ_OK;
    for (int i = 0; i < NB; i++)  /* the plain rewrite */
        for (int n = 0; n < N; n++) {
            float v, sc = s[i * N + n], x = w2[i * N + n] / (sc == 0.0f ? 1.0f : sc);
            int code = nearest_code(x, bits, mids, &v);
            if (bits != 8) v = levels[code];
            c2[i * N + n] = (uint8_t)code;
            q2[i * N + n] = v * sc;
            err2[i * N + n] = (w2[i * N + n] - q2[i * N + n]) / h[i * NB + i];
            for (int j = i + 1; j < NB; j++) w2[j * N + n] -= h[i * NB + j] * err2[i * N + n];
        }
    for (int i = 0; i < NB * N; i++) {  /* coordinate descent from the sweep's result */
        e[i] = e2[i] = (w2[i] - q2[i]);
        g[i] = g2[i] = 0.0f;
    }
    for (int j = 0; j < NB; j++)
        for (int i = 0; i < NB; i++)
            for (int n = 0; n < N; n++) g[j * N + n] = g2[j * N + n] += h[j * NB + i] * e[i * N + n];
    ok &= sqlora_cd_columns(2, NB, N, w2, e, g, N, h, NB, s, keep, bits, levels, mids, c, d) == SQ_OK;
    int bad = 0;
    for (int j = 0; j < NB; j++)
        for (int n = 0; n < N; n++) {
            const float dj = h[j * NB + j];
            float v;
            d2[j * N + n] = 0.0f;
            if (keep[j * N + n]) {
                float sc = s[j * N + n], x = (w2[j * N + n] - e2[j * N + n] + g2[j * N + n] / dj) / (sc == 0.0f ? 1.0f : sc);
                int code = nearest_code(x, bits, mids, &v);
                if (bits != 8) v = levels[code];
                const float en = w2[j * N + n] - v * sc;
                d2[j * N + n] = en - e2[j * N + n];
                e2[j * N + n] = en;
                bad += c[j * N + n] != (uint8_t)code;
            }
            for (int i = 0; i < NB; i++) g2[i * N + n] += h[j * NB + i] * d2[j * N + n];
        }
    for (int i = 0; i < NB * N; i++)
        bad += fabsf(q[i] - q2[i]) > 1e-6f || fabsf(err[i] - err2[i]) > 1e-4f * (1.0f + fabsf(err2[i])) ||
               fabsf(e[i] - e2[i]) > 1e-5f || fabsf(d[i] - d2[i]) > 1e-5f || fabsf(g[i] - g2[i]) > 1e-3f * (1.0f + fabsf(g2[i]));
    if (!ok || bad) printf("FAIL GPTQ loops bits=%d rc_ok=%d mismatches=%d\n", bits, ok, bad);
    return ok && !bad;
}

int main(void) {
    static const int bits_list[] = {2, 3, 4, 8};
    static const int groups[] = {32, 64, 128, 256};
    static const int64_t batches[] = {1, 3, 16, 6}; /* 6: the AVX-512 small-batch kernels' 4 + 2 rows */
    int checks = 0, failures = 0, simd_paths = 0;
    for (int isa = 1; isa <= 4; isa++) {
        if (!sqlora_cpu_isa_supported(isa)) continue;
        simd_paths++;
        for (int b = 0; b < 4; b++)
            for (int gi = 0; gi < 4; gi++)
                for (int sp = 0; sp <= 2; sp++) {
                    int g = groups[gi];
                    if (sp && g % 64) continue;
                    for (int bi = 0; bi < 4; bi++) {
                        int64_t rank = bi == 1 ? 0 : 5;
                        for (int bf = 0; bf <= (bits_list[b] == 8 ? 0 : 1); bf++) {
                            checks++;
                            failures += !check_case(isa, bits_list[b], g, sp, batches[bi], 37, 2 * g + (g == 32 ? 64 : 0),
                                                    rank, bi != 2, bf);
                        }
                        if (bits_list[b] == 4 && !sp) { /* an odd number of 32-blocks per row (K = 3g for g = 32) */
                            checks++;
                            failures += !check_case(isa, 4, g, 0, batches[bi], 37, 3 * g, rank, bi != 2, 1);
                        }
                    }
                }
        { /* a group size the format does not allow (any other multiple of 32) is rejected, not computed */
            float xx[96] = {0}, yy[4], sc[4] = {1, 1, 1, 1}, lut[16] = {0};
            uint8_t cc[4 * 48] = {0};
            checks++;
            if (sqlora_cpu_linear(isa, 1, xx, 1, 1, 96, 4, 96, 0, cc, 48, sc, 1, NULL, 0, lut, 16, NULL, NULL, 0, 0, 0,
                                  NULL, 0, yy) != SQ_EBADARG) {
                printf("FAIL isa=%d: group 96 was not rejected\n", isa);
                failures++;
            }
        }
        /* long rows (K >= 6144: the AVX-512 4-bit batch-1 kernel takes rows in fours; N % 4 = 1 row left
         * over), every bit width; for groups 32/64 K ends in a partial chunk (128 columns for 4-bit, 256
         * for 2/3-bit) */
        for (int b = 0; b < 4; b++)
            for (int gi = 0; gi < 4; gi++) {
                const int g = groups[gi];
                checks++;
                failures += !check_case(isa, bits_list[b], g, 0, 1, 37, 6144 + (g == 256 ? 256 : g), 3, 1, bits_list[b] != 8);
            }
        /* layers large enough that the driver really uses 2 threads (small ones run on one) */
        for (int sp = 0; sp <= 2; sp++)
            for (int64_t m = 1; m <= 3; m += 2)
                for (int bf = 0; bf <= 1; bf++) {
                    checks++;
                    failures += !check_case(isa, 4, 64, sp, m, 301, 2048, m == 1 ? 3 : 0, 1, bf);
                }
        /* the integer-activation paths: 12-bit on AVX2/AVX-512, 8-bit there and on dotprod (elsewhere
         * the flags are ignored) */
        if (isa == ISA_AVX2 || isa == ISA_AVX512) {
            static const int igroups[] = {32, 64, 128};
            for (int gi = 0; gi < 3; gi++) {
                checks++;
                failures += !check_int_act_case(isa, SQ_FLAG_INT_ACT, igroups[gi], 67, 512, 1);
            }
        }
        if (isa == ISA_AVX2 || isa == ISA_AVX512 || isa == ISA_DOTPROD) {
            static const int igroups[] = {32, 64, 128, 256};
            for (int gi = 0; gi < 4; gi++) {
                checks += 2;
                failures += !check_int_act_case(isa, SQ_FLAG_INT8_ACT, igroups[gi], 45,
                                                igroups[gi] == 256 ? 768 : igroups[gi] == 128 ? 384 : 448, 1);
                failures += !check_int_act_case(isa, SQ_FLAG_INT8_ACT, igroups[gi], 301, 2048, 2);
            }
        }
        if (isa == ISA_AVX512 && sqlora_cpu_bf16_supported()) { /* N: full panels of 16 and a partial one */
            static const int bgroups[] = {32, 64, 128, 256};
            for (int gi = 0; gi < 4; gi++)
                for (int64_t m = 3; m <= 19; m += 8) { /* 3, 11 (a pass of 8 and one of 3), 19 (decoded panels) */
                    const int g = bgroups[gi];
                    checks++; /* K = 3g: with g = 32 an odd multiple of 32 (the gathered tail) */
                    failures += !check_bf16_case(g, m, 53, 3 * g, m == 11 ? 0 : 4, m == 19 ? 2 : 1, 0);
                    checks++; /* fp32 x split into two bf16 terms (7, 15, 23 rows: 3-6 take the exact kernel) */
                    failures += !check_bf16_case(g, m + 4, 53, 3 * g, m == 11 ? 0 : 4, m == 19 ? 2 : 1, 1);
                }
            for (int gi = 0; gi < 4; gi++) /* batches 1 and 2: the word-lane kernel; K = 3g, and 3g + 128 for */
                for (int64_t m = 1; m <= 2; m++) /* full 128-column chunks followed by a 1-3 block tail */
                    for (int kk = 0; kk < 2; kk++)
                        for (int split = 0; split < 2; split++) {
                            const int g = bgroups[gi];
                            const int64_t K = 3 * g + (kk && g <= 128 ? 128 : 0) + (kk && g == 256 ? 256 : 0);
                            checks++; /* N = 53: 13 blocks of 4 rows and one row on its own */
                            failures += !check_bf16_case(g, m, 53, K, kk ? 3 : 0, kk ? 2 : 1, split);
                        }
            checks += 4; /* 8 rows: one pass of the fused kernel; 24: three passes over decoded panels */
            failures += !check_bf16_case(64, 8, 64, 4096, 0, 2, 0);
            failures += !check_bf16_case(128, 24, 80, 2048, 2, 2, 0);
            failures += !check_bf16_case(64, 8, 64, 4096, 0, 2, 1);
            failures += !check_bf16_case(128, 24, 80, 2048, 2, 2, 1);
            printf("bf16 kernel: checked\n");
        }
        printf("isa %d: checked\n", isa);
    }
    for (int b = 0; b < 4; b++) {  /* scalar C compiled for this CPU, threads over rows */
        checks++;
        failures += !check_gptq_loops(bits_list[b]);
    }
    printf("%d checks, %d failures, %d SIMD paths\n", checks, failures, simd_paths);
    if (simd_paths == 0) { printf("FAIL: no SIMD path is supported on this CPU\n"); return 1; }
    return failures ? 1 : 0;
}
