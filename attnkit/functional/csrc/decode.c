/* attnkit native decode kernel: attention of a few queries over a long KV cache, at the speed of reading it.
 *
 * Two streaming passes (see attnkit/functional/decode.py for the algorithm and the pure-PyTorch path beside it):
 *   attnkit_decode_scores:  scores[bh, r, s] = dot(K[b, h, s, :], q[bh, r, :])     (reads K once)
 *   attnkit_decode_pv:      part[bh, c, r, :] = sum_{s in chunk c} p[bh, r, s] * V[b, h, s, :]   (reads V once)
 * The softmax between them (H * L * S numbers) and the sum of the partial outputs run in PyTorch.
 *
 * K and V may be float32, bfloat16 or float16 views of a larger cache buffer: any strides for batch, head and key,
 * unit stride along the feature dimension. Half-precision rows are widened to float32 one row at a time in
 * registers/L1, so main memory is read once, in half precision. Accumulation is float32.
 * Threads: OpenMP, sharing PyTorch's libgomp (same soname), with the thread count PyTorch uses.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "attnkit.h"

#define ATTNKIT_MAX_DIM 512

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline void widen_row(const void *src, int dt, int64_t n, float *dst) {
    if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits = ((uint32_t)s[i]) << 16;
            float f;
            memcpy(&f, &bits, sizeof f);
            dst[i] = f;
        }
    } else {
#if defined(__FLT16_MAX__)
        const _Float16 *s = (const _Float16 *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i];
#endif
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

int attnkit_has_f16(void) {
#if defined(__FLT16_MAX__)
    return 1;
#else
    return 0;
#endif
}

/* q: (B*Hk, R, E) float32 contiguous (already scaled); out: (B*Hk, R, S) float32 contiguous. Strides in elements. */
static void scores_generic(const void *k, int dt, int64_t B, int64_t Hk, int64_t S, int64_t E, int64_t sb,
                           int64_t sh, int64_t ss, const float *q, int64_t R, float *out, int64_t block,
                           int nthreads) {
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    const int64_t nblk = (S + block - 1) / block;
    const int64_t units = B * Hk * nblk;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t bh = u / nblk, blk = u % nblk, b = bh / Hk, h = bh % Hk;
        const int64_t s0 = blk * block, s1 = s0 + block < S ? s0 + block : S;
        const float *qq = q + bh * R * E;
        float *o = out + bh * R * S;
        const char *base = (const char *)k + (b * sb + h * sh) * esize;
        float row[ATTNKIT_MAX_DIM];
        for (int64_t s = s0; s < s1; s++) {
            const char *src = base + s * ss * esize;
            const float *kr;
            if (dt == DT_F32) {
                kr = (const float *)src;
            } else {
                widen_row(src, dt, E, row);
                kr = row;
            }
            for (int64_t r = 0; r < R; r++) o[r * S + s] = dot(kr, qq + r * E, E);
        }
    }
}

/* p: (B*Hk, R, S) float32 contiguous; part: (B*Hk, nchunk, R, Ev) float32 contiguous, written (not accumulated). */
static void pv_generic(const float *p, const void *v, int dt, int64_t B, int64_t Hk, int64_t S, int64_t Ev,
                       int64_t sb, int64_t sh, int64_t ss, int64_t R, float *part, int64_t nchunk, int nthreads) {
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    const int64_t units = B * Hk * nchunk;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t bh = u / nchunk, c = u % nchunk, b = bh / Hk, h = bh % Hk;
        const int64_t s0 = S * c / nchunk, s1 = S * (c + 1) / nchunk;
        const float *pp = p + bh * R * S;
        float *acc = part + u * R * Ev;
        memset(acc, 0, (size_t)(R * Ev) * sizeof(float));
        const char *base = (const char *)v + (b * sb + h * sh) * esize;
        float row[ATTNKIT_MAX_DIM];
        for (int64_t s = s0; s < s1; s++) {
            const char *src = base + s * ss * esize;
            const float *vr;
            if (dt == DT_F32) {
                vr = (const float *)src;
            } else {
                widen_row(src, dt, Ev, row);
                vr = row;
            }
            for (int64_t r = 0; r < R; r++) {
                const float w = pp[r * S + s];
                float *a = acc + r * Ev;
#pragma omp simd
                for (int64_t e = 0; e < Ev; e++) a[e] += w * vr[e];
            }
        }
    }
}

