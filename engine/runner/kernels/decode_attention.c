/* One decode step's attention in float32 on x86-64 with AVX2 and FMA: every row's query
 * heads against that row's cached keys and values (engine/runner/compiled_decode.py calls
 * it through coconut_kernels::decode_attention, linear_rows_op.cpp).
 *
 * For row r and key/value head h, the G query heads that share h (grouped-query attention):
 *   scores[g][l] = (q[r][h][g] . K[r][h][l]) * scaling + mask[r][l]   for l < L
 *   out[r][h][g] = sum_l softmax(scores[g])[l] V[r][h][l]
 * Each (row, head) pair reads its keys and values once (the G query heads meet each key and
 * each value together), in place in the cache: torch's batched matrix products took about
 * 100 us a layer at 16 rows, most of it calls and copies of these small matrices.
 * A mask of -inf gives that key weight 0; a row whose keys are all masked gives zeros.
 * Q [n][H][G][D] and O [n][H][G][D] contiguous; K, V: element (r, h, l, d) at
 * r * row_stride + h * head_stride + l * D + d; mask [n][L] contiguous.
 * Threads: OpenMP over the n x H pairs, each summed by one thread in a fixed order.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>

static inline float dot(const float *a, const float *b, long d) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    float total = _mm_cvtss_f32(s);
    for (; i < d; i++) total += a[i] * b[i];
    return total;
}

/* q . k[j] for the 8 keys k, k + D, ..., k + 7 D -> one register, in order (D a multiple of 8) */
static inline __m256 dots_8(const float *q, const float *k, long D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (long i = 0; i < D; i += 8) {
        __m256 x = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + D + i), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 2 * D + i), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 3 * D + i), a3);
        a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 4 * D + i), a4);
        a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 5 * D + i), a5);
        a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 6 * D + i), a6);
        a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 7 * D + i), a7);
    }
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* e^x for x <= 0 (a softmax's shifted scores): Cephes' degree-6 polynomial after taking
 * out powers of 2, relative error about 2e-7; below -87 (and -inf) it gives exactly 0 */
static inline __m256 exp_nonpositive(__m256 x) {
    __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(power)));
}

static inline void axpy(float w, const float *x, float *y, long d) {
    __m256 wv = _mm256_set1_ps(w);
    long i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < d; i++) y[i] += w * x[i];
}

/* returns 0, or -1 where a thread could not allocate its G x L scores (O is then incomplete) */
int coconut_decode_attention(const float *Q, const float *K, const float *V, const float *mask, float *O,
                             long n, long H, long G, long D, long L, long row_stride, long head_stride,
                             float scaling, int threads) {
    int parallel = threads > 1 && n * H > 1 && n * H * L * D >= 16384, failed = 0;
    #pragma omp parallel num_threads(threads) if (parallel)
    {
        float *scores = malloc(sizeof(float) * (G * L > 0 ? G * L : 1));
        if (!scores) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (long task = 0; task < n * H; task++) {
            if (!scores) continue;     /* every thread still meets the loop */
            long r = task / H, h = task % H;
            const float *q = Q + (r * H + h) * G * D, *k = K + r * row_stride + h * head_stride;
            const float *v = V + r * row_stride + h * head_stride, *m = mask + r * L;
            float *o = O + (r * H + h) * G * D;
            long l0 = 0;
            if (D % 8 == 0) {
                __m256 scale = _mm256_set1_ps(scaling);
                for (; l0 + 8 <= L; l0 += 8)
                    for (long g = 0; g < G; g++)
                        _mm256_storeu_ps(scores + g * L + l0, _mm256_fmadd_ps(dots_8(q + g * D, k + l0 * D, D), scale,
                                                                              _mm256_loadu_ps(m + l0)));
            }
            for (long l = l0; l < L; l++)
                for (long g = 0; g < G; g++)
                    scores[g * L + l] = dot(q + g * D, k + l * D, D) * scaling + m[l];
            for (long g = 0; g < G; g++) {
                float *s = scores + g * L, top = -INFINITY, sum = 0.0f;
                for (long l = 0; l < L; l++) top = s[l] > top ? s[l] : top;
                long l = 0;
                if (top != -INFINITY) {
                    __m256 shift = _mm256_set1_ps(top), total = _mm256_setzero_ps();
                    for (; l + 8 <= L; l += 8) {
                        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + l), shift));
                        _mm256_storeu_ps(s + l, e);
                        total = _mm256_add_ps(total, e);
                    }
                    float lanes[8];
                    _mm256_storeu_ps(lanes, total);
                    for (int j = 0; j < 8; j++) sum += lanes[j];
                }
                for (; l < L; l++) {
                    s[l] = top == -INFINITY ? 0.0f : expf(s[l] - top);
                    sum += s[l];
                }
                float scale = sum > 0.0f ? 1.0f / sum : 0.0f;
                for (long l = 0; l < L; l++) s[l] *= scale;
                for (long d = 0; d < D; d++) o[g * D + d] = 0.0f;
            }
            for (long l = 0; l < L; l++)
                for (long g = 0; g < G; g++)
                    if (scores[g * L + l] != 0.0f) axpy(scores[g * L + l], v + l * D, o + g * D, D);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
