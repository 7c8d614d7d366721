/* 4-bit weights x 8-bit activations for small-batch CPU linears (scission.kernels.w4a8).
 *
 * The scheme is llama.cpp's Q4_1 x Q8_1 (ggml-quants.c, ggml_vec_dot_q4_1_q8_1): weights in
 * blocks of 32 along K with an fp16 scale d and minimum m (w = q * d + m, q in [0, 15]); the
 * activations are quantized per call, per row and block of 32, to int8 a with scale e =
 * max|x| / 127 and s = e * sum(a). Then
 *
 *     y[m, n] = sum_g  d[n,g] * e[m,g] * sum_j q[n,g,j] * a[m,g,j]  +  m[n,g] * s[m,g].
 *
 * The integer dot of a block is one vpmaddubsw + vpmaddwd on AVX2 (q <= 15 and |a| <= 127,
 * so the int16 pair sums cannot saturate). Four output rows are computed together so their
 * four float accumulators are independent (one accumulator per row serializes on the FMA
 * latency); the weight is laid out in tiles of 4 rows (below). Without AVX2 the same arithmetic runs in plain C (also what the tests build with
 * SCISSION_W4A8_PORTABLE to check it).
 *
 * Threads: OpenMP over tiles of 4 rows, one contiguous run per thread. Linked against libgomp.so.1, which resolves to the
 * copy torch already loaded (same soname), so the kernel runs on the calling thread's
 * existing OpenMP team.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(SCISSION_W4A8_PORTABLE)
#define W4A8_AVX2 1
#include <immintrin.h>
#endif

/* Software prefetch this far ahead in a tile's stream: ~15 % faster over a whole model's
 * weights (DRAM, not cache) than the hardware prefetcher alone on a 2-core AVX2 EPYC. */
#ifndef W4A8_PREFETCH_BYTES
#define W4A8_PREFETCH_BYTES 1024
#endif
#define QK 32 /* weights per block */
#define NR 4  /* output rows per tile */

/* The weight is stored in tiles of NR = 4 output rows: for each tile and block g, 80 bytes
 *     uint16 d[4] (fp16 scales), uint16 m[4] (fp16 minimums), uint8 qs[4][16],
 * with qs[r][j] = q[r, j] | q[r, j + 16] << 4 (codes of row n0 + r, block g). One tile is one
 * sequential stream and its four scales are one 8-byte load. Rows past N (the last tile's
 * padding) hold zeros and are not written. */
typedef struct {
    uint16_t d[NR], m[NR];
    uint8_t qs[NR][QK / 2];
} tile_q4_1; /* 80 bytes: 20 per row and block, as llama.cpp's block_q4_1 */

int w4a8_tile_bytes(void) { return (int)sizeof(tile_q4_1); }
int w4a8_tile_rows(void) { return NR; }

int w4a8_uses_avx2(void) {
#ifdef W4A8_AVX2
    return 1;
#else
    return 0;
#endif
}

static inline float half_to_float(uint16_t h) {
#ifdef W4A8_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, f;
    if (exp == 0) {
        if (mant == 0) {
            f = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            f = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        f = sign | 0x7f800000 | (mant << 13);
    } else {
        f = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float out;
    memcpy(&out, &f, sizeof out);
    return out;
#endif
}

/* x [M, K] float32 -> a [M, K] int8, e [M, K/32] scales, s [M, K/32] = e * sum(a). */
void w4a8_quantize_x(const float *x, int64_t M, int64_t K, int8_t *a, float *e, float *s) {
    const int64_t G = K / QK;
    for (int64_t i = 0; i < M * G; i++) {
        const float *xb = x + i * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) {
            float v = fabsf(xb[j]);
            amax = v > amax ? v : amax;
        }
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)nearbyintf(xb[j] * inv); /* round half to even */
            a[i * QK + j] = (int8_t)q;
            sum += q;
        }
        e[i] = amax / 127.f;
        s[i] = e[i] * (float)sum;
    }
}

