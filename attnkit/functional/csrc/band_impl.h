/* The sliding-window kernel body, included by band.c once per instruction set with:
 *   BK_SUFFIX  name suffix of every function (generic, avx512)
 *   BK_VEC     floats per vector (GCC vector extensions: the compiler maps them to the target's registers)
 *   BK_NV      vectors per microkernel row (columns per microkernel call: BK_NV * BK_VEC)
 *   BK_MR      rows per microkernel call
 * See band.c for the algorithm and the layout of the arguments.
 */
#define BK_CAT2(a, b) a##_##b
#define BK_CAT(a, b) BK_CAT2(a, b)
#define BK(name) BK_CAT(name, BK_SUFFIX)
#define VF BK(vf)
#define VI BK(vi)
#define VFU BK(vfu)

typedef float VF __attribute__((vector_size(BK_VEC * 4)));
typedef int32_t VI __attribute__((vector_size(BK_VEC * 4)));
typedef float VFU __attribute__((vector_size(BK_VEC * 4), aligned(4), may_alias));

static inline VF BK(ld)(const float *p) { return *(const VFU *)p; }
static inline void BK(st)(float *p, VF x) { *(VFU *)p = x; }
static inline VF BK(splat)(float x) { return (VF){0} + x; }
static inline VF BK(sel)(VI m, VF a, VF b) { return (VF)(((VI)a & m) | ((VI)b & ~m)); } /* m ? a : b */
/* a > b ? a : b lane by lane (b where either is NaN): one vmaxps, which computes exactly that, on AVX-512. */
#if BK_VEC == 16 && defined(__AVX512F__)
static inline VF BK(vmax)(VF a, VF b) { return (VF)_mm512_max_ps((__m512)a, (__m512)b); }
#else
static inline VF BK(vmax)(VF a, VF b) { return BK(sel)(a > b, a, b); }
#endif

/* Horizontal max / sum of a vector (the instruction set's own reductions where there is one). */
#if BK_VEC == 16 && defined(__AVX512F__)
static inline float BK(hmax)(VF x) { return _mm512_reduce_max_ps((__m512)x); }
static inline float BK(hsum)(VF x) { return _mm512_reduce_add_ps((__m512)x); }
#elif BK_VEC == 8 && defined(__AVX2__)
static inline float BK(hmax)(VF x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128((__m256)x), _mm256_extractf128_ps((__m256)x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
static inline float BK(hsum)(VF x) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128((__m256)x), _mm256_extractf128_ps((__m256)x, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
}
#else
static inline float BK(hmax)(VF x) {
    float m = x[0];
    for (int i = 1; i < BK_VEC; i++) m = x[i] > m ? x[i] : m;
    return m;
}
static inline float BK(hsum)(VF x) {
    float m = x[0];
    for (int i = 1; i < BK_VEC; i++) m += x[i];
    return m;
}
#endif

static inline VI BK(iota)(void) {
    VI r;
    for (int i = 0; i < BK_VEC; i++) r[i] = i;
    return r;
}

/* 2**x for x <= 8 (x = -inf gives 0, NaN stays NaN): x = n + f with |f| <= 1/2, 2**f by a degree-6 polynomial
 * (fitted to the relative error on [-1/2, 1/2]: 1.9e-9 in exact arithmetic, 1.0e-7 evaluated in float32, as the
 * degree-7 Taylor series it replaced, one multiply-add fewer), times 2**n. */
static inline VF BK(exp2_poly)(VF f) {
    VF p = BK(splat)(1.534579255435211e-04f);
    p = p * f + 1.3399924435901372e-03f;
    p = p * f + 9.6184889643892800e-03f;
    p = p * f + 5.5503287939314920e-02f;
    p = p * f + 2.4022646891193483e-01f;
    p = p * f + 6.9314720572935000e-01f;
    return p * f + 1.0000000005539975f;
}

#if BK_VEC == 16 && defined(__AVX512F__)
/* AVX-512: n = round(x) and p * 2**n by the instruction set's own rounding and scaling (vrndscaleps, vscalefps),
 * five operations fewer than the integer construction below. x is first raised to -150 (max(-150, x) keeps a NaN),
 * so -inf gives 2**-150, which rounds to exactly 0; x in (-150, -126) gives a subnormal where the construction below
 * gives 0 (a weight 2**-126 below the row's largest, invisible beside it). */
static inline VF BK(exp2v)(VF x) {
    const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-150.0f), (__m512)x);
    const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const VF p = BK(exp2_poly)((VF)_mm512_sub_ps(xc, n));
    return (VF)_mm512_scalef_ps((__m512)p, n);
}
#else
/* Elsewhere 2**n is built in the exponent bits; results below 2**-126 flush to 0. */
static inline VF BK(exp2v)(VF x) {
    const VF lo = BK(splat)(-127.0f);
    x = BK(sel)(x < lo, lo, x);
    const VF magic = BK(splat)(12582912.0f); /* 1.5 * 2**23: adding it rounds to an integer */
    VF r = x + magic;
    VF n = r - magic;
    VF f = x - n;
    VI ni = (VI)r - (VI)magic; /* the integer n, from the low mantissa bits */
    const VF p = BK(exp2_poly)(f);
    VF scale = (VF)((ni + 127) << 23); /* 2**n; n = -127 gives the bits of 0.0 */
    return p * scale;
}
#endif

