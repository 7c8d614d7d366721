/* One step of a Llama-family decoder in one C call (scission.kernels.llama_decode).
 *
 * For every layer, over n query tokens (one per request in a decode step; a request's
 * prefill chunk is several, llama_forward_step), float32 throughout:
 *
 *     x   = rms_norm(h, input_norm)                   (first layer; later: h += mlp, then norm)
 *     qkv = w4a8(x, qkv) (+ bias)                      [n, (H + 2 H_kv) D]
 *     q, k = rope(q), rope(k)                          neox halves, cos/sin rows per token
 *     cache[slot_mapping[i]] = k, v                    paged K/V write
 *     o   = softmax(q K^T * scale) V                   over each request's context (block table),
 *                                                      causal within a prefill chunk
 *     h  += w4a8(o, o_proj);  x = rms_norm(h, post_norm)
 *     mlp = w4a8(silu(gate) * up, down),  [gate, up] = w4a8(x, gate_up)
 *
 * then h += mlp and out = rms_norm(h, final_norm). The linears are w4a8_gemv.c's kernels
 * (included below, so one build holds both): w4a8_mm for few requests, w4a8_gemm from
 * gemm_min_rows requests on (the same products, ~2x faster once several rows share a weight); the small parts are plain C loops with
 * ``omp simd`` reductions. Decode at small batch is bound by the 4-bit weights (~84 MB per
 * step for SmolLM2-135M): running the whole stack below Python removes the ~10 ms of
 * per-op dispatch, graph guards and Python a torch step spends around ~5 ms of kernels at
 * batch 1 (bench/README.md), as llama.cpp's graph executor does.
 *
 * The same arithmetic as the torch model (engine/model.py) with W4A8Linear layers, in
 * another float32 summation order: the reference is kernels/reference.py
 * ``ref_llama_decode_step`` (float64 around the w4a8 reference).
 */
#include "w4a8_gemv.c"

#define LLAMA_DECODE_ABI 2

enum { LIN_QKV, LIN_O_PROJ, LIN_GATE_UP, LIN_DOWN, NUM_LINEARS };

/* The model as the step reads it. Per-layer arrays hold num_layers pointers. */
typedef struct {
    int64_t abi;                        /* LLAMA_DECODE_ABI */
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    float rms_norm_eps, attn_scale;
    const uint8_t *const *qkv;          /* pack_q4_1 of [(H + 2 H_kv) D, hidden] */
    const float *const *qkv_bias;       /* NULL, or per layer [(H + 2 H_kv) D] */
    const uint8_t *const *o_proj;       /* [hidden, H D] */
    const uint8_t *const *gate_up;      /* [2 intermediate, hidden]: gate rows, then up rows */
    const uint8_t *const *down;         /* [hidden, intermediate] */
    const float *const *input_norm;     /* [hidden] */
    const float *const *post_norm;      /* [hidden] */
    const float *final_norm;            /* [hidden] */
    float *const *k_cache;              /* layer's [num_blocks, block_size, H_kv, D] base */
    float *const *v_cache;
    int64_t num_blocks, block_size;
    int64_t block_stride, slot_stride;  /* elements; a slot's [H_kv, D] is contiguous */
    /* The same weights in w4a8_gemm's layout (pack_q4_1_gemm), per linear (LIN_*) and
     * layer: steps of gemm_min_rows requests or more run w4a8_gemm (0: never; then the
     * arrays may be NULL). */
    const uint8_t *const *tile_codes[NUM_LINEARS];
    const float *const *tile_scales[NUM_LINEARS];
    const float *const *tile_mins[NUM_LINEARS];
    int64_t gemm_min_rows;
} llama_decode_weights;

int llama_decode_abi(void) { return LLAMA_DECODE_ABI; }

static void rms_norm_row(const float *x, const float *w, int64_t d, float eps, float *y) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; j++) ss += x[j] * x[j];
    const float r = 1.f / sqrtf(ss / (float)d + eps);
#pragma omp simd
    for (int64_t j = 0; j < d; j++) y[j] = x[j] * r * w[j];
}

/* neox rotary on one head of D: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) */
static void rope_head(float *x, const float *c, const float *s, int64_t half) {
#pragma omp simd
    for (int64_t j = 0; j < half; j++) {
        const float x1 = x[j], x2 = x[j + half];
        x[j] = x1 * c[j] - x2 * s[j];
        x[j + half] = x2 * c[j] + x1 * s[j];
    }
}

