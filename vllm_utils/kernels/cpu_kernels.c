/* bf16 kernels for x86 CPUs with AVX512-BF16: the decode step's linear (a few input rows) and its attention of
 * one query token over a run of the paged KV cache, a prompt's attention, plus RMSNorm, RoPE and the activations
 * with transformers' rounding points.
 *
 * Linear: y[M, N] = x[M, K] @ W[N, K]^T (+ bias). Decode reads every weight once per step, so the job is to
 * stream W at memory bandwidth. The weight stays in nn.Linear's row-major layout (prefill shares it); each
 * thread walks a contiguous range of rows, each row start to end as one stream (with software prefetch where
 * that pays, see `prefetch`). For one input row the products use 256-bit VDPBF16PS (the 512-bit form streams
 * slower on Sapphire Rapids); 2-4 input rows use the 512-bit form. More rows (a batch's decode step) take 4 rows of
 * W side by side against groups of up to 6 input rows, so that a row costs products rather than loads
 * (`block_groups`).
 * Sums are fp32, rounded once to bf16 (RNE).
 * Threads come from OpenMP: loaded into a process that already has PyTorch's libgomp, this shares its pool.
 * Requires N % 4 == 0 and K % 32 == 0 (checked by the caller). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define ROWS 4
#define READ_AHEAD (1L << 20)

/* Software prefetch distance in bytes, 0 for none (set by the caller per CPU vendor: it speeds up the weight
 * stream on Sapphire Rapids and slows it on Zen 4, whose hardware prefetchers do better alone). */
static int prefetch = 1024;
void vllm_utils_set_prefetch(int bytes) { prefetch = bytes; }

static inline uint16_t to_bf16(float f) {
    union {
        float f;
        uint32_t u;
    } v = {f};
    if ((v.u & 0x7fffffff) > 0x7f800000) return (uint16_t)((v.u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } v = {(uint32_t)h << 16};
    return v.f;
}

/* 16 bf16 values to fp32 and back (round to nearest even) */
static inline __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void store16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
static inline __m512 round_bf16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void store(float s, const uint16_t* bias, int n, uint16_t* out) {
    if (bias) s += from_bf16(bias[n]);
    *out = to_bf16(s);
}

/* One input row, rows n0..n0+3 of W (w points at row n0); K % 128 == 0. Each row is read start to end as one
 * stream, 256 bytes a step into 8 independent accumulators. */
static void block_m1(const uint16_t* w, long K, const uint16_t* x, const uint16_t* bias, uint16_t* y, int n0) {
    for (int r = 0; r < ROWS; r++, w += K) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 128) {
            if (prefetch)
                for (int p = 0; p < 4; p++) _mm_prefetch((const char*)(w + k) + 2 * prefetch + 64 * p, _MM_HINT_T0);
            for (int j = 0; j < 8; j++)
                a[j] = _mm256_dpbf16_ps(a[j], (__m256bh)_mm256_loadu_si256((const __m256i*)(w + k + 16 * j)),
                                        (__m256bh)_mm256_loadu_si256((const __m256i*)(x + k + 16 * j)));
        }
        __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                                   _mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])));
        store(sum8(sum), bias, n0 + r, y + n0 + r);
    }
}

/* M (1..4, a constant after inlining) input rows, rows n0..n0+3 of W, each read start to end as one stream:
 * on Zen 4 that streams ~25% faster than reading the 4 rows side by side, which loads x only once. */
__attribute__((always_inline)) static inline void block_mn(const uint16_t* w, long K, const uint16_t* x, long x_stride,
                                                           const uint16_t* bias, uint16_t* y, long y_stride, int M,
                                                           int n0) {
    for (int r = 0; r < ROWS; r++, w += K) {
        __m512 acc[4][2];
        for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        int k = 0;
        for (; k + 64 <= K; k += 64) {
            if (prefetch)
                for (int p = 0; p < 2; p++) _mm_prefetch((const char*)(w + k) + 2 * prefetch + 64 * p, _MM_HINT_T0);
            for (int j = 0; j < 2; j++) {
                __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * j);
                for (int m = 0; m < M; m++)
                    acc[m][j] =
                        _mm512_dpbf16_ps(acc[m][j], wv, (__m512bh)_mm512_loadu_si512(x + m * x_stride + k + 32 * j));
            }
        }
        if (k < K) /* K % 64 == 32 */
            for (int m = 0; m < M; m++)
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(w + k),
                                             (__m512bh)_mm512_loadu_si512(x + m * x_stride + k));
        for (int m = 0; m < M; m++)
            store(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])), bias, n0 + r, y + m * y_stride + n0 + r);
    }
}