/* tanh(x), relative error about 1 ulp: x P(x^2) for |x| < 0.625 (degree-5 fit to the relative error, 1.1e-7 in
 * float32), else 1 - 2 / (e^{2|x|} + 1) with the sign of x (no cancellation there: tanh >= 0.55); |x| is capped at 9
 * first, where tanh is 1 in float32. NaN stays NaN. */
static inline VF BK(tanhv)(VF x) {
    const VF ax = BK(sel)(x < 0.0f, -x, x), z = x * x;
    VF p = BK(splat)(-0.00566015113145113f);
    p = p * z + 0.020591162145137787f;
    p = p * z - 0.05372113734483719f;
    p = p * z + 0.13331128656864166f;
    p = p * z - 0.3333325982093811f;
    const VF small = x * (p * z + 1.0f);
    const VF e = BK(exp2v)(BK(sel)(ax > 9.0f, BK(splat)(9.0f), ax) * 2.8853900817779268f); /* e^{2|x|} */
    const VF big = 1.0f - 2.0f / (e + 1.0f);
    return BK(sel)(ax < 0.625f, small, BK(sel)(x < 0.0f, -big, big));
}

/* The one microkernel's product: s[r][u] += sum_k a[r*ar + k*ak] * y[k*ys + u*VEC : (u+1)*VEC], r < MR, u < nv.
 * Strided scalars a (broadcast) times rows of y: every product of the kernel is this shape, with a either a tile
 * read by rows (ar = row stride, ak = 1) or read transposed (ar = 1, ak = row stride). Inlined, s stays in
 * registers. */
static inline __attribute__((always_inline)) void BK(mk_sum)(VF s[BK_MR][BK_NV], const float *restrict a, int64_t ar,
                                                             int64_t ak, const float *restrict y, int64_t ys,
                                                             int64_t kn, const int nv) {
    for (int64_t k = 0; k < kn; k++) {
        VF yv[BK_NV];
        const float *yk = y + k * ys;
#pragma GCC unroll 8
        for (int u = 0; u < nv; u++) yv[u] = BK(ld)(yk + u * BK_VEC);
        const float *ak_ = a + k * ak;
#pragma GCC unroll 8
        for (int r = 0; r < BK_MR; r++) {
            const float x = ak_[r * ar];
#pragma GCC unroll 8
            for (int u = 0; u < nv; u++) s[r][u] += yv[u] * x;
        }
    }
}

/* The microkernel: C[r][0:nv*VEC] = (acc ? C[r] : 0) + the product of mk_sum. */
static inline __attribute__((always_inline)) void BK(mk)(float *restrict c, int64_t ldc, const float *restrict a,
                                                         int64_t ar, int64_t ak, const float *restrict y,
                                                         int64_t ys, int64_t kn, int acc, const int nv) {
    VF s[BK_MR][BK_NV];
#pragma GCC unroll 8
    for (int r = 0; r < BK_MR; r++)
#pragma GCC unroll 8
        for (int u = 0; u < nv; u++) s[r][u] = acc ? BK(ld)(c + r * ldc + u * BK_VEC) : (VF){0};
    BK(mk_sum)(s, a, ar, ak, y, ys, kn, nv);
#pragma GCC unroll 8
    for (int r = 0; r < BK_MR; r++)
#pragma GCC unroll 8
        for (int u = 0; u < nv; u++) BK(st)(c + r * ldc + u * BK_VEC, s[r][u]);
}

/* C (m x width) (+)= A (m x kn, strides ar / ak) times Y (kn x width, row stride ys). m is a multiple of BK_MR,
 * width a multiple of 16. */
static void BK(gemm)(float *c, int64_t ldc, const float *a, int64_t ar, int64_t ak, const float *y, int64_t ys,
                     int64_t m, int64_t width, int64_t kn, int acc) {
    for (int64_t c0 = 0; c0 < width; c0 += BK_NV * BK_VEC) {
        const int64_t left = (width - c0) / BK_VEC;
        for (int64_t i = 0; i < m; i += BK_MR) {
            float *ci = c + i * ldc + c0;
            const float *ai = a + i * ar;
            if (left >= BK_NV)
                BK(mk)(ci, ldc, ai, ar, ak, y + c0, ys, kn, acc, BK_NV);
#if BK_NV > 3
            else if (left == 3)
                BK(mk)(ci, ldc, ai, ar, ak, y + c0, ys, kn, acc, 3);
#endif
#if BK_NV > 2
            else if (left == 2)
                BK(mk)(ci, ldc, ai, ar, ak, y + c0, ys, kn, acc, 2);
#endif
            else
                BK(mk)(ci, ldc, ai, ar, ak, y + c0, ys, kn, acc, 1);
        }
    }
}