static inline const float *slot_row(const float *base, const llama_decode_weights *w,
                                    int64_t block, int64_t off) {
    return base + block * w->block_stride + off * w->slot_stride;
}

#ifdef W4A8_AVX2
/* e^x for x <= 0 (softmax after the max is subtracted): Cephes' expf (range reduction by ln 2
 * in two parts, degree-6 polynomial, scale by 2^n), 8 lanes; within 2 ulp of expf. */
static inline __m256 exp256_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* s[0 .. n) <- exp(s - mx) in place (mx >= every s); returns their float32 sum. Eight lanes
 * at a time with AVX2 (exp256_nonpositive, lane sums then hsum), the rest with expf. */
static float exp_sum_inplace(float *s, int64_t n, float mx) {
    float sum = 0.f;
    int64_t j = 0;
#ifdef W4A8_AVX2
    __m256 vsum = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp256_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j),
                                                          _mm256_set1_ps(mx)));
        _mm256_storeu_ps(s + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = hsum(vsum);
#endif
    for (; j < n; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    return sum;
}

/* One query head of one request against its context of L tokens: o [D]. scores: [L].
 * Two passes (scores and their max, then exp and the weighted sum of V), float32. With AVX2
 * and D % 32 == 0 (64 and 128, the common head sizes): four independent accumulators per
 * dot, exp eight at a time, and V summed into register accumulators. */
static void attend(const llama_decode_weights *w, const float *kb, const float *vb,
                   const int32_t *table, int64_t L, int64_t kvh, const float *q, float *scores,
                   float *o) {
    const int64_t D = w->head_dim, bs = w->block_size, hoff = kvh * D;
    float mx = -INFINITY, sum = 0.f;
#ifdef W4A8_AVX2
    if (D % 32 == 0) {
        for (int64_t p = 0; p < L; p++) {
            const float *k = slot_row(kb, w, table[p / bs], p % bs) + hoff;
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (int64_t j = 0; j < D; j += 32) {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(k + j), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), _mm256_loadu_ps(k + j + 8), s1);
                s2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 16), _mm256_loadu_ps(k + j + 16),
                                     s2);
                s3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 24), _mm256_loadu_ps(k + j + 24),
                                     s3);
            }
            scores[p] = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)))
                        * w->attn_scale;
            mx = scores[p] > mx ? scores[p] : mx;
        }
        sum = exp_sum_inplace(scores, L, mx);
        const __m256 inv = _mm256_set1_ps(1.f / sum);
        for (int64_t j = 0; j < D; j += 32) {  /* 32 columns of o in 4 registers */
            __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
            for (int64_t t = 0; t < L; t++) {
                const float *v = slot_row(vb, w, table[t / bs], t % bs) + hoff + j;
                const __m256 pr = _mm256_broadcast_ss(scores + t);
                o0 = _mm256_fmadd_ps(pr, _mm256_loadu_ps(v), o0);
                o1 = _mm256_fmadd_ps(pr, _mm256_loadu_ps(v + 8), o1);
                o2 = _mm256_fmadd_ps(pr, _mm256_loadu_ps(v + 16), o2);
                o3 = _mm256_fmadd_ps(pr, _mm256_loadu_ps(v + 24), o3);
            }
            _mm256_storeu_ps(o + j, _mm256_mul_ps(o0, inv));
            _mm256_storeu_ps(o + j + 8, _mm256_mul_ps(o1, inv));
            _mm256_storeu_ps(o + j + 16, _mm256_mul_ps(o2, inv));
            _mm256_storeu_ps(o + j + 24, _mm256_mul_ps(o3, inv));
        }
        return;
    }
#endif
    for (int64_t p = 0; p < L; p++) {
        const float *k = slot_row(kb, w, table[p / bs], p % bs) + hoff;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < D; j++) dot += q[j] * k[j];
        scores[p] = dot * w->attn_scale;
        mx = scores[p] > mx ? scores[p] : mx;
    }
    for (int64_t p = 0; p < L; p++) {
        scores[p] = expf(scores[p] - mx);
        sum += scores[p];
    }
    for (int64_t j = 0; j < D; j++) o[j] = 0.f;
    for (int64_t p = 0; p < L; p++) {
        const float *v = slot_row(vb, w, table[p / bs], p % bs) + hoff;
        const float pr = scores[p];
#pragma omp simd
        for (int64_t j = 0; j < D; j++) o[j] += pr * v[j];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t j = 0; j < D; j++) o[j] *= inv;
}