/* MG (1..6, a constant after inlining) input rows against rows n0..n0+3 of W side by side: up to 24 accumulators,
 * each step's 4 loads of W and MG of x feeding 4 * MG products, so that more rows cost products, not loads. */
__attribute__((always_inline)) static inline void tile_4xmg(const uint16_t* w, long K, const uint16_t* x, long x_stride,
                                                            const uint16_t* bias, uint16_t* y, long y_stride, int MG,
                                                            int n0) {
    __m512 acc[6][4];
    for (int m = 0; m < MG; m++)
        for (int r = 0; r < ROWS; r++) acc[m][r] = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 32) {
        __m512bh wv[ROWS];
        for (int r = 0; r < ROWS; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
        for (int m = 0; m < MG; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * x_stride + k);
            for (int r = 0; r < ROWS; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
        }
    }
    for (int m = 0; m < MG; m++)
        for (int r = 0; r < ROWS; r++) store(_mm512_reduce_add_ps(acc[m][r]), bias, n0 + r, y + m * y_stride + n0 + r);
}

/* M > 4 input rows (a batch's decode step): groups of up to 6 rows against the same 4 rows of W, which the first
 * group streams from memory and the later ones read from cache. */
static void block_groups(const uint16_t* w, long K, const uint16_t* x, long x_stride, const uint16_t* bias, uint16_t* y,
                         long y_stride, int M, int n0) {
    int g = 0;
    for (; g + 6 <= M; g += 6) tile_4xmg(w, K, x + g * x_stride, x_stride, bias, y + g * y_stride, y_stride, 6, n0);
    switch (M - g) {
        case 1: tile_4xmg(w, K, x + g * x_stride, x_stride, bias, y + g * y_stride, y_stride, 1, n0); break;
        case 2: tile_4xmg(w, K, x + g * x_stride, x_stride, bias, y + g * y_stride, y_stride, 2, n0); break;
        case 3: tile_4xmg(w, K, x + g * x_stride, x_stride, bias, y + g * y_stride, y_stride, 3, n0); break;
        case 4: tile_4xmg(w, K, x + g * x_stride, x_stride, bias, y + g * y_stride, y_stride, 4, n0); break;
        case 5: tile_4xmg(w, K, x + g * x_stride, x_stride, bias, y + g * y_stride, y_stride, 5, n0); break;
    }
}

/* Reads n bytes from a (a multiple of 256 bytes), prefetching ahead; the sum keeps the loads. */
static inline long read_bytes(const uint8_t* a, long n) {
    __m512i acc = _mm512_setzero_si512();
    for (long i = 0; i < n; i += 256) {
        if (prefetch)
            for (int line = 0; line < 4; line++) _mm_prefetch((const char*)a + i + prefetch + 64 * line, _MM_HINT_T0);
        acc = _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_loadu_si512(a + i), _mm512_loadu_si512(a + i + 64)));
        acc = _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_loadu_si512(a + i + 128), _mm512_loadu_si512(a + i + 192)));
    }
    return _mm512_reduce_add_epi32(acc);
}

/* Each thread, once its rows are done, reads the start of the rows it will take in the next linear (next: that
 * weight, next_rows x next_cols, or NULL). Between two decode linears the memory sits idle while Python runs,
 * and a linear that starts after an idle gap streams slowly at first; starting it from cache hides most of that. */
#define ROWS_LOOP(call)                                                                                    \
    _Pragma("omp parallel") {                                                                              \
        _Pragma("omp for schedule(static) nowait") for (int n0 = 0; n0 < N; n0 += ROWS) call;              \
        if (next) {                                                                                        \
            int t = omp_get_thread_num(), threads = omp_get_num_threads();                                 \
            long share = (long)next_rows * next_cols * 2 / threads, ahead = READ_AHEAD / threads;          \
            sink[t % 256 * 16] +=                                                                          \
                read_bytes((const uint8_t*)next + share * t, (ahead < share ? ahead : share) / 256 * 256); \
        }                                                                                                  \
    }