/* xt (cols x ldt) = the rows [r0, r1) of x (rows x cols) transposed, zero from column r1 - r0 to ldt (as
 * bk_transpose), BK_VEC x BK_VEC blocks at a time in registers: load BK_VEC rows, exchange the off-diagonal h x h
 * blocks of every 2h x 2h block for h = BK_VEC / 2 ... 1 (each exchange swaps bit h of the row and column index, so
 * all of them together swap the indices), store BK_VEC columns. The rows after the last whole block, the zeros, and
 * a `cols` that is not a multiple of BK_VEC (head dims are padded to 16) go through bk_transpose. */
static void BK(transpose)(const float *x, int64_t cols, int64_t r0, int64_t r1, float *xt, int64_t ldt) {
    const int64_t whole = cols % BK_VEC ? r0 : r0 + (r1 - r0) / BK_VEC * BK_VEC;
    bk_transpose(x, cols, r0, whole, r1, xt, ldt);
    const VI lane = BK(iota)();
    for (int64_t rb = r0; rb < whole; rb += BK_VEC) {
        for (int64_t c0 = 0; c0 < cols; c0 += BK_VEC) {
            VF r[BK_VEC];
#pragma GCC unroll 16
            for (int i = 0; i < BK_VEC; i++) r[i] = BK(ld)(x + (rb + i) * cols + c0);
#pragma GCC unroll 4
            for (int h = BK_VEC / 2; h >= 1; h /= 2) {
                const VI up = (lane & h) != 0; /* lanes whose bit h is set */
                const VI lo_mask = (up & (lane + (BK_VEC - h))) | (~up & lane); /* a[j] or b[j - h] */
                const VI hi_mask = (up & (lane + BK_VEC)) | (~up & (lane + h));  /* a[j + h] or b[j] */
#pragma GCC unroll 16
                for (int i = 0; i < BK_VEC; i++) {
                    if (i & h) continue;
                    const VF a = r[i], b = r[i + h];
                    r[i] = __builtin_shuffle(a, b, lo_mask);
                    r[i + h] = __builtin_shuffle(a, b, hi_mask);
                }
            }
#pragma GCC unroll 16
            for (int i = 0; i < BK_VEC; i++) BK(st)(xt + (c0 + i) * ldt + (rb - r0), r[i]);
        }
    }
}

/* Whether a lane of x is above thr. */
#if BK_VEC == 16 && defined(__AVX512F__)
static inline int BK(any_gt)(VF x, float thr) {
    return _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(thr), _CMP_GT_OQ) != 0;
}
#else
static inline int BK(any_gt)(VF x, float thr) {
    const VI gt = x > BK(splat)(thr);
    int32_t any = 0;
    for (int i = 0; i < BK_VEC; i++) any |= gt[i];
    return any != 0;
}
#endif

/* The lane-wise max of a row whose `jw` scores are all kept (the row's max is the largest lane). */
static inline VF BK(row_max)(const float *row, int64_t jw) {
    VF mv = BK(ld)(row);
    for (int64_t j = BK_VEC; j < jw; j += BK_VEC) {
        const VF x = BK(ld)(row + j);
        mv = BK(vmax)(x, mv);
    }
    return mv;
}

/* One row of the tile: keep the first `lim` of `jw` scores (the rest become -inf), return their lane-wise max. */
static inline VF BK(mask_max)(float *row, int64_t jw, int64_t lim) {
    const VF ninf = BK(splat)(-INFINITY);
    const VI idx0 = BK(iota)();
    VF mv = ninf;
    for (int64_t j = 0; j < jw; j += BK_VEC) {
        VF x = BK(sel)(idx0 + (int32_t)j < (int32_t)lim, BK(ld)(row + j), ninf);
        mv = BK(vmax)(x, mv);
        BK(st)(row + j, x);
    }
    return mv;
}

/* Lanes j .. j + VEC - 1 of a row's 64-bit word: -1 where the bit is set (the key may be attended), else 0. */
static inline VI BK(bitsel)(uint64_t word, int64_t j) {
    const VI bv = (VI){0} + (int32_t)(uint32_t)(word >> j);
    return ((bv >> BK(iota)()) & 1) != 0;
}

/* One row of the tile in a partial block: keep the scores whose bit is set (the rest become -inf), return their
 * lane-wise max. */
static inline VF BK(mask_max_bits)(float *row, int64_t jw, uint64_t word) {
    const VF ninf = BK(splat)(-INFINITY);
    VF mv = ninf;
    for (int64_t j = 0; j < jw; j += BK_VEC) {
        VF x = BK(sel)(BK(bitsel)(word, j), BK(ld)(row + j), ninf);
        mv = BK(vmax)(x, mv);
        BK(st)(row + j, x);
    }
    return mv;
}

/* The keys of a partial block (jn rows of width x) with the rows no row of the tile may attend (0 bits of `seen`)
 * replaced by zeros, into dst: so that a zero weight never multiplies a NaN there. */
static void BK(zero_unseen)(float *dst, const float *src, int64_t jn, int64_t width, uint64_t seen) {
    for (int64_t j = 0; j < jn; j++) {
        if ((seen >> j) & 1)
            memcpy(dst + j * width, src + j * width, sizeof(float) * (size_t)width);
        else
            memset(dst + j * width, 0, sizeof(float) * (size_t)width);
    }
}

