/* Throughput of the zmm dot-product instructions the CPU kernels are built from (x86 with AVX-512 VNNI and
 * BF16: Zen 4, Sapphire Rapids and later). Each loop keeps 16 independent accumulators, so latency does not
 * matter and the result is the issue rate: TSC ticks per instruction.
 *
 *     gcc -O2 -o /tmp/dot_throughput benchmarks/cpu_dot_throughput.c && /tmp/dot_throughput
 *
 * Why it exists: docs/kernels_cpu.md ("Why fp32 batch 16 stays below native bf16") argues from these
 * numbers. On the 2026-12-07 Zen 4 VM all three ran at 1.42-1.44 ticks (TSC 2.6 GHz), so an int8
 * `vpdpbusd` (64 products) does twice the work of a `vdpbf16ps` (32) or an fp32 FMA (16) per instruction. */
#include <immintrin.h>
#include <stdio.h>
#include <x86intrin.h>

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16"), noinline))
#define LOOPS 20000000L

TGT static double ticks_dpbusd(int *sink) {
    __m512i a[16], w = _mm512_set1_epi32(0x01020304), x = _mm512_set1_epi32(0x05060708);
    for (int i = 0; i < 16; i++) a[i] = _mm512_set1_epi32(i);
    const unsigned long long t0 = __rdtsc();
    for (long n = 0; n < LOOPS; n++) {
        for (int i = 0; i < 16; i++) a[i] = _mm512_dpbusd_epi32(a[i], w, x);
        __asm__ volatile("" : "+v"(w), "+v"(x)); /* keep the operands live and the loop from folding */
    }
    const double t = (double)(__rdtsc() - t0) / (16.0 * LOOPS);
    for (int i = 0; i < 16; i++) *sink += _mm512_reduce_add_epi32(a[i]);
    return t;
}

TGT static double ticks_dpbf16(int *sink) {
    __m512 a[16];
    __m512i w = _mm512_set1_epi32(0x3F803F80), x = _mm512_set1_epi32(0x3F803F80);
    for (int i = 0; i < 16; i++) a[i] = _mm512_set1_ps((float)i);
    const unsigned long long t0 = __rdtsc();
    for (long n = 0; n < LOOPS; n++) {
        for (int i = 0; i < 16; i++) a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)w, (__m512bh)x);
        __asm__ volatile("" : "+v"(w), "+v"(x));
    }
    const double t = (double)(__rdtsc() - t0) / (16.0 * LOOPS);
    for (int i = 0; i < 16; i++) *sink += (int)_mm512_reduce_add_ps(a[i]);
    return t;
}

TGT static double ticks_fma(int *sink) {
    __m512 a[16], w = _mm512_set1_ps(1.0f), x = _mm512_set1_ps(0.0f);
    for (int i = 0; i < 16; i++) a[i] = _mm512_set1_ps((float)i);
    const unsigned long long t0 = __rdtsc();
    for (long n = 0; n < LOOPS; n++) {
        for (int i = 0; i < 16; i++) a[i] = _mm512_fmadd_ps(w, x, a[i]);
        __asm__ volatile("" : "+v"(w), "+v"(x));
    }
    const double t = (double)(__rdtsc() - t0) / (16.0 * LOOPS);
    for (int i = 0; i < 16; i++) *sink += (int)_mm512_reduce_add_ps(a[i]);
    return t;
}

int main(void) {
    if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512bf16")) {
        printf("this CPU lacks AVX-512 VNNI or BF16; nothing to measure\n");
        return 0;
    }
    int sink = 0;
    printf("| instruction (zmm) | products | TSC ticks per instruction |\n|---|---|---|\n");
    for (int rep = 0; rep < 2; rep++) {
        printf("| vpdpbusd (int8) | 64 | %.3f |\n", ticks_dpbusd(&sink));
        printf("| vdpbf16ps (bf16) | 32 | %.3f |\n", ticks_dpbf16(&sink));
        printf("| vfmadd231ps (fp32) | 16 | %.3f |\n", ticks_fma(&sink));
    }
    return sink == 42; /* uses the sums, so no loop is dropped */
}