static long sink[16 * 256]; /* per-thread slots, a cache line apart */

/* x: M rows of K (row stride x_stride), W: N rows of K, bias: N or NULL, y: M rows of N (row stride y_stride). */
void vllm_utils_gemv_bf16(const uint16_t* w, const uint16_t* x, long x_stride, const uint16_t* bias, uint16_t* y,
                          long y_stride, int M, int N, int K, const uint16_t* next, int next_rows, int next_cols) {
    switch (M) {
        case 1:
            if (K % 128 == 0)
                ROWS_LOOP(block_m1(w + (long)n0 * K, K, x, bias, y, n0))
            else
                ROWS_LOOP(block_mn(w + (long)n0 * K, K, x, x_stride, bias, y, y_stride, 1, n0))
            break;
        case 2:
            ROWS_LOOP(block_mn(w + (long)n0 * K, K, x, x_stride, bias, y, y_stride, 2, n0)) break;
        case 3:
            ROWS_LOOP(block_mn(w + (long)n0 * K, K, x, x_stride, bias, y, y_stride, 3, n0)) break;
        case 4:
            ROWS_LOOP(block_mn(w + (long)n0 * K, K, x, x_stride, bias, y, y_stride, 4, n0)) break;
        default:
            ROWS_LOOP(block_groups(w + (long)n0 * K, K, x, x_stride, bias, y, y_stride, M, n0)) break;
    }
}

/* Llama's RMSNorm with transformers' rounding points, for rows of n bf16 values. With a residual, first
 * residual = bf16(residual + x) in place, and the sum is normalized: out = bf16(w * bf16(h * rstd)), where
 * rstd = 1 / sqrt(mean(h^2) + eps) in fp32. */
void vllm_utils_rmsnorm_bf16(const uint16_t* x, uint16_t* residual, const uint16_t* weight, uint16_t* out, int rows,
                             int n, float eps) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int row = 0; row < rows; row++) {
        const uint16_t* xr = x + (long)row * n;
        uint16_t* h = residual ? residual + (long)row * n : (uint16_t*)xr;
        uint16_t* o = out + (long)row * n;
        int vec = n / 16 * 16;
        __m512 squares16 = _mm512_setzero_ps();
        for (int i = 0; i < vec; i += 16) {
            __m512 hv = load16(h + i);
            if (residual) {
                hv = round_bf16(_mm512_add_ps(hv, load16(xr + i)));
                store16(h + i, hv);
            }
            squares16 = _mm512_fmadd_ps(hv, hv, squares16);
        }
        float squares = _mm512_reduce_add_ps(squares16);
        for (int i = vec; i < n; i++) {
            if (residual) h[i] = to_bf16(from_bf16(h[i]) + from_bf16(xr[i]));
            squares += from_bf16(h[i]) * from_bf16(h[i]);
        }
        float rstd = 1.0f / sqrtf(squares / n + eps);
        for (int i = 0; i < vec; i += 16)
            store16(o + i,
                    _mm512_mul_ps(load16(weight + i), round_bf16(_mm512_mul_ps(load16(h + i), _mm512_set1_ps(rstd)))));
        for (int i = vec; i < n; i++) o[i] = to_bf16(from_bf16(weight[i]) * from_bf16(to_bf16(from_bf16(h[i]) * rstd)));
    }
}

/* Rotate-half RoPE in place, as transformers computes it in bf16: with c, s the fp32 table rows rounded to
 * bf16, x1' = bf16(bf16(x1 c) - bf16(x2 s)) and x2' = bf16(bf16(x2 c) + bf16(x1 s)). x: tokens x heads rows of
 * head_dim values, token_stride elements between tokens; cos/sin: [positions, head_dim] fp32. */