/* The words of the rows [0, t) of a partial block, limited to its first jn keys; `seen` = their union. */
static inline uint64_t BK(block_words)(const bk_pat *P, int64_t part, int64_t t, int64_t jn, uint64_t *words) {
    const uint64_t keep = jn >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << jn) - 1);
    const uint64_t *src = P->bits + part * BK_TQ;
    uint64_t seen = 0;
    for (int64_t i = 0; i < BK_TQ; i++) {
        words[i] = i < t ? src[i] & keep : 0;
        seen |= words[i];
    }
    return seen;
}

/* row = 2**(row - m) in place (masked entries, -inf, give 0); returns the lane-wise sum. */
static inline VF BK(exp_sum)(float *row, int64_t jw, float m) {
    VF acc = (VF){0};
    const VF mv = BK(splat)(m);
    for (int64_t j = 0; j < jw; j += BK_VEC) {
        VF p = BK(exp2v)(BK(ld)(row + j) - mv);
        BK(st)(row + j, p);
        acc += p;
    }
    return acc;
}

#define BK_TQP ((BK_TQ + BK_MR - 1) / BK_MR * BK_MR) /* tile rows, padded to whole microkernels */
#define BK_LDS (BK_TK + 16) /* row stride of score tiles */

/* C (m x width) += A^T-style product for exactly m rows (m need not be a multiple of MR): the last m % MR rows
 * go through `tmp` (MR x width), so no row after the m-th is read or written. */
static void BK(gemm_rows)(float *c, int64_t ldc, const float *a, int64_t ar, int64_t ak, const float *y, int64_t ys,
                          int64_t m, int64_t width, int64_t kn, float *tmp) {
    const int64_t whole = m / BK_MR * BK_MR;
    if (whole) BK(gemm)(c, ldc, a, ar, ak, y, ys, whole, width, kn, 1);
    if (m == whole) return;
    for (int64_t r = 0; r < BK_MR; r++)
        for (int64_t d = 0; d < width; d++) tmp[r * width + d] = whole + r < m ? c[(whole + r) * ldc + d] : 0.0f;
    BK(gemm)(tmp, width, a + whole * ar, ar, ak, y, ys, BK_MR, width, kn, 1);
    for (int64_t r = 0; whole + r < m; r++)
        for (int64_t d = 0; d < width; d++) c[(whole + r) * ldc + d] = tmp[r * width + d];
}

/* Logit soft-capping of the first t rows (jw scores each) of a base-2 score tile: S = cap2 tanh(S / cap2); with
 * `slope` != NULL also slope = 1 - tanh^2 (dS_capped / dS, for the backward), in the same layout. */
static void BK(cap_rows)(float *s, float *slope, int64_t t, int64_t jw, float cap2) {
    const float inv = 1.0f / cap2;
    for (int64_t i = 0; i < t; i++)
        for (int64_t j = 0; j < jw; j += BK_VEC) {
            float *x = s + i * BK_LDS + j;
            const VF th = BK(tanhv)(BK(ld)(x) * inv);
            BK(st)(x, th * cap2);
            if (slope) BK(st)(slope + i * BK_LDS + j, 1.0f - th * th);
        }
}

/* qs (tp x e) = the tile's t query rows from r0, times c2 (the scale in base 2); zero rows after the t-th. */
static inline void BK(load_q)(float *qs, const float *q, int64_t r0, int64_t t, int64_t tp, int64_t e, float c2) {
    for (int64_t i = 0; i < tp; i++)
        for (int64_t d = 0; d < e; d++) qs[i * e + d] = i < t ? q[(r0 + i) * e + d] * c2 : 0.0f;
}

/* S (tp x jw, base-2 scores) = Qs K^T for one key block (kt: its transposed keys). A partial block (words != NULL)
 * computes, per group of MR rows, only the columns from the group's first seen key to its last, in whole vectors of
 * 16: the keys [from[], need[]) (need[] = 0: the group sees none of the block); the causal diagonal needs about
 * half the block, the first block of an exact window too. The other columns of s are left as they were (the mask
 * replaces them by -inf). */
static inline void BK(scores)(float *s, const float *qs, const float *kt, int64_t ldt, int64_t e, int64_t tp,
                              int64_t t, int64_t jw, const uint64_t *words, int64_t *from, int64_t *need) {
    if (!words) {
        BK(gemm)(s, BK_LDS, qs, e, 1, kt, ldt, tp, jw, e, 0);
        return;
    }
    for (int64_t i = 0; i < tp; i += BK_MR) {
        uint64_t u = 0;
        for (int64_t r = i; r < i + BK_MR && r < t; r++) u |= words[r];
        const int64_t g = i / BK_MR;
        from[g] = u ? __builtin_ctzll(u) : 0;
        need[g] = u ? 64 - __builtin_clzll(u) : 0;
        const int64_t c0 = from[g] / 16 * 16;
        if (need[g])
            BK(gemm)(s + i * BK_LDS + c0, BK_LDS, qs + i * e, e, 1, kt + c0, ldt, BK_MR, bk_up(need[g], 16) - c0, e, 0);
    }
}