/* Linear `which` of layer l: w4a8_gemm from gemm_min_rows rows on (as engine/quant.py's
 * W4A8Linear switches at its max_packed_rows), w4a8_mm below. */
static int linear(const llama_decode_weights *w, int which, int64_t l, const float *x,
                  int64_t M, int64_t K, int64_t N, float *y, int nthreads) {
    if (w->gemm_min_rows > 0 && M >= w->gemm_min_rows)
        return w4a8_gemm(x, M, K, w->tile_codes[which][l], (N + GEMM_NR - 1) / GEMM_NR,
                         K / QK * 256, w->tile_scales[which][l], w->tile_mins[which][l], N, y,
                         nthreads);
    const uint8_t *const *packed[NUM_LINEARS] = {w->qkv, w->o_proj, w->gate_up, w->down};
    return w4a8_mm(x, M, K, packed[which][l], (N + NR - 1) / NR,
                   K / QK * (int64_t)sizeof(tile_q4_1), N, y, nthreads);
}

static int prefill_attention_run(const float *q, int64_t q_len, int64_t q_row_stride,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t D,
                                 const float *k_cache, const float *v_cache, int64_t block_size,
                                 int64_t block_stride, int64_t slot_stride,
                                 const int32_t *block_table, int64_t kv_len, float scale,
                                 float *out, int nthreads);

/* silu(g) * u over n floats: sigmoid from e = exp(-|g|) <= 1 (1 / (1 + e) for g >= 0,
 * e / (1 + e) below), eight lanes at a time with AVX2, expf for the rest. */
static void silu_mul(const float *g, const float *u, int64_t n, float *a) {
    int64_t j = 0;
#ifdef W4A8_AVX2
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
    for (; j + 8 <= n; j += 8) {
        const __m256 x = _mm256_loadu_ps(g + j);
        const __m256 e = exp256_nonpositive(_mm256_or_ps(x, sign)); /* exp(-|x|) */
        const __m256 num = _mm256_blendv_ps(one, e, x);              /* x < 0: e */
        const __m256 sg = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(a + j, _mm256_mul_ps(_mm256_mul_ps(x, sg), _mm256_loadu_ps(u + j)));
    }
#endif
    for (; j < n; j++) a[j] = g[j] / (1.f + expf(-g[j])) * u[j];
}

/* One forward step of a batch of requests, each a chunk of query tokens: decode tokens
 * (1 each) and prefill chunks in one call, n tokens in all.
 *
 *   h           [n, hidden] float32: the tokens' input embeddings (read only)
 *   cos, sin    [n, D / 2] float32: rotary rows of each token's position
 *   cu_seqlens_q [num_reqs + 1] int32: request r's tokens are rows cu[r] .. cu[r + 1] - 1,
 *               the last cu[r + 1] - cu[r] positions of its context; NULL: num_reqs == n,
 *               one token each (a decode step)
 *   block_table [num_reqs, table_cols] int32, rows table_stride apart; seq_lens [num_reqs]
 *               int32 (context incl. this step's tokens)
 *   slot_mapping [n] int64: where each token's K/V go (block * block_size + offset; -1:
 *               not written)
 *   out         [n, hidden] float32: the final-normed hidden states (for the LM head)
 *
 * Every token row takes the same row-wise operations whatever else is in the batch: norms,
 * rotary and activations per row, linears that give a row the same bits from either kernel
 * (w4a8_mm / w4a8_gemm), decode attention (attend) for a request with one query token and
 * the prefill attention for a longer chunk. So a decode token's hidden state does not depend
 * on whether prefill chunks share its step.
 *
 * Returns 0; -2 (nothing written) for an argument out of range (ABI, shapes, query lengths,
 * a slot or block id past the cache, a context longer than the block table); -1 when scratch
 * memory fails (the cache may hold part of this step's K/V: the caller fails the step's
 * requests). */