void vllm_utils_rope_bf16(uint16_t* x, const long* positions, const float* cos, const float* sin, int tokens, int heads,
                          int head_dim, long token_stride) {
    int half = head_dim / 2;
#pragma omp parallel for schedule(static) if (tokens > 8)
    for (int t = 0; t < tokens; t++) {
        const float *c = cos + positions[t] * head_dim, *s = sin + positions[t] * head_dim;
        for (int h = 0; h < heads; h++) {
            uint16_t* v = x + t * token_stride + (long)h * head_dim;
            int i = 0;
            for (; i + 16 <= half; i += 16) {
                __m512 ci = round_bf16(_mm512_loadu_ps(c + i)), si = round_bf16(_mm512_loadu_ps(s + i));
                __m512 x1 = load16(v + i), x2 = load16(v + i + half);
                store16(v + i, _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, ci)), round_bf16(_mm512_mul_ps(x2, si))));
                store16(v + i + half,
                        _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, ci)), round_bf16(_mm512_mul_ps(x1, si))));
            }
            for (; i < half; i++) {
                float ci = from_bf16(to_bf16(c[i])), si = from_bf16(to_bf16(s[i]));
                float x1 = from_bf16(v[i]), x2 = from_bf16(v[i + half]);
                v[i] = to_bf16(from_bf16(to_bf16(x1 * ci)) - from_bf16(to_bf16(x2 * si)));
                v[i + half] = to_bf16(from_bf16(to_bf16(x2 * ci)) + from_bf16(to_bf16(x1 * si)));
            }
        }
    }
}

static inline void prefetch_row(const uint16_t* row, long bytes) {
    if (prefetch)
        for (long i = 0; i < bytes; i += 64) _mm_prefetch((const char*)row + i, _MM_HINT_T0);
}

/* One chunk of one-token attention: tokens t0..t1-1, every head (so it streams whole rows). Writes the chunk's
 * scores into scores[h * length + t], and into part its max and sum of exp(score - max) per head, then its
 * weighted sum of V per head (num_heads * (head_dim + 2) floats). */
static void attend_chunk(const uint16_t* q, const uint16_t* k, const uint16_t* v, int num_heads, int group,
                         int head_dim, int length, long row_stride, float scale, int t0, int t1, float* scores,
                         float* part) {
    long row_bytes = (long)num_heads / group * head_dim * 2;
    float *max = part, *sum = part + num_heads, *acc = part + 2 * num_heads;
    for (int h = 0; h < num_heads; h++) max[h] = -INFINITY, sum[h] = 0.0f;
    for (int i = 0; i < num_heads * head_dim; i++) acc[i] = 0.0f;
    for (int t = t0; t < t1; t++) {
        const uint16_t* kt = k + t * row_stride;
        prefetch_row(kt + 2 * row_stride, row_bytes);
        for (int h = 0; h < num_heads; h++) {
            const uint16_t *qh = q + (long)h * head_dim, *kh = kt + (long)(h / group) * head_dim;
            __m512 dot = _mm512_setzero_ps();
            for (int d = 0; d < head_dim; d += 32)
                dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(qh + d), (__m512bh)_mm512_loadu_si512(kh + d));
            float score = _mm512_reduce_add_ps(dot) * scale;
            scores[(long)h * length + t] = score;
            if (score > max[h]) max[h] = score;
        }
    }
    for (int h = 0; h < num_heads; h++)
        for (int t = t0; t < t1; t++) {
            float* p = scores + (long)h * length + t;
            *p = expf(*p - max[h]);
            sum[h] += *p;
        }
    for (int t = t0; t < t1; t++) {
        const uint16_t* vt = v + t * row_stride;
        prefetch_row(vt + 2 * row_stride, row_bytes);
        for (int h = 0; h < num_heads; h++) {
            const uint16_t* vh = vt + (long)(h / group) * head_dim;
            __m512 weight = _mm512_set1_ps(scores[(long)h * length + t]);
            float* a = acc + (long)h * head_dim;
            for (int d = 0; d < head_dim; d += 16)
                _mm512_storeu_ps(a + d, _mm512_fmadd_ps(weight, load16(vh + d), _mm512_loadu_ps(a + d)));
        }
    }
}