/* One pass (flash-decoding): each work unit (bh, chunk of keys) keeps a running max m, a running sum l and an
 * unnormalised output acc, over sub-blocks of FB keys; the units' partials are merged by the caller with their m and
 * l. K and V are each read once and the only synchronisation is the end of the parallel loop. No mask, no weights. */
#define FB 64
static void fused_generic(const void *k, const void *v, int dt, int64_t B, int64_t Hk, int64_t S, int64_t E,
                          int64_t Ev, int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh, int64_t vs,
                          const float *q, int64_t R, float *acc_out, float *m_out, float *l_out, int64_t nchunk,
                          int nthreads) {
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    const int64_t units = B * Hk * nchunk;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t bh = u / nchunk, c = u % nchunk, b = bh / Hk, h = bh % Hk;
        const int64_t c0 = S * c / nchunk, c1 = S * (c + 1) / nchunk;
        const float *qq = q + bh * R * E;
        float *acc = acc_out + u * R * Ev, *m = m_out + u * R, *l = l_out + u * R;
        const char *kbase = (const char *)k + (b * kb + h * kh) * esize;
        const char *vbase = (const char *)v + (b * vb + h * vh) * esize;
        float krow[ATTNKIT_MAX_DIM], vrow[ATTNKIT_MAX_DIM];
        memset(acc, 0, (size_t)(R * Ev) * sizeof(float));
        for (int64_t r = 0; r < R; r++) m[r] = -INFINITY, l[r] = 0.0f;
        for (int64_t s = c0; s < c1; s++) {
            const float *kr = (const float *)(kbase + s * ks * esize), *vr = (const float *)(vbase + s * vs * esize);
            if (dt != DT_F32) {
                widen_row(kbase + s * ks * esize, dt, E, krow);
                widen_row(vbase + s * vs * esize, dt, Ev, vrow);
                kr = krow, vr = vrow;
            }
            for (int64_t r = 0; r < R; r++) {
                const float sc = dot(kr, qq + r * E, E);
                float *a = acc + r * Ev;
                if (sc > m[r]) {
                    const float alpha = expf(m[r] - sc);
                    for (int64_t e = 0; e < Ev; e++) a[e] *= alpha;
                    l[r] *= alpha;
                    m[r] = sc;
                }
                const float p = expf(sc - m[r]);
                l[r] += p;
#pragma omp simd
                for (int64_t e = 0; e < Ev; e++) a[e] += p * vr[e];
            }
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define ATTNKIT_AVX2 1

/* 8 consecutive elements of a row, widened to float32 (dt is a compile-time constant after inlining) */
static inline __attribute__((always_inline)) __m256 load8(const char *p, int dt) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)p);
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dt == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* the sums of the 8 lanes of a0..a3, as one vector of 4 */
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* scores of four consecutive key rows (k0, k0 + rs, ...) against R query rows: o[r * ostride + 0..3]. Each row is
 * read from memory once; the 4 x R dot products come from L1; one horizontal reduction gives four scores. */
static inline __attribute__((always_inline)) void scores4(const char *k0, int64_t rs, int dt, const float *q,
                                                          int64_t R, int64_t E, float *o, int64_t ostride) {
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    const char *k1 = k0 + rs, *k2 = k1 + rs, *k3 = k2 + rs;
    for (int64_t r = 0; r < R; r++) {
        const float *qr = q + r * E;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < E; j += 8) {
            const __m256 qv = _mm256_loadu_ps(qr + j);
            a0 = _mm256_fmadd_ps(load8(k0 + j * esize, dt), qv, a0);
            a1 = _mm256_fmadd_ps(load8(k1 + j * esize, dt), qv, a1);
            a2 = _mm256_fmadd_ps(load8(k2 + j * esize, dt), qv, a2);
            a3 = _mm256_fmadd_ps(load8(k3 + j * esize, dt), qv, a3);
        }
        _mm_storeu_ps(o + r * ostride, hsum4(a0, a1, a2, a3));
    }
}