int llama_forward_step(const llama_decode_weights *w, int64_t n, int64_t num_reqs,
                       const int32_t *cu_seqlens_q, const float *h, const float *cos,
                       const float *sin, const int32_t *block_table, int64_t table_cols,
                       int64_t table_stride, const int32_t *seq_lens,
                       const int64_t *slot_mapping, float *out, int nthreads) {
    if (!w || w->abi != LLAMA_DECODE_ABI || n <= 0 || num_reqs <= 0 || table_cols > table_stride
        || (!cu_seqlens_q && num_reqs != n) || w->hidden % QK || w->head_dim % 2
        || w->num_kv_heads <= 0 || w->num_heads % w->num_kv_heads || w->intermediate % QK
        || (w->num_heads * w->head_dim) % QK)
        return -2;
    if (w->gemm_min_rows > 0 && n >= w->gemm_min_rows)
        for (int j = 0; j < NUM_LINEARS; j++)
            if (!w->tile_codes[j] || !w->tile_scales[j] || !w->tile_mins[j]) return -2;
    const int64_t Hd = w->hidden, D = w->head_dim, nh = w->num_heads, nkv = w->num_kv_heads;
    const int64_t I = w->intermediate, qs = nh * D, kvs = nkv * D, qkv_n = qs + 2 * kvs;
    const int64_t bs = w->block_size, cap = w->num_blocks * bs;
#define ROW0(r) (cu_seqlens_q ? (int64_t)cu_seqlens_q[r] : (int64_t)(r))
    if (cu_seqlens_q && (cu_seqlens_q[0] != 0 || cu_seqlens_q[num_reqs] != n)) return -2;
    int64_t max_len = 1, num_decode = 0;
    for (int64_t r = 0; r < num_reqs; r++) {
        const int64_t L = seq_lens[r], q_len = ROW0(r + 1) - ROW0(r);
        if (q_len < 1 || L < q_len || (L + bs - 1) / bs > table_cols) return -2;
        for (int64_t b = 0; b < (L + bs - 1) / bs; b++) {
            const int32_t id = block_table[r * table_stride + b];
            if (id < 0 || id >= w->num_blocks) return -2;
        }
        max_len = L > max_len ? L : max_len;
        num_decode += q_len == 1;
    }
    for (int64_t i = 0; i < n; i++)
        if (slot_mapping[i] < -1 || slot_mapping[i] >= cap) return -2;
    const size_t floats = (size_t)(n * (Hd + Hd + qkv_n + qs + 2 * I + I + Hd));
    float *buf = (float *)malloc(floats * sizeof(float));
    int64_t *decode_reqs = (int64_t *)malloc((size_t)(num_decode + 1) * sizeof(int64_t));
    if (!buf || !decode_reqs) { free(buf); free(decode_reqs); return -1; }
    for (int64_t r = 0, k = 0; r < num_reqs; r++)
        if (ROW0(r + 1) - ROW0(r) == 1) decode_reqs[k++] = r;
    float *res = buf, *x = res + n * Hd, *qkv = x + n * Hd, *att = qkv + n * qkv_n;
    float *gu = att + n * qs, *act = gu + n * 2 * I, *mlp = act + n * I;
    const int64_t gqa = nh / nkv, half = D / 2;
    const int nt = nthreads > 0 ? nthreads : 1;
    int rc = 0;
    memcpy(res, h, (size_t)(n * Hd) * sizeof(float));
#pragma omp parallel for num_threads(nt) if (n >= 64)
    for (int64_t i = 0; i < n; i++) rms_norm_row(res + i * Hd, w->input_norm[0], Hd,
                                                 w->rms_norm_eps, x + i * Hd);
    for (int64_t l = 0; l < w->num_layers && !rc; l++) {
        if (l > 0) {
#pragma omp parallel for num_threads(nt) if (n >= 64)
            for (int64_t i = 0; i < n; i++) {
                for (int64_t j = 0; j < Hd; j++) res[i * Hd + j] += mlp[i * Hd + j];
                rms_norm_row(res + i * Hd, w->input_norm[l], Hd, w->rms_norm_eps, x + i * Hd);
            }
        }
        if ((rc = linear(w, LIN_QKV, l, x, n, Hd, qkv_n, qkv, nthreads))) break;
        float *kc = w->k_cache[l], *vc = w->v_cache[l];
#pragma omp parallel for num_threads(nt) if (n >= 64)
        for (int64_t i = 0; i < n; i++) {
            float *r = qkv + i * qkv_n;
            if (w->qkv_bias && w->qkv_bias[l])
                for (int64_t j = 0; j < qkv_n; j++) r[j] += w->qkv_bias[l][j];
            for (int64_t hh = 0; hh < nh + nkv; hh++)  /* q heads then k heads */
                rope_head(r + hh * D, cos + i * half, sin + i * half, half);
            const int64_t slot = slot_mapping[i];
            if (slot < 0) continue;
            memcpy((float *)slot_row(kc, w, slot / bs, slot % bs), r + qs,
                   (size_t)kvs * sizeof(float));
            memcpy((float *)slot_row(vc, w, slot / bs, slot % bs), r + qs + kvs,
                   (size_t)kvs * sizeof(float));
        }
        int failed = 0;
        if (num_decode) {
#pragma omp parallel num_threads(nt)
            {
                float *scores = (float *)malloc((size_t)max_len * sizeof(float));
                if (!scores) {
#pragma omp atomic write
                    failed = 1;
                }
#pragma omp for schedule(static)
                for (int64_t t = 0; t < num_decode * nh; t++) {
                    if (!scores) continue;
                    const int64_t r = decode_reqs[t / nh], hh = t % nh, i = ROW0(r);
                    attend(w, kc, vc, block_table + r * table_stride, seq_lens[r], hh / gqa,
                           qkv + i * qkv_n + hh * D, scores, att + i * qs + hh * D);
                }
                free(scores);
            }
        }
        for (int64_t r = 0; r < num_reqs && !failed; r++) { /* query chunks */
            const int64_t i = ROW0(r), q_len = ROW0(r + 1) - i;
            if (q_len > 1 && prefill_attention_run(qkv + i * qkv_n, q_len, qkv_n, nh, nkv, D, kc,
                                                   vc, bs, w->block_stride, w->slot_stride,
                                                   block_table + r * table_stride, seq_lens[r],
                                                   w->attn_scale, att + i * qs, nthreads))
                failed = 1;
        }
        if (failed) { rc = -1; break; }
        if ((rc = linear(w, LIN_O_PROJ, l, att, n, qs, Hd, x, nthreads))) break;
#pragma omp parallel for num_threads(nt) if (n >= 64)
        for (int64_t i = 0; i < n; i++) {
            for (int64_t j = 0; j < Hd; j++) res[i * Hd + j] += x[i * Hd + j];
            rms_norm_row(res + i * Hd, w->post_norm[l], Hd, w->rms_norm_eps, x + i * Hd);
        }
        if ((rc = linear(w, LIN_GATE_UP, l, x, n, Hd, 2 * I, gu, nthreads))) break;
#pragma omp parallel for num_threads(nt) if (n >= 64)
        for (int64_t i = 0; i < n; i++) silu_mul(gu + i * 2 * I, gu + i * 2 * I + I, I, act + i * I);
        if ((rc = linear(w, LIN_DOWN, l, act, n, I, Hd, mlp, nthreads))) break;
    }
    if (!rc) {
#pragma omp parallel for num_threads(nt) if (n >= 64)
        for (int64_t i = 0; i < n; i++) {
            for (int64_t j = 0; j < Hd; j++) res[i * Hd + j] += mlp[i * Hd + j];
            rms_norm_row(res + i * Hd, w->final_norm, Hd, w->rms_norm_eps, out + i * Hd);
        }
    }
#undef ROW0
    free(buf);
    free(decode_reqs);
    return rc;
}