#ifdef W4A8_AVX2
static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* acc + d * e * (q . a) for one row's block (8 partial sums). */
static inline __m256 block_dot(const uint8_t *qs, __m256i av, __m256 de, __m256 acc) {
    /* the 16 bytes in both halves; the upper half shifted by 4: q[0..15] | q[16..31] */
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    const __m256i q = _mm256_and_si256(_mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xf0),
                                       _mm256_set1_epi8(0x0f));
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, av), _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), de, acc);
}

/* The 4 rows of one tile for activation row m. */
static void tile_avx2(const tile_q4_1 *t, int64_t G, const int8_t *am, const float *em,
                      const float *sm, float *out) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    __m128 accm = _mm_setzero_ps();
    for (int64_t g = 0; g < G; g++, t++) {
#if W4A8_PREFETCH_BYTES > 0
        _mm_prefetch((const char *)t + W4A8_PREFETCH_BYTES, _MM_HINT_T0);
#endif
        const __m256i av = _mm256_loadu_si256((const __m256i *)(am + g * QK));
        const __m128 de = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)t->d)),
                                     _mm_set1_ps(em[g]));
        const __m128 mn = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)t->m));
        accm = _mm_fmadd_ps(mn, _mm_set1_ps(sm[g]), accm);
        const __m256 de2 = _mm256_set_m128(de, de);
        acc0 = block_dot(t->qs[0], av, _mm256_permute_ps(de2, 0x00), acc0);
        acc1 = block_dot(t->qs[1], av, _mm256_permute_ps(de2, 0x55), acc1);
        acc2 = block_dot(t->qs[2], av, _mm256_permute_ps(de2, 0xaa), acc2);
        acc3 = block_dot(t->qs[3], av, _mm256_permute_ps(de2, 0xff), acc3);
    }
    float mins[4];
    _mm_storeu_ps(mins, accm);
    out[0] = hsum(acc0) + mins[0];
    out[1] = hsum(acc1) + mins[1];
    out[2] = hsum(acc2) + mins[2];
    out[3] = hsum(acc3) + mins[3];
}
#endif

#ifndef W4A8_AVX2
static void tile_portable(const tile_q4_1 *t, int64_t G, const int8_t *am, const float *em,
                          const float *sm, float *out) {
    for (int r = 0; r < NR; r++) {
        float acc = 0.f, accm = 0.f;
        for (int64_t g = 0; g < G; g++) {
            const int8_t *ag = am + g * QK;
            const uint8_t *qs = t[g].qs[r];
            int dot = 0;
            for (int j = 0; j < QK / 2; j++)
                dot += (qs[j] & 0x0f) * ag[j] + (qs[j] >> 4) * ag[j + QK / 2];
            acc += (float)dot * (half_to_float(t[g].d[r]) * em[g]);
            accm += half_to_float(t[g].m[r]) * sm[g];
        }
        out[r] = acc + accm;
    }
}
#endif

/* y [M, N] float32 = x [M, K] float32 times the Q4_1 weight w ([w_rows, w_cols] bytes:
 * ceil(N / 4) tiles of K / 32 blocks), with x quantized to Q8_1 first. Returns 0; -2 (nothing
 * done) when the shapes do not fit; -1 when the scratch allocation fails (y untouched). */