/* the score of one key row against R query rows: o[r * ostride] */
static inline __attribute__((always_inline)) void scores1(const char *k0, int dt, const float *q, int64_t R,
                                                          int64_t E, float *o, int64_t ostride) {
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    for (int64_t r = 0; r < R; r++) {
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t j = 0; j < E; j += 8) a0 = _mm256_fmadd_ps(load8(k0 + j * esize, dt), _mm256_loadu_ps(q + r * E + j), a0);
        o[r * ostride] = _mm_cvtss_f32(hsum4(a0, a0, a0, a0));
    }
}

/* acc[0..Ev) += sum_i p[i] * V[i, :] over n value rows (v0, v0 + rs, ...), 64 output features at a time in
 * registers (8 accumulators), then 8 at a time. */
static inline __attribute__((always_inline)) void pv_rows(const float *p, const char *v0, int64_t n, int64_t rs,
                                                          int dt, float *acc, int64_t Ev) {
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    int64_t e0 = 0;
    for (; e0 + 64 <= Ev; e0 += 64) {
        float *a = acc + e0;
        __m256 x0 = _mm256_loadu_ps(a), x1 = _mm256_loadu_ps(a + 8), x2 = _mm256_loadu_ps(a + 16);
        __m256 x3 = _mm256_loadu_ps(a + 24), x4 = _mm256_loadu_ps(a + 32), x5 = _mm256_loadu_ps(a + 40);
        __m256 x6 = _mm256_loadu_ps(a + 48), x7 = _mm256_loadu_ps(a + 56);
        for (int64_t i = 0; i < n; i++) {
            const __m256 w = _mm256_broadcast_ss(p + i);
            const char *vr = v0 + i * rs + e0 * esize;
            x0 = _mm256_fmadd_ps(w, load8(vr, dt), x0);
            x1 = _mm256_fmadd_ps(w, load8(vr + 8 * esize, dt), x1);
            x2 = _mm256_fmadd_ps(w, load8(vr + 16 * esize, dt), x2);
            x3 = _mm256_fmadd_ps(w, load8(vr + 24 * esize, dt), x3);
            x4 = _mm256_fmadd_ps(w, load8(vr + 32 * esize, dt), x4);
            x5 = _mm256_fmadd_ps(w, load8(vr + 40 * esize, dt), x5);
            x6 = _mm256_fmadd_ps(w, load8(vr + 48 * esize, dt), x6);
            x7 = _mm256_fmadd_ps(w, load8(vr + 56 * esize, dt), x7);
        }
        _mm256_storeu_ps(a, x0), _mm256_storeu_ps(a + 8, x1), _mm256_storeu_ps(a + 16, x2);
        _mm256_storeu_ps(a + 24, x3), _mm256_storeu_ps(a + 32, x4), _mm256_storeu_ps(a + 40, x5);
        _mm256_storeu_ps(a + 48, x6), _mm256_storeu_ps(a + 56, x7);
    }
    for (; e0 < Ev; e0 += 8) {
        __m256 x0 = _mm256_loadu_ps(acc + e0);
        for (int64_t i = 0; i < n; i++)
            x0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i), load8(v0 + i * rs + e0 * esize, dt), x0);
        _mm256_storeu_ps(acc + e0, x0);
    }
}

/* scores, four key rows at a time */
static inline __attribute__((always_inline)) void scores_avx2(const char *k, int dt, int64_t B, int64_t Hk,
        int64_t S, int64_t E, int64_t sb, int64_t sh, int64_t ss, const float *q, int64_t R, float *out,
        int64_t block, int nthreads) {
    const int64_t esize = dt == DT_F32 ? 4 : 2, rs = ss * esize;
    const int64_t nblk = (S + block - 1) / block;
    const int64_t units = B * Hk * nblk;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t bh = u / nblk, blk = u % nblk, b = bh / Hk, h = bh % Hk;
        const int64_t s0 = blk * block, s1 = s0 + block < S ? s0 + block : S;
        const float *qq = q + bh * R * E;
        float *o = out + bh * R * S;
        const char *base = k + (b * sb + h * sh) * esize;
        int64_t s = s0;
        for (; s + 4 <= s1; s += 4) scores4(base + s * rs, rs, dt, qq, R, E, o + s, S);
        for (; s < s1; s++) scores1(base + s * rs, dt, qq, R, E, o + s, S);
    }
}