/* The chunks' partial results merged per head, as in flash-decoding, into out rounded to bf16 once. */
static void merge_chunks(const float* partials, long part, int chunks, int num_heads, int head_dim, uint16_t* out) {
    for (int h = 0; h < num_heads; h++) {
        float top = -INFINITY, total = 0.0f, weights[chunks];
        for (int c = 0; c < chunks; c++) top = fmaxf(top, partials[part * c + h]);
        for (int c = 0; c < chunks; c++) {
            weights[c] = partials[part * c + h] == -INFINITY ? 0.0f : expf(partials[part * c + h] - top);
            total += weights[c] * partials[part * c + num_heads + h];
        }
        for (int d = 0; d < head_dim; d += 16) {
            __m512 x = _mm512_setzero_ps();
            for (int c = 0; c < chunks; c++)
                x = _mm512_fmadd_ps(_mm512_set1_ps(weights[c]),
                                    _mm512_loadu_ps(partials + part * c + 2 * num_heads + (long)h * head_dim + d), x);
            store16(out + (long)h * head_dim + d, _mm512_div_ps(x, _mm512_set1_ps(total)));
        }
    }
}

/* Attention of one query token: out[h] = softmax(scale * q[h] . K[t, g]) . V[t, g] over t < length, where
 * g = h / (num_heads / num_kv_heads). K and V hold `length` token rows of num_kv_heads * head_dim values,
 * row_stride elements apart (a run of the paged cache read in place). The tokens are split into chunks of `chunk`
 * tokens that threads claim as they come free; each chunk keeps its own running max, sum and weighted sum of V, and
 * the thread that finishes the last chunk merges them, as in flash-decoding. The split does not depend on the number
 * of threads, so neither does the result (the engine resizes its thread team while it runs), and no thread owns a
 * fixed share that the others would wait for. All fp32; the output is rounded to bf16 once.
 * scratch: num_heads * (length + chunks * (head_dim + 2)) floats, chunks = ceil(length / chunk).
 * head_dim % 32 == 0. */
void vllm_utils_decode_attention_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                                      int num_heads, int num_kv_heads, int head_dim, int length, long row_stride,
                                      float scale, int threads, int chunk, float* scratch) {
    int group = num_heads / num_kv_heads, chunks = (length + chunk - 1) / chunk, finished = 0;
    long part = (long)num_heads * (head_dim + 2);
    float* partials = scratch + (long)num_heads * length;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int c = 0; c < chunks; c++) {
        int t1 = (c + 1) * chunk < length ? (c + 1) * chunk : length;
        attend_chunk(q, k, v, num_heads, group, head_dim, length, row_stride, scale, c * chunk, t1, scratch,
                     partials + part * c);
        if (__atomic_add_fetch(&finished, 1, __ATOMIC_ACQ_REL) == chunks) /* the others' partials are visible */
            merge_chunks(partials, part, chunks, num_heads, head_dim, out);
    }
}

/* e^x for 16 floats (relative error ~2e-7); -inf and anything below -87.3 give 0. */
static inline __m512 exp16(__m512 x) {
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* x - n ln2, ln2 split in two for precision */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ), _mm512_scalef_ps(p, n));
}

/* out[r] = bf16(bf16(silu(gate)) * up) with gate, up the two halves of row r of x (n values each, rows x_stride
 * apart): PyTorch's F.silu(gate) * up in bf16, with its rounding points. n % 16 == 0. */
void vllm_utils_silu_mul_bf16(const uint16_t* x, uint16_t* out, int rows, int n, long x_stride) {
#pragma omp parallel for schedule(static) collapse(2) if ((long)rows * n > 16384)
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i += 16) {
            __m512 gate = load16(x + r * x_stride + i), up = load16(x + r * x_stride + n + i);
            __m512 silu = _mm512_div_ps(
                gate, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate))));
            store16(out + (long)r * n + i, _mm512_mul_ps(round_bf16(silu), up));
        }
}

/* CLIP's quick_gelu, x * sigmoid(1.702 x), with PyTorch's bf16 rounding after each of its three ops. n % 16 == 0. */
void vllm_utils_quick_gelu_bf16(const uint16_t* x, uint16_t* out, long n) {
#pragma omp parallel for schedule(static) if (n > 16384)
    for (long i = 0; i < n; i += 16) {
        __m512 v = load16(x + i), t = round_bf16(_mm512_mul_ps(v, _mm512_set1_ps(1.702f)));
        __m512 sigmoid = _mm512_div_ps(
            _mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), t))));
        store16(out + i, _mm512_mul_ps(v, round_bf16(sigmoid)));
    }
}

