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
 * so the int16 pair sums cannot saturate), reduced to one exact integer; four output rows
 * are computed together (their four dots reduced at once, one 4-lane float accumulator);
 * the weight is laid out in tiles of 4 rows (below). Every kernel here and both builds sum
 * a row's blocks with the same float operations in the same order (fmaf(dot, d * e, acc),
 * then fmaf(m, s, acc)), so a row's result is the same bits whichever kernel, build or
 * batch computes it. Without AVX2 the same arithmetic runs in plain C (also what the tests build with
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

static inline float hmax(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* q . a for one row's block: 8 int32 partial sums. */
static inline __m256i block_idot(const uint8_t *qs, __m256i av) {
    /* the 16 bytes in both halves; the upper half shifted by 4: q[0..15] | q[16..31] */
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    const __m256i q = _mm256_and_si256(_mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xf0),
                                       _mm256_set1_epi8(0x0f));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, av), _mm256_set1_epi16(1));
}

/* The 4 rows of one tile for activation row m. Per row and block, in order of g:
 * acc = fma(dot, d * e, acc); acc = fma(m, s, acc) with the exact integer dot, the same
 * float operations in the same order as w4a8_gemm's, so both kernels give a row the same
 * bits however many rows share the call (batch invariance across the switch). */
static void tile_avx2(const tile_q4_1 *t, int64_t G, const int8_t *am, const float *em,
                      const float *sm, float *out) {
    __m128 acc = _mm_setzero_ps();
    for (int64_t g = 0; g < G; g++, t++) {
#if W4A8_PREFETCH_BYTES > 0
        _mm_prefetch((const char *)t + W4A8_PREFETCH_BYTES, _MM_HINT_T0);
#endif
        const __m256i av = _mm256_loadu_si256((const __m256i *)(am + g * QK));
        const __m256i p0 = block_idot(t->qs[0], av), p1 = block_idot(t->qs[1], av);
        const __m256i p2 = block_idot(t->qs[2], av), p3 = block_idot(t->qs[3], av);
        /* the four rows' 8 partial sums -> [dot0, dot1, dot2, dot3] (exact integers) */
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
        const __m128i dot = _mm_add_epi32(_mm256_castsi256_si128(h),
                                          _mm256_extracti128_si256(h, 1));
        const __m128 de = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)t->d)),
                                     _mm_set1_ps(em[g]));
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(dot), de, acc);
        acc = _mm_fmadd_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)t->m)),
                           _mm_set1_ps(sm[g]), acc);
    }
    _mm_storeu_ps(out, acc);
}
#endif

#ifndef W4A8_AVX2
static void tile_portable(const tile_q4_1 *t, int64_t G, const int8_t *am, const float *em,
                          const float *sm, float *out) {
    for (int r = 0; r < NR; r++) {
        float acc = 0.f;
        for (int64_t g = 0; g < G; g++) {
            const int8_t *ag = am + g * QK;
            const uint8_t *qs = t[g].qs[r];
            int dot = 0;
            for (int j = 0; j < QK / 2; j++)
                dot += (qs[j] & 0x0f) * ag[j] + (qs[j] >> 4) * ag[j + QK / 2];
            acc = fmaf((float)dot, half_to_float(t[g].d[r]) * em[g], acc);
            acc = fmaf(half_to_float(t[g].m[r]), sm[g], acc);
        }
        out[r] = acc;
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

/* ---- Prefill: many rows (w4a8_gemm) ----
 *
 * The same arithmetic as w4a8_mm, float operations and their order included (the integer dot
 * of every block is exact), laid out for many activation rows. w4a8_mm spends ~8
 * instructions per block, row and weight row unpacking nibbles and scaling; at hundreds of
 * rows that is ~2x slower than a float32 GEMM. Here the codes are stored one per byte, in
 * tiles of GEMM_NR = 8 output rows, so that one vpmaddubsw multiplies 8 weight rows by 4
 * activations of one row (broadcast): step s of block g holds, for each of the tile's rows n,
 * the 4 codes q[n, 32g + 4s .. 4s + 3] (32 bytes). Its 16 int16 lanes are pair sums of rows
 * n = lane / 2; eight steps (the block's 32 inputs) add up in int16 without saturating
 * (8 * 2 * 15 * 127 = 30480 < 32767), and one vpmaddwd by ones then gives the 8 rows' int32
 * block dots. So a block costs 9 integer multiplies per 8 weight rows and activation row, and
 * each weight register is reused for GEMM_MR = 4 activation rows.
 *
 * Layout (pack_q4_1_prefill in w4a8.py): codes [T, G, 8 steps, 8 rows, 4] uint8 with
 * T = ceil(N / 8), G = K / 32; scales d and minimums m [T, G, 8] float32. Rows past N are
 * zeros and are not written. */
#define GEMM_NR 8   /* output rows per tile */
#define GEMM_MR 4   /* activation rows per micro-kernel call */
#define GEMM_MC 128 /* activation rows per chunk (their int8 copy stays in L2) */

int w4a8_gemm_tile_rows(void) { return GEMM_NR; }

/* One row's blocks of x quantized as in w4a8_quantize_x (the same values, bit for bit). */
static void quantize_row(const float *x, int64_t G, int8_t *a, float *e, float *s) {
#ifdef W4A8_AVX2
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t g = 0; g < G; g++) {
        const float *xb = x + g * QK;
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
        }
        const float amax = hmax(mx);
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m256i q[4]; /* round half to even: the default MXCSR mode, as nearbyintf */
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
        const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                               _mm256_add_epi32(q[2], q[3]));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum32),
                                  _mm256_extracti128_si256(sum32, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
        const int sum = _mm_cvtsi128_si32(t);
        /* int32 -> int8 (|q| <= 127: no saturation); packs interleave the 128-bit lanes */
        const __m256i p16 = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
        const __m256i p8 = _mm256_packs_epi16(p16, p16b);
        _mm256_storeu_si256((__m256i *)(a + g * QK),
                            _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        e[g] = amax / 127.f;
        s[g] = e[g] * (float)sum;
    }
#else
    w4a8_quantize_x(x, 1, G * QK, a, e, s);
#endif
}