int w4a8_mm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t w_rows,
            int64_t w_cols, int64_t N, float *y, int nthreads) {
    if (M < 0 || K <= 0 || N <= 0 || K % QK || w_rows != (N + NR - 1) / NR
        || w_cols != K / QK * (int64_t)sizeof(tile_q4_1))
        return -2;
    const int64_t G = K / QK;
    int8_t *a = (int8_t *)malloc((size_t)(M * K) + 2 * (size_t)(M * G) * sizeof(float) + 16);
    if (!a) return -1;
    float *e = (float *)(a + ((M * K + 15) & ~(int64_t)15));
    float *s = e + M * G;
    w4a8_quantize_x(x, M, K, a, e, s);
    const tile_q4_1 *wt = (const tile_q4_1 *)w;
    const int64_t tiles = (N + NR - 1) / NR;
    /* static: each thread streams one contiguous run of tiles, which the hardware prefetcher
     * follows; dynamic chunks of 8 tiles made a whole decode step ~15 % slower (2-core AVX2
     * EPYC, bench/README.md) */
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * NR, nr = N - n0 < NR ? N - n0 : NR;
        for (int64_t m = 0; m < M; m++) {
            float out[NR];
#ifdef W4A8_AVX2
            tile_avx2(wt + t * G, G, a + m * K, e + m * G, s + m * G, out);
#else
            tile_portable(wt + t * G, G, a + m * K, e + m * G, s + m * G, out);
#endif
            for (int64_t r = 0; r < nr; r++) y[m * N + n0 + r] = out[r];
        }
    }
    free(a);
    return 0;
}

/* bfloat16 (round to nearest even, as torch's float32 -> bfloat16) back in float32 */
static inline float round_to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7f800000) != 0x7f800000) u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Indices of the k largest of v[0..n) into idx (any order; ties: the earlier index stays).
 * A min-heap of k entries; an element enters only when it beats the heap's minimum, so a
 * vocabulary-sized row costs ~n compares. */
static void top_k_indices(const float *v, int64_t n, int64_t k, int64_t *idx) {
    int64_t size = 0;
    for (int64_t i = 0; i < n; i++) {
        if (size < k) { /* sift up */
            int64_t c = size++;
            while (c > 0) {
                const int64_t p = (c - 1) / 2;
                if (v[idx[p]] <= v[i]) break;
                idx[c] = idx[p];
                c = p;
            }
            idx[c] = i;
        } else if (v[i] > v[idx[0]]) { /* replace the minimum, sift down */
            int64_t c = 0;
            for (;;) {
                int64_t l = 2 * c + 1, m = l;
                if (l >= k) break;
                if (l + 1 < k && v[idx[l + 1]] < v[idx[l]]) m = l + 1;
                if (v[idx[m]] >= v[i]) break;
                idx[c] = idx[m];
                c = m;
            }
            idx[c] = i;
        }
    }
}

/* The rescored LM head (engine/quant.py RescoredInt4Head with a W4A8Linear coarse pass) in
 * one call: logits [M, V] = x [M, K] times the Q4_1 weight (w4a8_mm), then in each row the
 * top_k logits recomputed as (w8[v] . bf16(x)) * scale[v] from int8 weights w8 [V, K] and
 * bfloat16 per-row scales (raw bits). Returns 0, -2 for shapes that do not fit, -1 when
 * memory fails. */
int w4a8_rescored_head(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t w_rows,
                       int64_t w_cols, int64_t V, const int8_t *w8, const uint16_t *scales_bf16,
                       int64_t top_k, float *logits, int nthreads) {
    if (top_k < 0 || top_k > V) return -2;
    int rc = w4a8_mm(x, M, K, w, w_rows, w_cols, V, logits, nthreads);
    if (rc || top_k == 0) return rc;
    int64_t *idx = (int64_t *)malloc((size_t)top_k * sizeof(int64_t));
    float *xb = (float *)malloc((size_t)K * sizeof(float));
    if (!idx || !xb) { free(idx); free(xb); return -1; }
    for (int64_t m = 0; m < M; m++) {
        float *row = logits + m * V;
        for (int64_t j = 0; j < K; j++) xb[j] = round_to_bf16(x[m * K + j]);
        top_k_indices(row, V, top_k, idx);
        for (int64_t t = 0; t < top_k; t++) {
            const int8_t *wr = w8 + idx[t] * K;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < K; j++) dot += (float)wr[j] * xb[j];
            const uint32_t sbits = (uint32_t)scales_bf16[idx[t]] << 16;
            float scale;
            memcpy(&scale, &sbits, sizeof scale);
            row[idx[t]] = dot * scale;
        }
    }
    free(idx);
    free(xb);
    return 0;
}
