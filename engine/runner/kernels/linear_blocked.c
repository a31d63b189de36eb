/* Y = X W^T (+ bias) (+ add) in float32 on x86-64 with AVX2 and FMA, on a weight the engine
 * laid out once in blocks of 16 output rows: P [m / 16][n][16], P[b][k][j] = W[16 b + j][k]
 * (engine/runner/cpu_kernel.py, BlockedProduct). The engine's product for a decoder's
 * linear layers on CPU; the weight as the model holds it goes through linear_rows.c.
 *
 * - Each 16-output block is one contiguous run of n x 16 floats, so an output needs no
 *   horizontal sum: for every k the block's 16 weights (two registers) meet x[k], broadcast.
 * - More rows: tiles of 16 outputs x 6 rows keep 12 accumulators in registers; a block is
 *   read from memory once and met by every 6 rows from cache. Over SmolLM2-135M's 120 decoder
 *   products on this project's 2-core AMD EPYC (AVX-512 CPUs too: this is AVX2 code), side
 *   by side: 27.5 ms at 16 rows against 34.7 for linear_rows.c and 26.7 for oneDNN's packed
 *   weights; 45.0 against 55.3 and 41.5 at 32 rows.
 * - On a CPU with AVX-512 (checked at run time; the rest is AVX2), more rows go through
 *   tiles of 16 outputs (one register) x 12 rows instead: 25-26.5 ms at 16 rows, 45.7-46.8
 *   at 32, on a Zen 4 EPYC where oneDNN's AVX-512 packed products took 29-32 and 47-51.
 * - One row: each thread splits its share of blocks in four runs and multiplies one block
 *   of each at a time (four long sequential streams, as linear_rows.c does for rows).
 * Every output is summed over k in order (one fused multiply-add per k) by one thread,
 * whatever the thread count, the number of rows or the instruction set: a row's result
 * does not depend on the batch it came in.
 * X [rows, n], Y [rows, m], add [rows, m]: contiguous; bias [m] and add may be NULL.
 * m: any count up to 16 x blocks (the last block's extra rows are zeros, never stored).
 */
#include <immintrin.h>
#include <stddef.h>
#include <omp.h>

/* 16 sums (two registers) -> y[o .. o+15] (+ bias) (+ add), only those below m */
static inline void put16(float *y, long o, long m, __m256 lo, __m256 hi, const float *bias, const float *add) {
    float t[16];
    _mm256_storeu_ps(t, lo);
    _mm256_storeu_ps(t + 8, hi);
    long end = m - o < 16 ? m - o : 16;
    for (long j = 0; j < end; j++) {
        float v = t[j];
        if (bias) v += bias[o + j];
        if (add) v += add[o + j];
        y[o + j] = v;
    }
}

/* block b against x rows r .. r+R-1 (R <= 6: 12 accumulators, the weights' two registers
 * and a broadcast fill 15 of AVX2's 16) */