#ifdef W4A8_AVX2
/* y rows r0..r0+3 (rows >= nrows are computed from row r0 and not stored), one tile. */
static void gemm_micro(const uint8_t *wt, const float *dt, const float *mt, int64_t G,
                       const int8_t *a, const float *e, const float *s, int64_t K, int nrows,
                       float *y, int64_t N, int64_t n0, int64_t nr) {
    const int8_t *ar[GEMM_MR];
    const float *er[GEMM_MR], *sr[GEMM_MR];
    for (int r = 0; r < GEMM_MR; r++) {
        const int64_t rr = r < nrows ? r : 0;
        ar[r] = a + rr * K;
        er[r] = e + rr * G;
        sr[r] = s + rr * G;
    }
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int64_t g = 0; g < G; g++) {
        const __m256i *wg = (const __m256i *)(wt + g * 256);
        __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
        for (int st = 0; st < 8; st++) {
            const __m256i w = _mm256_loadu_si256(wg + st);
            int32_t b0, b1, b2, b3;
            memcpy(&b0, ar[0] + g * QK + 4 * st, 4);
            memcpy(&b1, ar[1] + g * QK + 4 * st, 4);
            memcpy(&b2, ar[2] + g * QK + 4 * st, 4);
            memcpy(&b3, ar[3] + g * QK + 4 * st, 4);
            c0 = _mm256_add_epi16(c0, _mm256_maddubs_epi16(w, _mm256_set1_epi32(b0)));
            c1 = _mm256_add_epi16(c1, _mm256_maddubs_epi16(w, _mm256_set1_epi32(b1)));
            c2 = _mm256_add_epi16(c2, _mm256_maddubs_epi16(w, _mm256_set1_epi32(b2)));
            c3 = _mm256_add_epi16(c3, _mm256_maddubs_epi16(w, _mm256_set1_epi32(b3)));
        }
        const __m256 dv = _mm256_loadu_ps(dt + g * GEMM_NR), mv = _mm256_loadu_ps(mt + g * GEMM_NR);
#define W4A8_ROW(c, f, r)                                                                     \
    f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(c, ones)),                       \
                        _mm256_mul_ps(dv, _mm256_set1_ps(er[r][g])), f);                       \
    f = _mm256_fmadd_ps(mv, _mm256_set1_ps(sr[r][g]), f);
        W4A8_ROW(c0, f0, 0)
        W4A8_ROW(c1, f1, 1)
        W4A8_ROW(c2, f2, 2)
        W4A8_ROW(c3, f3, 3)
#undef W4A8_ROW
    }
    const __m256 f[GEMM_MR] = {f0, f1, f2, f3};
    for (int r = 0; r < nrows; r++) {
        if (nr == GEMM_NR) {
            _mm256_storeu_ps(y + r * N + n0, f[r]);
        } else {
            float out[GEMM_NR];
            _mm256_storeu_ps(out, f[r]);
            for (int64_t j = 0; j < nr; j++) y[r * N + n0 + j] = out[j];
        }
    }
}