/* One row of the forward's online softmax meets a block whose lane-wise score maxima are mv: its reference *m is
 * raised (and its running sums *lv and output row o rescaled) only when the scores outgrow it by 2**8. Any
 * reference is exact, and this one keeps every weight below 256; before the row's first block its sum and output
 * are 0. */
static inline void BK(raise_ref)(VF mv, float *m, VF *lv, float *o, int64_t ev) {
    if (!BK(any_gt)(mv, *m + 8.0f)) return;
    const float mx = BK(hmax)(mv);
    if (*m != -INFINITY) {
        const float alpha = exp2f(*m - mx);
        *lv = *lv * alpha;
        for (int64_t d = 0; d < ev; d++) o[d] *= alpha;
    }
    *m = mx;
}

#if BK_NV * BK_VEC == BK_TK
/* A full block of the forward (every row of the tile sees all BK_TK keys, no cap) when one microkernel row spans
 * the block: per group of MR rows, the scores are computed in registers and turned into P = 2**(S - m) there (the
 * row's reference m raised first by raise_ref), so S never goes through memory; P is stored for the product with
 * V. Rows from t on get P = 0. The same arithmetic as BK(scores) followed by row_max / exp_sum, in the same order
 * per element. */
static void BK(scores_exp_full)(float *s, const float *qs, const float *kt, int64_t ldt, int64_t e, int64_t tp,
                                int64_t t, float *m, VF *lv, float *o, int64_t ev) {
    for (int64_t i = 0; i < tp; i += BK_MR) {
        VF acc[BK_MR][BK_NV];
#pragma GCC unroll 8
        for (int r = 0; r < BK_MR; r++)
#pragma GCC unroll 8
            for (int u = 0; u < BK_NV; u++) acc[r][u] = (VF){0};
        BK(mk_sum)(acc, qs + i * e, e, 1, kt, ldt, e, BK_NV);
#pragma GCC unroll 8
        for (int r = 0; r < BK_MR; r++) {
            const int64_t row = i + r;
            float *dst = s + row * BK_LDS;
            if (row >= t) {
#pragma GCC unroll 8
                for (int u = 0; u < BK_NV; u++) BK(st)(dst + u * BK_VEC, (VF){0});
                continue;
            }
            VF mv = acc[r][0];
#pragma GCC unroll 8
            for (int u = 1; u < BK_NV; u++) mv = BK(vmax)(acc[r][u], mv);
            BK(raise_ref)(mv, m + row, lv + row, o + row * ev, ev);
            const VF mm = BK(splat)(m[row]);
            VF sum = (VF){0};
#pragma GCC unroll 8
            for (int u = 0; u < BK_NV; u++) {
                const VF p = BK(exp2v)(acc[r][u] - mm);
                BK(st)(dst + u * BK_VEC, p);
                sum += p;
            }
            lv[row] += sum;
        }
    }
}
#endif