static inline __attribute__((always_inline)) void tile(const float *P, const float *X, float *Y, const float *bias,
                                                        const float *add, long r, long b, long m, long n, const int R) {
    const float *p = P + b * n * 16, *x = X + r * n;
    __m256 z = _mm256_setzero_ps();
    __m256 a0 = z, a1 = z, a2 = z, a3 = z, a4 = z, a5 = z, a6 = z, a7 = z, a8 = z, a9 = z, a10 = z, a11 = z;
    for (long k = 0; k < n; k++) {
        __m256 w0 = _mm256_loadu_ps(p + 16 * k), w1 = _mm256_loadu_ps(p + 16 * k + 8), v;
        v = _mm256_broadcast_ss(x + k); a0 = _mm256_fmadd_ps(w0, v, a0); a1 = _mm256_fmadd_ps(w1, v, a1);
        if (R > 1) { v = _mm256_broadcast_ss(x + n + k); a2 = _mm256_fmadd_ps(w0, v, a2); a3 = _mm256_fmadd_ps(w1, v, a3); }
        if (R > 2) { v = _mm256_broadcast_ss(x + 2 * n + k); a4 = _mm256_fmadd_ps(w0, v, a4); a5 = _mm256_fmadd_ps(w1, v, a5); }
        if (R > 3) { v = _mm256_broadcast_ss(x + 3 * n + k); a6 = _mm256_fmadd_ps(w0, v, a6); a7 = _mm256_fmadd_ps(w1, v, a7); }
        if (R > 4) { v = _mm256_broadcast_ss(x + 4 * n + k); a8 = _mm256_fmadd_ps(w0, v, a8); a9 = _mm256_fmadd_ps(w1, v, a9); }
        if (R > 5) { v = _mm256_broadcast_ss(x + 5 * n + k); a10 = _mm256_fmadd_ps(w0, v, a10); a11 = _mm256_fmadd_ps(w1, v, a11); }
    }
#define PUT(i, lo, hi) put16(Y + (r + i) * m, 16 * b, m, lo, hi, bias, add ? add + (r + i) * m : NULL)
    PUT(0, a0, a1);
    if (R > 1) PUT(1, a2, a3);
    if (R > 2) PUT(2, a4, a5);
    if (R > 3) PUT(3, a6, a7);
    if (R > 4) PUT(4, a8, a9);
    if (R > 5) PUT(5, a10, a11);
#undef PUT
}

#define TILE(R) static void tile_##R(const float *P, const float *X, float *Y, const float *bias, const float *add, \
                                     long r, long b, long m, long n) { tile(P, X, Y, bias, add, r, b, m, n, R); }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
#undef TILE

/* one x row against blocks b0..b3: four streams, each summed over k in order as tile_1 */
static void blocks_4(const float *P, const float *x, float *y, const float *bias, const float *add,
                     long b0, long b1, long b2, long b3, long m, long n) {
    const float *p0 = P + b0 * n * 16, *p1 = P + b1 * n * 16, *p2 = P + b2 * n * 16, *p3 = P + b3 * n * 16;
    __m256 z = _mm256_setzero_ps(), a0 = z, a1 = z, a2 = z, a3 = z, a4 = z, a5 = z, a6 = z, a7 = z;
    for (long k = 0; k < n; k++) {
        __m256 v = _mm256_broadcast_ss(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p0 + 16 * k), v, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(p0 + 16 * k + 8), v, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(p1 + 16 * k), v, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(p1 + 16 * k + 8), v, a3);
        a4 = _mm256_fmadd_ps(_mm256_loadu_ps(p2 + 16 * k), v, a4);
        a5 = _mm256_fmadd_ps(_mm256_loadu_ps(p2 + 16 * k + 8), v, a5);
        a6 = _mm256_fmadd_ps(_mm256_loadu_ps(p3 + 16 * k), v, a6);
        a7 = _mm256_fmadd_ps(_mm256_loadu_ps(p3 + 16 * k + 8), v, a7);
    }
    put16(y, 16 * b0, m, a0, a1, bias, add);
    put16(y, 16 * b1, m, a2, a3, bias, add);
    put16(y, 16 * b2, m, a4, a5, bias, add);
    put16(y, 16 * b3, m, a6, a7, bias, add);
}

/* block b against x rows r .. r+R-1 (R <= 12), one AVX-512 register of 16 outputs a row */
static inline __attribute__((always_inline, target("avx512f"))) void tile16(
        const float *P, const float *X, float *Y, const float *bias, const float *add, long r, long b, long m, long n,
        const int R) {
    const float *p = P + b * n * 16, *x = X + r * n;
    __m512 a[12];
    #pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm512_setzero_ps();
    for (long k = 0; k < n; k++) {
        __m512 w = _mm512_loadu_ps(p + 16 * k);
        #pragma GCC unroll 12
        for (int i = 0; i < 12; i++)
            if (i < R) a[i] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[i * n + k]), a[i]);
    }
    #pragma GCC unroll 12
    for (int i = 0; i < 12; i++) {
        if (i < R) {
            float t[16];
            _mm512_storeu_ps(t, a[i]);
            put16(Y + (r + i) * m, 16 * b, m, _mm256_loadu_ps(t), _mm256_loadu_ps(t + 8), bias,
                  add ? add + (r + i) * m : NULL);
        }
    }
}