/* ---- Prefill attention over the paged cache (llama_prefill_attention) ----
 *
 * Causal attention of a chunk of q_len query tokens at the end of a context of kv_len tokens
 * (query i at position kv_len - q_len + i sees keys 0 .. that position), GQA, float32, read
 * from the paged cache through the request's block table. The chunk's own K/V must already
 * be in the cache. Per layer the context's K is copied once per KV head into blocks of 8 keys
 * transposed ([D][8]) and V into 8-column panels ([D / 8][keys][8]), both streamed
 * contiguously below. Work items are (T adjacent query tokens, KV head), T = PF_ROWS / G
 * (G = num_heads / num_kv_heads; 2 for SmolLM2's 9 / 3 heads): the item's T x G query rows
 * are taken PF_ROWS at a time, so every K and V vector loaded feeds up to six rows' FMAs
 * (register blocking over queries as well as keys, as a GEMM micro-kernel does; GQA's heads
 * share their KV head's loads). FlashAttention's tiling (Dao et al., 2022, Algorithm 1)
 * loads each K/V tile once for a block of queries the same way. Per block of rows: the
 * scores (8 keys per FMA), each row's max and exp-and-sum (eight lanes at a time), then the
 * weighted sum of V over the rows' keys (a row's keys past its own end weigh 0). On a
 * 512-token prompt with SmolLM2's heads (D 64), 2 threads of a Zen 2 EPYC: ~2.2 ms a layer
 * against SDPA's CPU flash kernel's 5.4-6.0 (one K/V load per row, as before: 4.4-5.0).
 *
 *   q     [q_len, num_heads, D], q_row_stride floats between tokens (head rows contiguous)
 *   k_cache, v_cache: bases of [num_blocks, block_size, H_kv, D] with the given strides
 *   block_table [ceil(kv_len / block_size)] int32
 *   out   [q_len, num_heads, D] contiguous
 *
 * Returns 0; -2 (nothing written) for shapes or block ids out of range; -1 when scratch
 * memory fails. */