/* Forward of the query groups [g0, g1) of one row: out (n_q, ev) and lse (n_q) for their rows. */
static int BK(attend_fwd)(const bk_pat *P, const float *q, const float *k, const float *v, float *out,
                          float *lse, int64_t e, int64_t ev, float scale, int64_t g0, int64_t g1) {
    const float c2 = scale * 1.4426950408889634f; /* scores in base 2 */
    int64_t key0, key1;
    bk_pat_keys(P, g0, g1, &key0, &key1);
    const int64_t ldt = key1 - key0 + BK_TK; /* the transposed keys, zero after the last one */
    const int64_t nbuf = BK_TQP * (e + BK_LDS + ev) + BK_TQP + e * ldt + (P->part ? BK_TK * ev : 0);
    float *buf = bk_scratch(nbuf);
    if (!buf) return -1;
    float *qs = buf, *s = qs + BK_TQP * e, *o = s + BK_TQP * BK_LDS, *m = o + BK_TQP * ev;
    float *kt = m + BK_TQP, *vz = kt + e * ldt; /* vz: the values of a partial block, unseen keys zeroed */
    uint64_t words[BK_TQ];
    BK(transpose)(k, e, key0, key1, kt, ldt);
    for (bk_tile T = {g0, 0, g0 * P->g, 0}; bk_tile_next(&T, P, g1);) {
        const int64_t r0 = T.r0, t = T.t, tp = bk_up(t, BK_MR);
        BK(load_q)(qs, q, r0, t, tp, e, c2);
        memset(o, 0, sizeof(float) * (size_t)(tp * ev));
        VF lv[BK_TQP]; /* the running sums, lane by lane: one horizontal sum per row at the end */
        for (int64_t i = 0; i < t; i++) m[i] = -INFINITY, lv[i] = (VF){0};
        int64_t cursor = 0, lo, hi, part;
        while (bk_next_range(P, T.grp, &cursor, &lo, &hi, &part)) {
            if (!bk_clip(P, &T, &lo, &hi)) continue;
            for (int64_t j0 = lo; j0 < hi; j0 += BK_TK) {
                const int64_t jn = bk_min(BK_TK, hi - j0), jw = bk_up(jn, 16);
                const float *vb = v + j0 * ev;
                if (part >= 0) { /* a partial block: one per range, rows of the tile = rows of the block */
                    const uint64_t seen = BK(block_words)(P, part, t, jn, words);
                    if (!seen) continue;
                    if (seen != (jn >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << jn) - 1))) {
                        BK(zero_unseen)(vz, vb, jn, ev, seen);
                        vb = vz;
                    }
                }
#if BK_NV * BK_VEC == BK_TK
                if (part < 0 && jn == BK_TK && P->cap2 == 0.0f && (!P->causal || r0 >= j0 + jn - 1)) {
                    BK(scores_exp_full)(s, qs, kt + (j0 - key0), ldt, e, tp, t, m, lv, o, ev);
                    BK(gemm)(o, ev, s, BK_LDS, 1, vb, ev, tp, ev, jn, 1); /* O += P V */
                    continue;
                }
#endif
                int64_t from[BK_TQP / BK_MR], need[BK_TQP / BK_MR]; /* per group of MR rows: its keys */
                BK(scores)(s, qs, kt + (j0 - key0), ldt, e, tp, t, jw, part >= 0 ? words : NULL, from, need);
                if (P->cap2 > 0.0f) BK(cap_rows)(s, NULL, t, jw, P->cap2);
                for (int64_t i = 0; i < tp; i++) {
                    float *row = s + i * BK_LDS;
                    const int64_t lim = i >= t      ? 0
                                        : part >= 0 ? (words[i] != 0) /* any bit: the row sees a key */
                                                    : bk_limit(r0 + i, j0, jn, P->causal);
                    if (lim <= 0) {
                        memset(row, 0, sizeof(float) * (size_t)jw);
                        continue;
                    }
                    const VF mv = part >= 0  ? BK(mask_max_bits)(row, jw, words[i])
                                  : lim == jw ? BK(row_max)(row, jw) /* every key of the block: no mask */
                                              : BK(mask_max)(row, jw, lim);
                    BK(raise_ref)(mv, m + i, lv + i, o + i * ev, ev);
                    lv[i] += BK(exp_sum)(row, jw, m[i]);
                }
                if (part >= 0) { /* P is zero outside each group's seen keys [from, need) */
                    for (int64_t i = 0; i < tp; i += BK_MR) {
                        const int64_t g = i / BK_MR, f = from[g];
                        if (need[g])
                            BK(gemm)(o + i * ev, ev, s + i * BK_LDS + f, BK_LDS, 1, vb + f * ev, ev, BK_MR, ev,
                                     need[g] - f, 1);
                    }
                } else {
                    BK(gemm)(o, ev, s, BK_LDS, 1, vb, ev, tp, ev, jn, 1); /* O += P V */
                }
            }
        }
        for (int64_t i = 0; i < t; i++) {
            const float l = BK(hsum)(lv[i]);
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            for (int64_t d = 0; d < ev; d++) out[(r0 + i) * ev + d] = o[i * ev + d] * inv;
            lse[r0 + i] = l > 0.0f ? (m[i] + log2f(l)) * 0.6931471805599453f : -INFINITY;
        }
    }
    bk_release(buf, nbuf);
    return 0;
}

/* v[j] = -inf for j in [lo, hi) (keys a row may not attend, between the ranges its tile reads). */
static inline void BK(fill_ninf)(float *v, int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; j++) v[j] = -INFINITY;
}

/* The exact softmax weights of the query groups [g0, g1) of one row: w (n_q, n_k), every entry of their rows
 * written, zero where a row may not attend. Per tile of BK_TQ rows, while its rows of w stay in cache:
 *   1. the base-2 scores of every key block the tile reads go straight into its rows of w (-inf where masked, also
 *      between the ranges), with each row's lane-wise max; w is zero before the first range and after the last;
 *   2. one pass over the span of keys the tile read: w = 2**(w - max) and the row's sum;
 *   3. one pass dividing by the sum (a row with no key to attend stays all zero).
 * The readable version is attnkit.functional.attention_weights on the math backend; the ranges of a row come in
 * ascending order (returns -3 otherwise). */