/* p V over chunks of keys; within a chunk, sub-blocks of SUB rows (which stay in L1/L2) are swept once per query
 * row, so grouped queries re-read a sub-block from the CPU cache, not from memory. */
#define SUB 128
static inline __attribute__((always_inline)) void pv_avx2(const float *p, const char *v, int dt, int64_t B,
        int64_t Hk, int64_t S, int64_t Ev, int64_t sb, int64_t sh, int64_t ss, int64_t R, float *part,
        int64_t nchunk, int nthreads) {
    const int64_t esize = dt == DT_F32 ? 4 : 2, rs = ss * esize;
    const int64_t units = B * Hk * nchunk;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t bh = u / nchunk, c = u % nchunk, b = bh / Hk, h = bh % Hk;
        const int64_t c0 = S * c / nchunk, c1 = S * (c + 1) / nchunk;
        const float *pp = p + bh * R * S;
        float *acc = part + u * R * Ev;
        memset(acc, 0, (size_t)(R * Ev) * sizeof(float));
        const char *base = v + (b * sb + h * sh) * esize;
        for (int64_t s0 = c0; s0 < c1; s0 += SUB) {
            const int64_t n = s0 + SUB < c1 ? SUB : c1 - s0;
            for (int64_t r = 0; r < R; r++) pv_rows(pp + r * S + s0, base + s0 * rs, n, rs, dt, acc + r * Ev, Ev);
        }
    }
}

/* exp of 8 floats: Cody-Waite range reduction exp(x) = 2^n exp(r), |r| <= ln2/2, and the degree-5 polynomial of the
 * Cephes library's expf for exp(r) (about 1 ulp); inputs below -87.3 (far below the largest score) give ~0. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

static inline __attribute__((always_inline)) void fused_avx2(const char *k, const char *v, int dt, int64_t B,
        int64_t Hk, int64_t S, int64_t E, int64_t Ev, int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh,
        int64_t vs, const float *q, int64_t R, float *acc_out, float *m_out, float *l_out, int64_t nchunk,
        int nthreads) {
    const int64_t esize = dt == DT_F32 ? 4 : 2, krs = ks * esize, vrs = vs * esize;
    const int64_t units = B * Hk * nchunk;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t bh = u / nchunk, c = u % nchunk, b = bh / Hk, h = bh % Hk;
        const int64_t c0 = S * c / nchunk, c1 = S * (c + 1) / nchunk;
        const float *qq = q + bh * R * E;
        float *acc = acc_out + u * R * Ev, *m = m_out + u * R, *l = l_out + u * R;
        const char *kbase = k + (b * kb + h * kh) * esize, *vbase = v + (b * vb + h * vh) * esize;
        float sc[R * FB];
        memset(acc, 0, (size_t)(R * Ev) * sizeof(float));
        for (int64_t r = 0; r < R; r++) m[r] = -INFINITY, l[r] = 0.0f;
        for (int64_t s0 = c0; s0 < c1; s0 += FB) {
            const int64_t n = s0 + FB < c1 ? FB : c1 - s0;
            /* scores of the sub-block, four key rows at a time */
            int64_t j = 0;
            for (; j + 4 <= n; j += 4) scores4(kbase + (s0 + j) * krs, krs, dt, qq, R, E, sc + j, FB);
            for (; j < n; j++) scores1(kbase + (s0 + j) * krs, dt, qq, R, E, sc + j, FB);
            /* online softmax: new running max, rescale, probabilities in place of the scores */
            for (int64_t r = 0; r < R; r++) {
                float *sr = sc + r * FB, bm = sr[0];
                for (int64_t i = 1; i < n; i++) bm = sr[i] > bm ? sr[i] : bm;
                const float mn = bm > m[r] ? bm : m[r], alpha = expf(m[r] - mn);
                m[r] = mn;
                const __m256 mv = _mm256_set1_ps(mn);
                __m256 tot = _mm256_setzero_ps();
                int64_t i = 0;
                for (; i + 8 <= n; i += 8) {
                    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + i), mv));
                    _mm256_storeu_ps(sr + i, p);
                    tot = _mm256_add_ps(tot, p);
                }
                float sum = _mm_cvtss_f32(hsum4(tot, tot, tot, tot));
                for (; i < n; i++) sum += (sr[i] = expf(sr[i] - mn));
                l[r] = l[r] * alpha + sum;
                if (alpha != 1.0f) {
                    float *a = acc + r * Ev;
                    for (int64_t e = 0; e < Ev; e++) a[e] *= alpha;
                }
            }
            /* acc += p V over the sub-block */
            for (int64_t r = 0; r < R; r++) pv_rows(sc + r * FB, vbase + s0 * vrs, n, vrs, dt, acc + r * Ev, Ev);
        }
    }
}
#endif