#define QB 32 /* query rows per task */
#define KB 64 /* keys per block */

/* Attention of a whole prompt, flash-style: out[t, h] = softmax(scale * q[t, h] . K[s, g]) . V[s, g] over s < tokens
 * (s <= t when causal, s < key_ends[t] when key_ends is given: a query that also sees later keys, and t - s < window
 * when window > 0: a sliding window), g = h / (num_heads / num_kv_heads). q:
 * tokens rows of num_heads * head_dim values, q_stride apart; k, v: tokens rows of num_kv_heads * head_dim values,
 * kv_stride apart; out: [tokens, num_heads, head_dim]. Both products run on VDPBF16PS, which multiplies pairs of bf16
 * along its reduction, so K is first packed as [head_dim / 2][keys][2] (gathers) and V as [keys / 2][head_dim][2]
 * (packed: 2 * num_kv_heads * padded * head_dim values, padded = tokens rounded up to KB; padding keys are zero and
 * masked). Each task is one head and QB query rows, walking key blocks with a running max and sum per row;
 * probabilities are rounded to bf16 for the second product, as flash attention does on GPUs. head_dim % 64 == 0. */
void vllm_utils_prefill_attention_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                                       int tokens, int num_heads, int num_kv_heads, int head_dim, long q_stride,
                                       long kv_stride, float scale, int causal, int window, const int32_t* key_ends,
                                       uint16_t* packed) {
    int group = num_heads / num_kv_heads, pairs = head_dim / 2, qblocks = (tokens + QB - 1) / QB;
    long padded = (tokens + KB - 1) / KB * KB, head_size = padded * head_dim;
#pragma omp parallel
    {
#pragma omp for schedule(static) collapse(2)
        for (int g = 0; g < num_kv_heads; g++) /* K: 16 tokens' (d, d+1) pairs per gather */
            for (long t0 = 0; t0 < padded; t0 += 16) {
                __mmask16 real = t0 + 16 <= tokens ? 0xffff : t0 >= tokens ? 0 : (__mmask16)((1u << (tokens - t0)) - 1);
                __m512i offsets =
                    _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_epi32((int)(kv_stride / 2)));
                const int32_t* kt = (const int32_t*)(k + (t0 < tokens ? t0 : 0) * kv_stride + (long)g * head_dim);
                int32_t* kp = (int32_t*)(packed + g * head_size) + t0;
                for (int p = 0; p < pairs; p++)
                    _mm512_storeu_si512(kp + p * padded,
                                        _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real, offsets, kt + p, 4));
            }
#pragma omp for schedule(static) collapse(2)
        for (int g = 0; g < num_kv_heads; g++) /* V: rows 2j and 2j + 1 interleaved */
            for (long j = 0; j < padded / 2; j++) {
                const __m512i low =
                    _mm512_setr_epi32(0x200000, 0x210001, 0x220002, 0x230003, 0x240004, 0x250005, 0x260006, 0x270007,
                                      0x280008, 0x290009, 0x2a000a, 0x2b000b, 0x2c000c, 0x2d000d, 0x2e000e, 0x2f000f);
                const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
                const uint16_t *a = v + 2 * j * kv_stride + (long)g * head_dim, *b = a + kv_stride;
                uint16_t* vp = packed + (num_kv_heads + g) * head_size + j * head_dim * 2;
                for (int d = 0; d < head_dim; d += 32) {
                    __m512i ra = 2 * j < tokens ? _mm512_loadu_si512(a + d) : _mm512_setzero_si512();
                    __m512i rb = 2 * j + 1 < tokens ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512();
                    _mm512_storeu_si512(vp + 2 * d, _mm512_permutex2var_epi16(ra, low, rb));
                    _mm512_storeu_si512(vp + 2 * d + 32, _mm512_permutex2var_epi16(ra, high, rb));
                }
            }
        float S[QB * KB], O[QB * head_dim], row_max[QB], row_sum[QB];
        uint16_t P[QB * KB];