static int BK(attend_wts)(const bk_pat *P, const float *q, const float *k, float *w, int64_t e, float scale,
                          int64_t g0, int64_t g1) {
    const float c2 = scale * 1.4426950408889634f;
    const int64_t nk = P->n_k;
    int64_t key0, key1;
    bk_pat_keys(P, g0, g1, &key0, &key1);
    const int64_t ldt = key1 - key0 + BK_TK;
    const int64_t nbuf = BK_TQP * (e + BK_LDS) + e * ldt;
    float *buf = bk_scratch(nbuf);
    if (!buf) return -1;
    float *qs = buf, *s = qs + BK_TQP * e, *kt = s + BK_TQP * BK_LDS;
    uint64_t words[BK_TQ];
    BK(transpose)(k, e, key0, key1, kt, ldt);
    for (bk_tile T = {g0, 0, g0 * P->g, 0}; bk_tile_next(&T, P, g1);) {
        const int64_t r0 = T.r0, t = T.t, tp = bk_up(t, BK_MR);
        BK(load_q)(qs, q, r0, t, tp, e, c2);
        VF mv[BK_TQP];
        for (int64_t i = 0; i < t; i++) mv[i] = BK(splat)(-INFINITY);
        int64_t cursor = 0, lo, hi, part, first = -1, pos = 0; /* the span [first, pos) written so far */
        while (bk_next_range(P, T.grp, &cursor, &lo, &hi, &part)) {
            if (!bk_clip(P, &T, &lo, &hi)) continue;
            if (lo < pos) {
                bk_release(buf, nbuf);
                return -3;
            }
            if (first < 0) first = pos = lo;
            for (int64_t i = 0; i < t; i++) BK(fill_ninf)(w + (r0 + i) * nk, pos, lo);
            for (int64_t j0 = lo; j0 < hi; j0 += BK_TK) {
                const int64_t jn = bk_min(BK_TK, hi - j0), jw = bk_up(jn, 16);
                int64_t from[BK_TQP / BK_MR], need[BK_TQP / BK_MR];
                if (part >= 0 && !BK(block_words)(P, part, t, jn, words)) { /* no row of the tile sees the block */
                    for (int64_t i = 0; i < t; i++) BK(fill_ninf)(w + (r0 + i) * nk + j0, 0, jn);
                    continue;
                }
                BK(scores)(s, qs, kt + (j0 - key0), ldt, e, tp, t, jw, part >= 0 ? words : NULL, from, need);
                if (P->cap2 > 0.0f) BK(cap_rows)(s, NULL, t, jw, P->cap2);
                for (int64_t i = 0; i < t; i++) {
                    float *row = s + i * BK_LDS, *dst = w + (r0 + i) * nk + j0;
                    const int64_t lim = part >= 0 ? (words[i] != 0) : bk_limit(r0 + i, j0, jn, P->causal);
                    if (lim <= 0) {
                        BK(fill_ninf)(dst, 0, jn);
                        continue;
                    }
                    const VF m = part >= 0  ? BK(mask_max_bits)(row, jw, words[i])
                                 : lim == jw ? BK(row_max)(row, jw)
                                             : BK(mask_max)(row, jw, lim);
                    mv[i] = BK(vmax)(m, mv[i]);
                    memcpy(dst, row, sizeof(float) * (size_t)jn);
                }
            }
            pos = hi;
        }
        if (first < 0) first = pos = 0;
        for (int64_t i = 0; i < t; i++) {
            float *row = w + (r0 + i) * nk;
            memset(row, 0, sizeof(float) * (size_t)first);
            memset(row + pos, 0, sizeof(float) * (size_t)(nk - pos));
            const float mx = BK(hmax)(mv[i]);
            if (mx == -INFINITY) { /* no key to attend: zeros */
                memset(row + first, 0, sizeof(float) * (size_t)(pos - first));
                continue;
            }
            const VF mxv = BK(splat)(mx);
            VF acc = (VF){0};
            int64_t j = first;
            for (; j + BK_VEC <= pos; j += BK_VEC) {
                const VF p = BK(exp2v)(BK(ld)(row + j) - mxv);
                BK(st)(row + j, p);
                acc += p;
            }
            float l = BK(hsum)(acc);
            for (; j < pos; j++) l += row[j] = exp2f(row[j] - mx);
            const float inv = 1.0f / l;
            const VF iv = BK(splat)(inv);
            for (j = first; j + BK_VEC <= pos; j += BK_VEC) BK(st)(row + j, BK(ld)(row + j) * iv);
            for (; j < pos; j++) row[j] *= inv;
        }
    }
    bk_release(buf, nbuf);
    return 0;
}

/* Backward of the query groups [g0, g1): dq for their rows; dk, dv hold the key rows [key0, key1) of
 * bk_pat_keys, which the call zeroes and then accumulates into. */
