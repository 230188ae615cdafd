/* Measurement probes for the benchmarks: how fast this machine streams memory the way our CPU linear kernel
 * reads weights, and the bf16 dot-product peak a prefill's products could reach. Built by probes.py. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

static long sink[16 * 256]; /* per-thread slots, a cache line apart */

/* Reads n bytes from a (a multiple of 256 bytes), prefetching `prefetch` bytes ahead as the linear kernel does;
 * the sum keeps the loads. */
static inline long read_bytes(const uint8_t* a, long n, int prefetch) {
    __m512i acc = _mm512_setzero_si512();
    for (long i = 0; i < n; i += 256) {
        if (prefetch)
            for (int line = 0; line < 4; line++) _mm_prefetch((const char*)a + i + prefetch + 64 * line, _MM_HINT_T0);
        acc = _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_loadu_si512(a + i), _mm512_loadu_si512(a + i + 64)));
        acc = _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_loadu_si512(a + i + 128), _mm512_loadu_si512(a + i + 192)));
    }
    return _mm512_reduce_add_epi32(acc);
}

/* Reads n bytes (n % 256 == 0) on every thread, each its own share; returns a checksum so the reads stay. */
long probe_stream_read(const uint8_t* a, long n, int prefetch) {
    long total = 0;
#pragma omp parallel reduction(+ : total)
    {
        int t = omp_get_thread_num(), threads = omp_get_num_threads();
        long share = n / threads / 256 * 256;
        total += read_bytes(a + share * t, share, prefetch);
    }
    return total;
}

/* Runs `iters` rounds of 12 independent 512-bit VDPBF16PS on every thread; returns the FLOPs done (2 per
 * multiply-add). */
double probe_dpbf16_flops(long iters) {
    double flops = 0.0;
#pragma omp parallel reduction(+ : flops)
    {
        __m512 acc[12];
        for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
        __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f00);
        for (long it = 0; it < iters; it++)
            for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        float keep = 0.0f;
        for (int i = 0; i < 12; i++) keep += _mm512_reduce_add_ps(acc[i]);
        sink[omp_get_thread_num() % 256 * 16] += (long)keep;
        flops += (double)iters * 12 * 32 * 2;
    }
    return flops;
}