#pragma omp for schedule(dynamic)
        for (int task = 0; task < num_heads * qblocks; task++) {
            int h = task / qblocks, qb = qblocks - 1 - task % qblocks; /* causal: longest tasks first */
            int i0 = qb * QB, rows = tokens - i0 < QB ? tokens - i0 : QB, key_end = causal ? i0 + rows : tokens;
            for (int r = 0; key_ends && r < rows; r++) key_end = key_ends[i0 + r] > key_end ? key_ends[i0 + r] : key_end;
            const uint16_t *kp = packed + (h / group) * head_size,
                           *vp = packed + (num_kv_heads + h / group) * head_size;
            for (int r = 0; r < QB; r++) row_max[r] = -INFINITY, row_sum[r] = 0.0f;
            for (int i = 0; i < QB * head_dim; i++) O[i] = 0.0f;
            int first = window > 0 && i0 - window + 1 > 0 ? i0 - window + 1 : 0; /* the first key any row sees */
            for (int k0 = first / KB * KB; k0 < key_end; k0 += KB) {
                for (int r = 0; r < QB; r += 4) { /* S = scale * Q K^T, 4 rows x KB keys at a time */
                    const uint16_t* qr[4];
                    for (int j = 0; j < 4; j++) {
                        int i = i0 + r + j < tokens ? i0 + r + j : tokens - 1; /* rows past the end: ignored */
                        qr[j] = q + i * q_stride + (long)h * head_dim;
                    }
                    __m512 acc[4][4];
                    for (int j = 0; j < 4; j++)
                        for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
                    for (int p = 0; p < pairs; p++) {
                        const uint16_t* kr = kp + ((long)p * padded + k0) * 2;
                        __m512bh kv[4];
                        for (int c = 0; c < 4; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kr + 32 * c);
                        for (int j = 0; j < 4; j++) {
                            __m512bh qv = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(qr[j] + 2 * p));
                            for (int c = 0; c < 4; c++) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], qv, kv[c]);
                        }
                    }
                    for (int j = 0; j < 4; j++)
                        for (int c = 0; c < 4; c++)
                            _mm512_storeu_ps(S + (r + j) * KB + 16 * c,
                                             _mm512_mul_ps(acc[j][c], _mm512_set1_ps(scale)));
                }
                for (int r = 0; r < QB; r++) { /* online softmax; P = 0 for masked keys and rows past the end */
                    int limit = r >= rows ? 0 : key_ends ? key_ends[i0 + r] : causal ? i0 + r + 1 : tokens;
                    int low = window > 0 ? i0 + r - window + 1 : 0;
                    __m512 s[4], top = _mm512_set1_ps(-INFINITY);
                    for (int c = 0; c < 4; c++) {
                        __m512i key =
                            _mm512_add_epi32(_mm512_set1_epi32(k0 + 16 * c),
                                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
                        __mmask16 valid = _mm512_cmplt_epi32_mask(key, _mm512_set1_epi32(limit)) &
                                          _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(low));
                        s[c] =
                            _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_loadu_ps(S + r * KB + 16 * c));
                        top = _mm512_max_ps(top, s[c]);
                    }
                    float m = fmaxf(row_max[r], _mm512_reduce_max_ps(top));
                    if (m == -INFINITY) { /* nothing to attend to in this block */
                        for (int c = 0; c < 4; c++)
                            _mm256_storeu_si256((__m256i*)(P + r * KB + 16 * c), _mm256_setzero_si256());
                        continue;
                    }
                    float alpha = expf(row_max[r] - m);
                    __m512 sum = _mm512_setzero_ps();
                    for (int c = 0; c < 4; c++) {
                        __m512 e = exp16(_mm512_sub_ps(s[c], _mm512_set1_ps(m)));
                        sum = _mm512_add_ps(sum, e);
                        _mm256_storeu_si256((__m256i*)(P + r * KB + 16 * c), (__m256i)_mm512_cvtneps_pbh(e));
                    }
                    row_sum[r] = row_sum[r] * alpha + _mm512_reduce_add_ps(sum);
                    row_max[r] = m;
                    if (alpha != 1.0f)
                        for (int d = 0; d < head_dim; d += 16)
                            _mm512_storeu_ps(O + r * head_dim + d, _mm512_mul_ps(_mm512_loadu_ps(O + r * head_dim + d),
                                                                                 _mm512_set1_ps(alpha)));
                }
                for (int r = 0; r < QB; r += 4) /* O += P V, 4 rows x 64 columns at a time */
                    for (int d0 = 0; d0 < head_dim; d0 += 64) {
                        __m512 acc[4][4];
                        for (int j = 0; j < 4; j++)
                            for (int c = 0; c < 4; c++)
                                acc[j][c] = _mm512_loadu_ps(O + (r + j) * head_dim + d0 + 16 * c);
                        for (int pair = 0; pair < KB / 2; pair++) {
                            const uint16_t* vr = vp + ((long)(k0 / 2 + pair) * head_dim + d0) * 2;
                            __m512bh vv[4];
                            for (int c = 0; c < 4; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vr + 32 * c);
                            for (int j = 0; j < 4; j++) {
                                __m512bh pv =
                                    (__m512bh)_mm512_set1_epi32(*(const int32_t*)(P + (r + j) * KB + 2 * pair));
                                for (int c = 0; c < 4; c++) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], pv, vv[c]);
                            }
                        }
                        for (int j = 0; j < 4; j++)
                            for (int c = 0; c < 4; c++)
                                _mm512_storeu_ps(O + (r + j) * head_dim + d0 + 16 * c, acc[j][c]);
                    }
            }
            for (int r = 0; r < rows; r++) {
                uint16_t* o = out + ((long)(i0 + r) * num_heads + h) * head_dim;
                for (int d = 0; d < head_dim; d++) o[d] = to_bf16(O[r * head_dim + d] / row_sum[r]);
            }
        }
    }
}