#define TILE16(R) static __attribute__((target("avx512f"))) void tile16_##R(const float *P, const float *X, float *Y, \
        const float *bias, const float *add, long r, long b, long m, long n) { tile16(P, X, Y, bias, add, r, b, m, n, R); }
TILE16(1) TILE16(2) TILE16(3) TILE16(4) TILE16(5) TILE16(6) TILE16(7) TILE16(8) TILE16(9) TILE16(10) TILE16(11) TILE16(12)
#undef TILE16

typedef void (*tile_fn)(const float *, const float *, float *, const float *, const float *, long, long, long, long);
static const tile_fn tiles16[13] = {NULL, tile16_1, tile16_2, tile16_3, tile16_4, tile16_5, tile16_6, tile16_7,
                                    tile16_8, tile16_9, tile16_10, tile16_11, tile16_12};

/* 1: the AVX-512 tiles, 0: AVX2's; -1 until the first call asks the CPU */
static int avx512 = -1;

/* -1: what the kernel uses (after asking the CPU); 0 or 1: use AVX2's tiles, or AVX-512's
 * where the CPU has it; returns what it uses now */
int coconut_blocked_avx512(int use) {
    int has = __builtin_cpu_supports("avx512f");
    if (use >= 0) avx512 = use && has;
    else if (avx512 < 0) avx512 = has;
    return avx512;
}

void coconut_linear_blocked(const float *P, const float *X, float *Y, const float *bias, const float *add,
                            long rows, long m, long n, int threads) {
    long blocks = (m + 15) / 16;
    if (rows == 1) {
        int parallel1 = threads > 1 && m * n >= 65536;
        #pragma omp parallel num_threads(threads) if (parallel1)
        {
            int t = omp_get_thread_num(), count = omp_get_num_threads();
            long per = (blocks + count - 1) / count;
            long start = t * per, end = start + per < blocks ? start + per : blocks;
            long q = (end - start + 3) / 4;
            for (long k = 0; start < end && k < q; k++) {
                long b0 = start + k, b1 = b0 + q, b2 = b1 + q, b3 = b2 + q;
                if (b3 < end) blocks_4(P, X, Y, bias, add, b0, b1, b2, b3, m, n);
                else for (long b = b0; b < end; b += q) tile_1(P, X, Y, bias, add, 0, b, m, n);
            }
        }
        return;
    }
    int parallel = threads > 1 && rows * m * n >= 65536;
    if (coconut_blocked_avx512(-1)) {
        #pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
        for (long b = 0; b < blocks; b++) {
            /* rows split evenly over the fewest tiles of at most 12 (13 rows: 7 + 6, not 12 + 1,
             * whose one-row tile reads the block for one row: SmolLM2's head 5.6 against 6.9 ms) */
            long tiles = (rows + 11) / 12, R = (rows + tiles - 1) / tiles;
            for (long r = 0; r < rows; r += R) tiles16[rows - r < R ? rows - r : R](P, X, Y, bias, add, r, b, m, n);
        }
        return;
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
    for (long b = 0; b < blocks; b++) {
        long r = 0;
        for (; r + 6 <= rows; r += 6) tile_6(P, X, Y, bias, add, r, b, m, n);
        switch (rows - r) {
            case 5: tile_5(P, X, Y, bias, add, r, b, m, n); break;
            case 4: tile_4(P, X, Y, bias, add, r, b, m, n); break;
            case 3: tile_3(P, X, Y, bias, add, r, b, m, n); break;
            case 2: tile_2(P, X, Y, bias, add, r, b, m, n); break;
            case 1: tile_1(P, X, Y, bias, add, r, b, m, n); break;
        }
    }
}