#define PF_ROWS 6 /* query rows sharing each K/V load (2 tokens x 3 heads for SmolLM2) */

#ifdef W4A8_AVX2
/* Scores of R query rows against nb blocks of 8 transposed keys: sc[r * ld + key] =
 * scale * q_r . k_key. R constant after inlining; U key blocks a step keep R x U
 * accumulators, U key vectors and one broadcast in the 16 registers. */
static inline __attribute__((always_inline)) void pf_scores(const float *const *qr, const int R,
                                                            const float *kh, int64_t nb,
                                                            int64_t D, float scale, float *sc,
                                                            int64_t ld) {
    const __m256 vscale = _mm256_set1_ps(scale);
    const int U = R <= 2 ? 4 : R <= 4 ? 3 : 2;
    int64_t b = 0;
    for (; b + U <= nb; b += U) {
        __m256 acc[PF_ROWS][4];
        for (int r = 0; r < R; r++)
            for (int u = 0; u < U; u++) acc[r][u] = _mm256_setzero_ps();
        const float *k0 = kh + b * 8 * D;
        for (int64_t d = 0; d < D; d++) {
            __m256 kv[4];
            for (int u = 0; u < U; u++) kv[u] = _mm256_loadu_ps(k0 + u * 8 * D + d * 8);
            for (int r = 0; r < R; r++) {
                const __m256 qd = _mm256_broadcast_ss(qr[r] + d);
                for (int u = 0; u < U; u++) acc[r][u] = _mm256_fmadd_ps(qd, kv[u], acc[r][u]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int u = 0; u < U; u++)
                _mm256_storeu_ps(sc + r * ld + (b + u) * 8, _mm256_mul_ps(acc[r][u], vscale));
    }
    for (; b < nb; b++) {
        __m256 acc[PF_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        const float *k0 = kh + b * 8 * D;
        for (int64_t d = 0; d < D; d++) {
            const __m256 kv = _mm256_loadu_ps(k0 + d * 8);
            for (int r = 0; r < R; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(qr[r] + d), kv, acc[r]);
        }
        for (int r = 0; r < R; r++)
            _mm256_storeu_ps(sc + r * ld + b * 8, _mm256_mul_ps(acc[r], vscale));
    }
}

/* o_r = inv_r * sum_k p[r][k] v_k over keys 0 .. n for R rows, C vectors of 8 columns of V
 * a pass (R x C accumulators); D % (8 C) == 0. */
static inline __attribute__((always_inline)) void pf_values(const float *p, int64_t ld,
                                                            const int R, const float *vh,
                                                            int64_t n, int64_t D,
                                                            const float *inv, float *const *o) {
    const int C = R <= 2 ? 4 : 2;
    const int64_t n8 = ld * 8; /* floats between V's 8-column panels */
    for (int64_t j = 0; j < D; j += 8 * C) {
        __m256 acc[PF_ROWS][4];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
        for (int64_t k = 0; k < n; k++) {
            __m256 vv[4];
            for (int c = 0; c < C; c++) {
                vv[c] = _mm256_loadu_ps(vh + ((j >> 3) + c) * n8 + k * 8);
                /* keep V in a register: one load feeds R FMAs (GCC otherwise folds the
                 * load into each FMA, R loads of it and ~30 % slower) */
                __asm__("" : "+x"(vv[c]));
            }
            for (int r = 0; r < R; r++) {
                const __m256 pr = _mm256_broadcast_ss(p + r * ld + k);
                for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(pr, vv[c], acc[r][c]);
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256 s = _mm256_set1_ps(inv[r]);
            for (int c = 0; c < C; c++)
                _mm256_storeu_ps(o[r] + j + 8 * c, _mm256_mul_ps(acc[r][c], s));
        }
    }
}
#endif

/* max of s[0 .. n), n >= 1: eight lanes at a time with AVX2. */
static float max_of(const float *s, int64_t n) {
    float mx = -INFINITY;
    int64_t j = 0;
#ifdef W4A8_AVX2
    if (n >= 8) {
        __m256 v = _mm256_loadu_ps(s);
        for (j = 8; j + 8 <= n; j += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(s + j));
        mx = hmax(v);
    }
#endif
    for (; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    return mx;
}

/* Rows of one work item (R <= PF_ROWS): query pointers qr, key counts nr (each row sees keys
 * 0 .. nr[r]), outputs o; kh the KV head's transposed K blocks, vh its V rows; sc scratch of
 * PF_ROWS rows of ld >= 8 * ceil(max nr / 8) floats. */
static void pf_rows(const float *const *qr, const int64_t *nr, float *const *o, const int R,
                    const float *kh, const float *vh, int64_t D, float scale, float *sc,
                    int64_t ld) {
    int64_t n = 0;
    for (int r = 0; r < R; r++) n = nr[r] > n ? nr[r] : n;
    const int64_t nb = (n + 7) / 8;
#ifdef W4A8_AVX2
    const int avx = D % 32 == 0;
    if (avx) switch (R) { /* a constant R per inlined copy: the loops unroll into registers */
        case 1: pf_scores(qr, 1, kh, nb, D, scale, sc, ld); break;
        case 2: pf_scores(qr, 2, kh, nb, D, scale, sc, ld); break;
        case 3: pf_scores(qr, 3, kh, nb, D, scale, sc, ld); break;
        case 4: pf_scores(qr, 4, kh, nb, D, scale, sc, ld); break;
        case 5: pf_scores(qr, 5, kh, nb, D, scale, sc, ld); break;
        default: pf_scores(qr, 6, kh, nb, D, scale, sc, ld); break;
    } else
#endif
    for (int r = 0; r < R; r++)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t jj = 0; jj < 8; jj++) {
                float a = 0.f;
                for (int64_t d = 0; d < D; d++) a += qr[r][d] * kh[b * 8 * D + d * 8 + jj];
                sc[r * ld + b * 8 + jj] = a * scale;
            }
    float inv[PF_ROWS];
    for (int r = 0; r < R; r++) {
        float *s = sc + r * ld;
        const float mx = max_of(s, nr[r]);
        inv[r] = 1.f / exp_sum_inplace(s, nr[r], mx);
        for (int64_t j = nr[r]; j < n; j++) s[j] = 0.f; /* keys past the row's own end */
    }
#ifdef W4A8_AVX2
    if (avx) {
        switch (R) {
        case 1: pf_values(sc, ld, 1, vh, n, D, inv, o); break;
        case 2: pf_values(sc, ld, 2, vh, n, D, inv, o); break;
        case 3: pf_values(sc, ld, 3, vh, n, D, inv, o); break;
        case 4: pf_values(sc, ld, 4, vh, n, D, inv, o); break;
        case 5: pf_values(sc, ld, 5, vh, n, D, inv, o); break;
        default: pf_values(sc, ld, 6, vh, n, D, inv, o); break;
        }
        return;
    }
#endif
    for (int r = 0; r < R; r++) {
        float *orow = o[r];
        const float *p = sc + r * ld;
        for (int64_t d = 0; d < D; d++) orow[d] = 0.f;
        for (int64_t k = 0; k < n; k++)
            for (int64_t d = 0; d < D; d++) orow[d] += p[k] * vh[(d >> 3) * ld * 8 + k * 8 + (d & 7)];
        for (int64_t d = 0; d < D; d++) orow[d] *= inv[r];
    }
}

int llama_prefill_attention(const float *q, int64_t q_len, int64_t q_row_stride,
                            int64_t num_heads, int64_t num_kv_heads, int64_t D,
                            const float *k_cache, const float *v_cache, int64_t num_blocks,
                            int64_t block_size, int64_t block_stride, int64_t slot_stride,
                            const int32_t *block_table, int64_t kv_len, float scale,
                            float *out, int nthreads) {
    if (q_len <= 0 || kv_len < q_len || num_kv_heads <= 0 || num_heads % num_kv_heads
        || D <= 0 || D % 8 || q_row_stride < num_heads * D || block_size <= 0)
        return -2;
    const int64_t nblk = (kv_len + block_size - 1) / block_size;
    for (int64_t b = 0; b < nblk; b++)
        if (block_table[b] < 0 || block_table[b] >= num_blocks) return -2;
    return prefill_attention_run(q, q_len, q_row_stride, num_heads, num_kv_heads, D, k_cache,
                                 v_cache, block_size, block_stride, slot_stride, block_table,
                                 kv_len, scale, out, nthreads);
}

/* llama_prefill_attention after its checks (llama_forward_step's query chunks call it). */
static int prefill_attention_run(const float *q, int64_t q_len, int64_t q_row_stride,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t D,
                                 const float *k_cache, const float *v_cache, int64_t block_size,
                                 int64_t block_stride, int64_t slot_stride,
                                 const int32_t *block_table, int64_t kv_len, float scale,
                                 float *out, int nthreads) {
    const int64_t G = num_heads / num_kv_heads, L8 = (kv_len + 7) / 8, nt = nthreads > 0 ? nthreads : 1;
    float *kt = (float *)malloc((size_t)(num_kv_heads * L8 * 8 * D) * sizeof(float));
    float *vs = (float *)malloc((size_t)(num_kv_heads * L8 * 8 * D) * sizeof(float));
    float *scratch = (float *)malloc((size_t)(nt * PF_ROWS * L8 * 8) * sizeof(float));
    if (!kt || !vs || !scratch) { free(kt); free(vs); free(scratch); return -1; }
    /* adjacent query tokens per work item: enough for PF_ROWS rows (2 for G = 3) */
    const int64_t T = G >= PF_ROWS ? 1 : PF_ROWS / G, nitems = (q_len + T - 1) / T;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t j8 = 0; j8 < L8; j8++) { /* gather: K transposed per 8 keys, V rows */
            for (int64_t hk = 0; hk < num_kv_heads; hk++) {
                float *dst = kt + (hk * L8 + j8) * 8 * D;
                for (int64_t jj = 0; jj < 8; jj++) {
                    const int64_t j = j8 * 8 + jj;
                    if (j >= kv_len) {
                        for (int64_t d = 0; d < D; d++) dst[d * 8 + jj] = 0.f;
                        continue;
                    }
                    const int64_t blk = block_table[j / block_size], off = j % block_size;
                    const float *kr = k_cache + blk * block_stride + off * slot_stride + hk * D;
                    const float *vr = v_cache + blk * block_stride + off * slot_stride + hk * D;
                    for (int64_t d = 0; d < D; d++) dst[d * 8 + jj] = kr[d];
                    float *vd = vs + hk * L8 * 8 * D + j * 8;
                    for (int64_t d8 = 0; d8 < D; d8 += 8) /* V in 8-column panels */
                        memcpy(vd + d8 * L8 * 8, vr + d8, 8 * sizeof(float));
                }
            }
        }
        float *sc = scratch + (int64_t)omp_get_thread_num() * PF_ROWS * L8 * 8;
        /* later queries see more keys: hand items out dynamically, last queries first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < nitems * num_kv_heads; it++) {
            const int64_t i1 = q_len - 1 - T * (it / num_kv_heads), hk = it % num_kv_heads;
            const int64_t ntok = i1 + 1 < T ? i1 + 1 : T;
            const float *qr[PF_ROWS];
            int64_t nr[PF_ROWS];
            float *o[PF_ROWS];
            int R = 0;
            for (int64_t t = 0; t < ntok; t++)
                for (int64_t g = 0; g < G; g++) {
                    const int64_t i = i1 - t, h = hk * G + g;
                    qr[R] = q + i * q_row_stride + h * D;
                    nr[R] = kv_len - q_len + i + 1;
                    o[R] = out + (i * num_heads + h) * D;
                    if (++R == PF_ROWS || (t == ntok - 1 && g == G - 1)) {
                        pf_rows(qr, nr, o, R, kt + hk * L8 * 8 * D, vs + hk * L8 * 8 * D, D,
                                scale, sc, L8 * 8);
                        R = 0;
                    }
                }
        }
    }
    free(kt);
    free(vs);
    free(scratch);
    return 0;
}