/* Run `call` with `dtc` bound to `dt` as a compile-time constant: each dtype gets its own inlined copy of the
 * kernel, with the row loads specialised and no per-element branch. */
#ifdef ATTNKIT_AVX2
#define WITH_CONSTANT_DTYPE(dt, call)                                                                                 \
    do {                                                                                                               \
        if ((dt) == DT_F32) {                                                                                          \
            const int dtc = DT_F32;                                                                                    \
            call;                                                                                                      \
        } else if ((dt) == DT_BF16) {                                                                                  \
            const int dtc = DT_BF16;                                                                                   \
            call;                                                                                                      \
        } else {                                                                                                       \
            const int dtc = DT_F16;                                                                                    \
            call;                                                                                                      \
        }                                                                                                              \
    } while (0)
#endif

int attnkit_simd(void) {
#ifdef ATTNKIT_AVX2
    return 1;
#else
    return 0;
#endif
}

void attnkit_decode_scores(const void *k, int dt, int64_t B, int64_t Hk, int64_t S, int64_t E, int64_t sb,
                           int64_t sh, int64_t ss, const float *q, int64_t R, float *out, int64_t block,
                           int nthreads) {
#ifdef ATTNKIT_AVX2
    if (E % 8 == 0) {
        WITH_CONSTANT_DTYPE(dt, scores_avx2(k, dtc, B, Hk, S, E, sb, sh, ss, q, R, out, block, nthreads));
        return;
    }
#endif
    scores_generic(k, dt, B, Hk, S, E, sb, sh, ss, q, R, out, block, nthreads);
}

void attnkit_decode_pv(const float *p, const void *v, int dt, int64_t B, int64_t Hk, int64_t S, int64_t Ev,
                       int64_t sb, int64_t sh, int64_t ss, int64_t R, float *part, int64_t nchunk, int nthreads) {
#ifdef ATTNKIT_AVX2
    if (Ev % 8 == 0) {
        WITH_CONSTANT_DTYPE(dt, pv_avx2(p, v, dtc, B, Hk, S, Ev, sb, sh, ss, R, part, nchunk, nthreads));
        return;
    }
#endif
    pv_generic(p, v, dt, B, Hk, S, Ev, sb, sh, ss, R, part, nchunk, nthreads);
}

/* acc_out: (B*Hk, nchunk, R, Ev); m_out, l_out: (B*Hk, nchunk, R); all float32, written. */
void attnkit_decode_fused(const void *k, const void *v, int dt, int64_t B, int64_t Hk, int64_t S, int64_t E,
                          int64_t Ev, int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh, int64_t vs,
                          const float *q, int64_t R, float *acc_out, float *m_out, float *l_out, int64_t nchunk,
                          int nthreads) {
#ifdef ATTNKIT_AVX2
    if (E % 8 == 0 && Ev % 8 == 0) {
        WITH_CONSTANT_DTYPE(dt, fused_avx2(k, v, dtc, B, Hk, S, E, Ev, kb, kh, ks, vb, vh, vs, q, R, acc_out, m_out,
                                           l_out, nchunk, nthreads));
        return;
    }
#endif
    fused_generic(k, v, dt, B, Hk, S, E, Ev, kb, kh, ks, vb, vh, vs, q, R, acc_out, m_out, l_out, nchunk, nthreads);
}
