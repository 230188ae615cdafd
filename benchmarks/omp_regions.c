/* An LD_PRELOAD probe that counts and times OpenMP parallel regions (libgomp's GOMP_parallel, which `omp parallel`
 * compiles to, in PyTorch, oneDNN and our kernels alike): the wall time of each outermost region, from its start on
 * the calling thread to the end of its closing barrier. omp_regions.py builds it and reads it through ctypes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <time.h>

typedef void (*parallel_fn)(void (*)(void*), void*, unsigned, unsigned);

#define MAX_REGIONS (1 << 22)
static float seconds[MAX_REGIONS];
static long count;
static __thread int depth;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

void GOMP_parallel(void (*fn)(void*), void* data, unsigned threads, unsigned flags) {
    static parallel_fn real;
    if (!real) real = (parallel_fn)dlsym(RTLD_NEXT, "GOMP_parallel");
    if (depth++) { /* nested: timed as part of the outer region */
        real(fn, data, threads, flags);
        depth--;
        return;
    }
    double start = now();
    real(fn, data, threads, flags);
    depth--;
    if (count < MAX_REGIONS) seconds[count++] = (float)(now() - start);
}

void omp_regions_reset(void) { count = 0; }
long omp_regions_count(void) { return count; }
const float* omp_regions_seconds(void) { return seconds; }