static int BK(attend_bwd)(const bk_pat *P, const float *q, const float *k, const float *v, const float *out,
                          const float *dout, const float *lse, float *dq, float *dk, float *dv, int64_t e,
                          int64_t ev, float scale, int64_t g0, int64_t g1) {
    int64_t key0, key1;
    bk_pat_keys(P, g0, g1, &key0, &key1);
    const int64_t ldt = key1 - key0 + BK_TK;
    const int64_t wmax = e > ev ? e : ev;
    const int64_t nbuf = BK_TQP * (3 * e + ev + 2 * BK_LDS) + 2 * BK_TQP + (e + ev) * ldt + BK_MR * wmax +
                            (P->part ? BK_TK * e : 0) + (P->cap2 > 0.0f ? BK_TQP * BK_LDS : 0);
    float *buf = bk_scratch(nbuf);
    if (!buf) return -1;
    uint64_t words[BK_TQ];
    float *qs2 = buf, *qs = qs2 + BK_TQP * e, *gq = qs + BK_TQP * e, *go = gq + BK_TQP * e;
    float *p = go + BK_TQP * ev, *ds = p + BK_TQP * BK_LDS, *lse2 = ds + BK_TQP * BK_LDS, *dl = lse2 + BK_TQP;
    float *kt = dl + BK_TQP, *vt = kt + e * ldt, *tmp = vt + ev * ldt, *kz = tmp + BK_MR * wmax;
    float *slope = P->cap2 > 0.0f ? kz + (P->part ? BK_TK * e : 0) : NULL; /* 1 - tanh^2 of the capped scores */
    BK(transpose)(k, e, key0, key1, kt, ldt);
    BK(transpose)(v, ev, key0, key1, vt, ldt);
    memset(dk, 0, sizeof(float) * (size_t)((key1 - key0) * e)); /* dk, dv: the rows [key0, key1), owned */
    memset(dv, 0, sizeof(float) * (size_t)((key1 - key0) * ev));
    for (bk_tile T = {g0, 0, g0 * P->g, 0}; bk_tile_next(&T, P, g1);) {
        const int64_t r0 = T.r0, t = T.t, tp = bk_up(t, BK_MR);
        for (int64_t i = 0; i < tp; i++) {
            float delta = 0.0f; /* rowsum(dO * O) */
            for (int64_t d = 0; d < ev; d++) {
                const float g = i < t ? dout[(r0 + i) * ev + d] : 0.0f;
                go[i * ev + d] = g;
                delta += i < t ? g * out[(r0 + i) * ev + d] : 0.0f;
            }
            for (int64_t d = 0; d < e; d++) {
                const float x = i < t ? q[(r0 + i) * e + d] * scale : 0.0f;
                qs[i * e + d] = x;
                qs2[i * e + d] = x * 1.4426950408889634f;
            }
            lse2[i] = i < t ? lse[r0 + i] * 1.4426950408889634f : 0.0f;
            dl[i] = delta;
        }
        memset(gq, 0, sizeof(float) * (size_t)(tp * e));
        int64_t cursor = 0, lo, hi, part;
        while (bk_next_range(P, T.grp, &cursor, &lo, &hi, &part)) {
            if (!bk_clip(P, &T, &lo, &hi)) continue;
            for (int64_t j0 = lo; j0 < hi; j0 += BK_TK) {
                const int64_t jn = bk_min(BK_TK, hi - j0), jw = bk_up(jn, 16);
                const float *kb = k + j0 * e;
                if (part >= 0) {
                    const uint64_t seen = BK(block_words)(P, part, t, jn, words);
                    if (!seen) continue;
                    if (seen != (jn >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << jn) - 1))) {
                        BK(zero_unseen)(kz, kb, jn, e, seen);
                        kb = kz;
                    }
                }
                BK(gemm)(p, BK_LDS, qs2, e, 1, kt + (j0 - key0), ldt, tp, jw, e, 0);  /* S = Qs K^T (base 2) */
                if (slope) BK(cap_rows)(p, slope, t, jw, P->cap2);
                BK(gemm)(ds, BK_LDS, go, ev, 1, vt + (j0 - key0), ldt, tp, jw, ev, 0); /* dP = dO V^T */
                const VI idx0 = BK(iota)();
                for (int64_t i = 0; i < tp; i++) {
                    float *prow = p + i * BK_LDS, *drow = ds + i * BK_LDS;
                    const int64_t lim = i < t && part < 0 ? bk_limit(r0 + i, j0, jn, P->causal) : 0;
                    const uint64_t word = i < t && part >= 0 ? words[i] : 0;
                    const VF l2 = BK(splat)(lse2[i]), dd = BK(splat)(dl[i]);
                    for (int64_t j = 0; j < jw; j += BK_VEC) {
                        const VI ok = part >= 0 ? BK(bitsel)(word, j) : idx0 + (int32_t)j < (int32_t)lim;
                        const VF pv = BK(sel)(ok, BK(exp2v)(BK(ld)(prow + j) - l2), (VF){0}); /* P */
                        BK(st)(prow + j, pv);
                        VF dsv = pv * (BK(ld)(drow + j) - dd); /* dS */
                        if (slope) dsv = dsv * BK(ld)(slope + i * BK_LDS + j); /* through the cap */
                        BK(st)(drow + j, BK(sel)(ok, dsv, (VF){0}));
                    }
                }
                BK(gemm_rows)(dv + (j0 - key0) * ev, ev, p, 1, BK_LDS, go, ev, jn, ev, tp, tmp); /* dV += P^T dO */
                BK(gemm)(gq, e, ds, BK_LDS, 1, kb, e, tp, e, jn, 1);                          /* dQ += dS K */
                BK(gemm_rows)(dk + (j0 - key0) * e, e, ds, 1, BK_LDS, qs, e, jn, e, tp, tmp); /* dK += dS^T sQ */
            }
        }
        for (int64_t i = 0; i < t; i++)
            for (int64_t d = 0; d < e; d++) dq[(r0 + i) * e + d] = gq[i * e + d] * scale;
    }
    bk_release(buf, nbuf);
    return 0;
}

#undef BK_CAT2
#undef BK_CAT
#undef BK
#undef VF
#undef VI
#undef VFU