#else
static void gemm_micro(const uint8_t *wt, const float *dt, const float *mt, int64_t G,
                       const int8_t *a, const float *e, const float *s, int64_t K, int nrows,
                       float *y, int64_t N, int64_t n0, int64_t nr) {
    for (int r = 0; r < nrows; r++) {
        for (int64_t j = 0; j < nr; j++) {
            float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *wg = wt + g * 256;
                const int8_t *ag = a + r * K + g * QK;
                int dot = 0;
                for (int st = 0; st < 8; st++)
                    for (int i = 0; i < 4; i++) dot += wg[st * 32 + j * 4 + i] * ag[4 * st + i];
                acc = fmaf((float)dot, dt[g * GEMM_NR + j] * e[r * G + g], acc);
                acc = fmaf(mt[g * GEMM_NR + j], s[r * G + g], acc);
            }
            y[r * N + n0 + j] = acc;
        }
    }
}
#endif

/* y [M, N] float32 = x [M, K] float32 times the weight in the prefill layout (above), x
 * quantized per row and block of 32 exactly as w4a8_mm does. codes: [ceil(N / 8), K / 32 * 256]
 * bytes; scales, mins: [ceil(N / 8), K / 32, 8] float32. Returns 0; -2 (nothing done) when the
 * shapes do not fit; -1 when the scratch allocation fails (y untouched). */
int w4a8_gemm(const float *x, int64_t M, int64_t K, const uint8_t *codes, int64_t c_rows,
              int64_t c_cols, const float *scales, const float *mins, int64_t N, float *y,
              int nthreads) {
    if (M < 0 || K <= 0 || N <= 0 || K % QK || c_rows != (N + GEMM_NR - 1) / GEMM_NR
        || c_cols != K / QK * 256)
        return -2;
    const int64_t G = K / QK, tiles = c_rows;
    int8_t *a = (int8_t *)malloc((size_t)(M * K) + 2 * (size_t)(M * G) * sizeof(float) + 16);
    if (!a) return -1;
    float *e = (float *)(a + ((M * K + 15) & ~(int64_t)15));
    float *s = e + M * G;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, G, a + m * K, e + m * G, s + m * G);
        /* chunks of GEMM_MC rows; static: a thread keeps the same tiles in every chunk */
        for (int64_t m0 = 0; m0 < M; m0 += GEMM_MC) {
            const int64_t m1 = m0 + GEMM_MC < M ? m0 + GEMM_MC : M;
#pragma omp for schedule(static) nowait
            for (int64_t t = 0; t < tiles; t++) {
                const int64_t n0 = t * GEMM_NR, nr = N - n0 < GEMM_NR ? N - n0 : GEMM_NR;
                for (int64_t m = m0; m < m1; m += GEMM_MR) {
                    const int nrows = m1 - m < GEMM_MR ? (int)(m1 - m) : GEMM_MR;
                    gemm_micro(codes + t * c_cols, scales + t * G * GEMM_NR,
                               mins + t * G * GEMM_NR, G, a + m * K, e + m * G, s + m * G, K,
                               nrows, y + m * N, N, n0, nr);
                }
            }
        }
    }
    free(a);
    return 0;
}

/* The rescored LM head (engine/quant.py RescoredInt4Head with a W4A8Linear coarse pass) in
 * one call: logits [M, V] = x [M, K] times the Q4_1 weight (w4a8_mm, or w4a8_gemm on the
 * tile layout when tile_codes is given and M >= gemm_min_rows: the same bits), then in each
 * row the top_k logits recomputed as (w8[v] . bf16(x)) * scale[v] from int8 weights
 * w8 [V, K] and bfloat16 per-row scales (raw bits); rows in parallel. Returns 0, -2 for
 * shapes that do not fit, -1 when memory fails. */
int w4a8_rescored_head(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t w_rows,
                       int64_t w_cols, const uint8_t *tile_codes, const float *tile_scales,
                       const float *tile_mins, int64_t gemm_min_rows, int64_t V,
                       const int8_t *w8, const uint16_t *scales_bf16, int64_t top_k,
                       float *logits, int nthreads) {
    if (top_k < 0 || top_k > V) return -2;
    int rc = tile_codes && gemm_min_rows > 0 && M >= gemm_min_rows
        ? w4a8_gemm(x, M, K, tile_codes, (V + GEMM_NR - 1) / GEMM_NR, K / QK * 256,
                    tile_scales, tile_mins, V, logits, nthreads)
        : w4a8_mm(x, M, K, w, w_rows, w_cols, V, logits, nthreads);
    if (rc || top_k == 0) return rc;
    int failed = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        int64_t *idx = (int64_t *)malloc((size_t)top_k * sizeof(int64_t));
        float *xb = (float *)malloc((size_t)K * sizeof(float));
        if (!idx || !xb) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            if (!idx || !xb) continue;
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
    }
    return failed ? -1 : 0;
}