/* One token of each of `seqs` sequences through the gated delta rule (linear attention), each sequence's state
 * S [key_dim, value_dim] of value head h in states[slots[s]] updated in place: S *= exp(g); S += k (beta (v - S^T k))^T;
 * out = S^T q, with q and k L2-normalised (q also scaled by key_dim ** -0.5), key head h / (value_heads /
 * key_heads). All float32: q, k [seqs, key_heads, key_dim], v and out [seqs, value_heads, value_dim], g and beta
 * [seqs, value_heads], states [slots, value_heads, key_dim, value_dim]. Two passes over a state (the remembered
 * value needs the whole decayed state first); the second finds it in cache. value_dim <= 512. */
void vllm_utils_delta_rule_step(const float* q, const float* k, const float* v, const float* g, const float* beta,
                                float* states, const int64_t* slots, float* out, int seqs, int key_heads,
                                int value_heads, int key_dim, int value_dim) {
    int group = value_heads / key_heads;
#pragma omp parallel for schedule(static)
    for (int task = 0; task < seqs * value_heads; task++) {
        int s = task / value_heads, h = task % value_heads;
        const float *qs = q + ((long)s * key_heads + h / group) * key_dim, *ks = k + ((long)s * key_heads + h / group) * key_dim;
        float qn = 0.0f, kn = 0.0f;
        for (int i = 0; i < key_dim; i++) qn += qs[i] * qs[i], kn += ks[i] * ks[i];
        float q_scale = 1.0f / sqrtf(qn + 1e-6f) / sqrtf((float)key_dim), k_scale = 1.0f / sqrtf(kn + 1e-6f);
        float decay = expf(g[task]), rate = beta[task], remembered[512], delta[512];
        float* state = states + (slots[s] * value_heads + h) * (long)key_dim * value_dim;
        const float* vs = v + (long)task * value_dim;
        float* os = out + (long)task * value_dim;
        for (int j = 0; j < value_dim; j++) remembered[j] = 0.0f, os[j] = 0.0f;
        for (int i = 0; i < key_dim; i++) {
            float* row = state + (long)i * value_dim;
            float ki = ks[i] * k_scale;
#pragma omp simd
            for (int j = 0; j < value_dim; j++) {
                row[j] *= decay;
                remembered[j] += row[j] * ki;
            }
        }
        for (int j = 0; j < value_dim; j++) delta[j] = (vs[j] - remembered[j]) * rate;
        for (int i = 0; i < key_dim; i++) {
            float* row = state + (long)i * value_dim;
            float ki = ks[i] * k_scale, qi = qs[i] * q_scale;
#pragma omp simd
            for (int j = 0; j < value_dim; j++) {
                row[j] += ki * delta[j];
                os[j] += row[j] * qi;
            }
        }
    }
}
