/* attnkit native sliding-window and block-sparse attention: forward and backward of one row of B*H, exact, at a
 * cost proportional to the keys each query may read (O(N*w) for a window, O(non-zero blocks) for a layout).
 *
 * The readable versions are attnkit/functional/local.py (_window_blockwise, and the flash-piece path) and the dense
 * reference attnkit.functional.attention_reference with WindowMask(...).materialize(); tests compare all of them.
 *
 * The window. Positions are cut into buckets of w tokens. Query i (bucket b = i / w) sees the keys of buckets
 * b - lb ... b + lf, and with `causal` only keys j <= i; and only keys j < kv_len (right padding: the keys from
 * kv_len on are never attended, and a query with no key left gives zeros, lse = -inf and zero gradients). One call
 * handles the query buckets [b0, b1) of one row. A block-sparse row is the same walk with other key ranges: query
 * block i (bs rows) reads its list of key blocks, each [j bs, (j + 1) bs) (bk_pat below); the readable versions are
 * attnkit/functional/sparse.py's piece path and BlockSparseMask(...).materialize().
 *
 * Forward (FlashAttention's recurrence, in tiles of TQ query rows and blocks of TK keys):
 *     S = (scale * log2 e) Q_tile K_blk^T       base-2 scores
 *     m' = max(m, rowmax S);  P = 2**(S - m');  l = l * 2**(m - m') + rowsum P;  O = O * 2**(m - m') + P V_blk
 *     out = O / l;  lse = (m + log2 l) * ln 2  (the natural log-sum-exp of the scaled scores)
 * Backward (recomputes P from lse):
 *     delta = rowsum(dO * out);  P = exp(S - lse);  dV += P^T dO;  dP = dO V^T;  dS = P * (dP - delta)
 *     dQ += scale dS K;  dK += scale dS^T Q
 * Every product is one microkernel (band_impl.h): broadcast scalars of one operand times vectors of rows of the
 * other, with MR x NV*VEC accumulators kept in registers.
 *
 * Layout: q (n_q, e), k (n_k, e), v (n_k, ev), out, dout (n_q, ev) row-major float32, lse (n_q); e and ev
 * multiples of 16. A call reads the keys [key0, key1) that its query groups can see (bk_pat_keys: for a window
 * key0 = max(0, (b0 - lb) w), key1 = min(n, (b1 + lf) w)) and transposes them into its own buffer. dq is written
 * for the rows of its groups; dk and dv point at key key0 and hold key1 - key0 rows, which the call owns: it zeroes
 * them, then accumulates into them. Single-threaded: the caller
 * runs rows, or bucket ranges of a row with their own dk / dv buffers, in parallel. Returns 0, or -1 when a buffer
 * cannot be allocated.
 *
 * Instruction sets: the body is compiled once for the build's target (AVX2/FMA where _native enables it, portable C
 * otherwise) and, with GCC on x86-64, once more for AVX-512; the entry points pick at run time.
 * A NaN in a key after a query's position inside its last key block reaches that query's output through a zero
 * weight (as in PyTorch's causal flash kernel); keys outside the window (or the layout's blocks) are never read.
 * The masked entry points (attnkit_mask_*) carry a bit mask per row for partial blocks and keep NaN out there:
 * see attnkit_mask_fwd.
 */
#include <math.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include "attnkit.h"

#ifndef BK_TQ
#define BK_TQ 64
#endif
#ifndef BK_TK
#define BK_TK 64
#endif

/* Scalar helpers, the same for every instruction-set body. */
static inline int64_t bk_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t bk_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t bk_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* Query row i against the key block [j0, j0 + jn): how many of its first keys it may see. */
static inline int64_t bk_limit(int64_t i, int64_t j0, int64_t jn, int causal) {
    if (!causal) return jn;
    return bk_min(jn, i - j0 + 1);
}

/* Scratch buffers. bk_scratch(count) gives a 64-byte aligned buffer of at least `count` floats (NULL when out of
 * memory), bk_release(buf, count) hands it back. A buffer of 4 MiB or more (the transposed keys of a long row) is
 * aligned to 2 MiB and, on Linux, asks for transparent huge pages.
 *
 * Released buffers are kept in a small pool for the next call instead of going back to the system: a fresh buffer
 * is faulted in page by page on its first write, and at N = 16384 the 8 tasks of a forward each transpose 4 MiB of
 * keys, which cost 5-9 % of an exact-window forward in fresh memory on the test VM (docs/long.md). The pool keeps at
 * most BK_POOL_N buffers of at most BK_POOL_ONE bytes, BK_POOL_ALL bytes in all (the largest are kept), and
 * attnkit_scratch_release() frees them. Taking from and giving to the pool holds a spin lock for a few
 * instructions, once per task. */
#define BK_HUGE ((size_t)2 << 20)
#define BK_HUGE_FROM (2 * BK_HUGE) /* buffers from this size on: 2 MiB aligned, whole 2 MiB pages */
#define BK_POOL_N 8
#define BK_POOL_ONE ((size_t)32 << 20)
#define BK_POOL_ALL ((size_t)64 << 20)
static struct {
    void *p[BK_POOL_N];
    size_t bytes[BK_POOL_N];
    int lock;
} bk_pool;

static void bk_lock(void) {
    while (__atomic_test_and_set(&bk_pool.lock, __ATOMIC_ACQUIRE)) {
    }
}
static void bk_unlock(void) { __atomic_clear(&bk_pool.lock, __ATOMIC_RELEASE); }

/* The bytes a buffer of `count` floats takes: whole 2 MiB pages from BK_HUGE_FROM on, else whole 64-byte lines. */
static size_t bk_bytes(int64_t count) {
    const size_t bytes = (size_t)((count * (int64_t)sizeof(float) + 63) / 64 * 64);
    return bytes >= BK_HUGE_FROM ? (bytes + BK_HUGE - 1) / BK_HUGE * BK_HUGE : bytes;
}

static float *bk_scratch(int64_t count) {
    const size_t bytes = bk_bytes(count);
    int best = -1;
    bk_lock();
    for (int i = 0; i < BK_POOL_N; i++) /* the smallest kept buffer that is large enough */
        if (bk_pool.p[i] && bk_pool.bytes[i] >= bytes && (best < 0 || bk_pool.bytes[i] < bk_pool.bytes[best]))
            best = i;
    void *p = NULL;
    if (best >= 0) {
        p = bk_pool.p[best];
        bk_pool.p[best] = NULL;
    }
    bk_unlock();
    if (p) return p;
    const int huge = bytes >= BK_HUGE_FROM;
    p = aligned_alloc(huge ? BK_HUGE : 64, bytes);
#ifdef MADV_HUGEPAGE
    if (p && huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
}

/* Hand back a buffer of bk_scratch(count): kept in the pool when there is room, else in place of the smallest kept
 * buffer if that one is smaller (which is freed instead), else freed. */
static void bk_release(float *buf, int64_t count) {
    if (!buf) return;
    void *drop = buf;
    const size_t bytes = bk_bytes(count);
    if (bytes <= BK_POOL_ONE) {
        bk_lock();
        size_t held = 0;
        int slot = -1, small = -1; /* a free slot; the smallest kept buffer */
        for (int i = 0; i < BK_POOL_N; i++) {
            if (!bk_pool.p[i]) {
                if (slot < 0) slot = i;
                continue;
            }
            held += bk_pool.bytes[i];
            if (small < 0 || bk_pool.bytes[i] < bk_pool.bytes[small]) small = i;
        }
        if (slot >= 0 && held + bytes <= BK_POOL_ALL) {
            bk_pool.p[slot] = buf;
            bk_pool.bytes[slot] = bytes;
            drop = NULL;
        } else if (small >= 0 && bk_pool.bytes[small] < bytes && held - bk_pool.bytes[small] + bytes <= BK_POOL_ALL) {
            drop = bk_pool.p[small];
            bk_pool.p[small] = buf;
            bk_pool.bytes[small] = bytes;
        }
        bk_unlock();
    }
    free(drop);
}

int64_t attnkit_scratch_held(void) {
    int64_t held = 0;
    bk_lock();
    for (int i = 0; i < BK_POOL_N; i++)
        if (bk_pool.p[i]) held += (int64_t)bk_pool.bytes[i];
    bk_unlock();
    return held;
}

void attnkit_scratch_release(void) {
    void *p[BK_POOL_N];
    bk_lock();
    for (int i = 0; i < BK_POOL_N; i++) p[i] = bk_pool.p[i], bk_pool.p[i] = NULL;
    bk_unlock();
    for (int i = 0; i < BK_POOL_N; i++) free(p[i]);
}

/* xt (cols x ldt) = the rows [from, r1) of x (rows x cols) transposed into columns from - r0 ..., zero from column
 * r1 - r0 to ldt; the columns of the rows [r0, from) are left to the caller (the vector transpose of band_impl.h
 * writes whole blocks and hands the rest here). */
static void bk_transpose(const float *x, int64_t cols, int64_t r0, int64_t from, int64_t r1, float *xt, int64_t ldt) {
    for (int64_t c = 0; c < cols; c++) memset(xt + c * ldt + (r1 - r0), 0, sizeof(float) * (size_t)(ldt - r1 + r0));
    for (int64_t rb = from; rb < r1; rb += 16) {
        const int64_t re = bk_min(rb + 16, r1);
        for (int64_t c = 0; c < cols; c++)
            for (int64_t r = rb; r < re; r++) xt[c * ldt + (r - r0)] = x[r * cols + c];
    }
}

/* The pattern of one row: which keys each group of query rows may read.
 *   window (row_ptr == NULL): groups are buckets of g = w rows; bucket b reads [(b - lb) w, (b + lf + 1) w);
 *   block-sparse:            groups are query blocks of g = bs rows; block i reads the key blocks
 *                            cols[row_ptr[i] .. row_ptr[i + 1]) (ascending), each [j bs, (j + 1) bs).
 * Keys from kv_len on are never read (right padding); with `causal`, query row i reads keys j <= i only. */
typedef struct {
    int64_t n_q, n_k, kv_len, g, lb, lf;
    int causal;
    const int64_t *row_ptr, *cols;
    const int64_t *part;   /* NULL, or per CSR entry: -1 for a full block, else its block of words in `bits` */
    const uint64_t *bits;  /* (partial blocks, BK_TQ) words: bit j of word i = row i of the tile may see key j */
    float cap2;            /* logit soft-capping in base 2: S = cap2 tanh(S / cap2), cap2 = softcap log2 e; 0: none */
} bk_pat;

/* softcap (natural units; 0 or less: none) as the kernels apply it to base-2 scores: cap2 = softcap log2 e, since
 * log2 e * softcap * tanh(s / softcap) = cap2 * tanh(s log2 e / cap2). */
static inline float bk_cap2(float softcap) { return softcap > 0.0f ? softcap * 1.4426950408889634f : 0.0f; }

/* The next key range [lo, hi) of group `grp` from `*cursor` on (0 at the start): adjacent key blocks of a sparse
 * row come as one range, except that a partial block of a masked pattern is a range of its own (`*part` = its
 * block of words; -1 for every other range). Returns 0 when there is none left. The range is not yet clipped. */
static inline int bk_next_range(const bk_pat *P, int64_t grp, int64_t *cursor, int64_t *lo, int64_t *hi,
                                int64_t *part) {
    *part = -1;
    if (!P->row_ptr) {
        if (*cursor) return 0;
        *cursor = 1;
        *lo = bk_max(0, (grp - P->lb) * P->g);
        *hi = bk_min(P->n_k, (grp + P->lf + 1) * P->g);
        return 1;
    }
    int64_t c = P->row_ptr[grp] + *cursor;
    const int64_t end = P->row_ptr[grp + 1];
    if (c >= end) return 0;
    int64_t last = P->cols[c];
    *lo = last * P->g;
    if (P->part && P->part[c] >= 0)
        *part = P->part[c++];
    else
        for (c++; c < end && P->cols[c] == last + 1 && !(P->part && P->part[c] >= 0); c++) last++;
    *hi = bk_min(P->n_k, (last + 1) * P->g);
    *cursor = c - P->row_ptr[grp];
    return 1;
}

/* The keys [key0, key1) that the groups [g0, g1) may read (key1 = key0 = 0 when none). */
static void bk_pat_keys(const bk_pat *P, int64_t g0, int64_t g1, int64_t *key0, int64_t *key1) {
    *key0 = P->n_k;
    *key1 = 0;
    for (int64_t grp = g0; grp < g1; grp++) {
        int64_t cursor = 0, lo, hi, part;
        while (bk_next_range(P, grp, &cursor, &lo, &hi, &part)) {
            if (hi <= lo) continue;
            *key0 = bk_min(*key0, lo);
            *key1 = bk_max(*key1, hi);
        }
    }
    if (*key1 <= *key0) *key0 = *key1 = 0;
}

/* One query tile: rows [r0, r1) of group grp (t rows). */
typedef struct {
    int64_t grp, r0, r1, t;
} bk_tile;

static inline int bk_tile_next(bk_tile *T, const bk_pat *P, int64_t g1) {
    for (; T->grp < g1; T->grp++, T->r1 = T->grp * P->g) {
        const int64_t row_end = bk_min(P->n_q, (T->grp + 1) * P->g);
        if (T->r1 >= row_end) continue;
        T->r0 = T->r1;
        T->r1 = bk_min(T->r0 + BK_TQ, row_end);
        T->t = T->r1 - T->r0;
        return 1;
    }
    return 0;
}

/* The keys [lo, hi) of a range that the tile may read: real keys only, and none after its last row if causal. */
static inline int bk_clip(const bk_pat *P, const bk_tile *T, int64_t *lo, int64_t *hi) {
    *hi = bk_min(*hi, P->kv_len);
    if (P->causal) *hi = bk_min(*hi, T->r1);
    return *hi > *lo;
}

#define BK_SUFFIX generic
#define BK_VEC 8
#define BK_NV 2
#define BK_MR 4
#include "band_impl.h"
#undef BK_SUFFIX
#undef BK_VEC
#undef BK_NV
#undef BK_MR

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ATTNKIT_PORTABLE)
#define ATTNKIT_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
#define BK_SUFFIX avx512
#define BK_VEC 16
#ifndef BK512_NV
#define BK512_NV 4
#endif
#ifndef BK512_MR
#define BK512_MR 4
#endif
#define BK_NV BK512_NV
#define BK_MR BK512_MR
#include "band_impl.h"
#undef BK_SUFFIX
#undef BK_VEC
#undef BK_NV
#undef BK_MR
#pragma GCC pop_options
#endif

/* 2: AVX-512 body, 1: the build's own target with AVX2, 0: portable C. */
int attnkit_band_isa(void) {
#ifdef ATTNKIT_HAVE_AVX512
    static int isa = -1;
    if (isa < 0) {
        __builtin_cpu_init();
        isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") ? 2 : -2;
    }
    if (isa == 2) return 2;
#endif
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

#ifdef ATTNKIT_HAVE_AVX512
#define BK_DISPATCH(fn, ...) \
    ((isa == 2 && attnkit_band_isa() == 2) ? fn##_avx512(__VA_ARGS__) : fn##_generic(__VA_ARGS__))
#else
#define BK_DISPATCH(fn, ...) ((void)isa, fn##_generic(__VA_ARGS__))
#endif

/* Sliding window: the query buckets [b0, b1) of one row (n queries and keys, the first kv_len of them real). */
int attnkit_band_fwd(const float *q, const float *k, const float *v, float *out, float *lse, int64_t n,
                     int64_t kv_len, int64_t e, int64_t ev, int64_t w, int64_t lb, int64_t lf, int causal, float scale,
                     int64_t b0, int64_t b1, int isa) {
    const bk_pat P = {n, n, kv_len, w, lb, lf, causal, NULL, NULL, NULL, NULL, 0.0f};
    return BK_DISPATCH(attend_fwd, &P, q, k, v, out, lse, e, ev, scale, b0, b1);
}

int attnkit_band_bwd(const float *q, const float *k, const float *v, const float *out, const float *dout,
                     const float *lse, float *dq, float *dk, float *dv, int64_t n, int64_t kv_len, int64_t e,
                     int64_t ev, int64_t w, int64_t lb, int64_t lf, int causal, float scale, int64_t b0, int64_t b1,
                     int isa) {
    const bk_pat P = {n, n, kv_len, w, lb, lf, causal, NULL, NULL, NULL, NULL, 0.0f};
    return BK_DISPATCH(attend_bwd, &P, q, k, v, out, dout, lse, dq, dk, dv, e, ev, scale, b0, b1);
}

/* Block-sparse: the query blocks [g0, g1) of one row (n_q queries, n_k keys, the first kv_len real; blocks of bs),
 * block i reading the key blocks cols[row_ptr[i] .. row_ptr[i + 1]) in ascending order. */
int attnkit_sparse_fwd(const float *q, const float *k, const float *v, float *out, float *lse, int64_t n_q,
                       int64_t n_k, int64_t kv_len, int64_t e, int64_t ev, int64_t bs, const int64_t *row_ptr,
                       const int64_t *cols, int causal, float scale, int64_t g0, int64_t g1, int isa) {
    const bk_pat P = {n_q, n_k, kv_len, bs, 0, 0, causal, row_ptr, cols, NULL, NULL, 0.0f};
    return BK_DISPATCH(attend_fwd, &P, q, k, v, out, lse, e, ev, scale, g0, g1);
}

int attnkit_sparse_bwd(const float *q, const float *k, const float *v, const float *out, const float *dout,
                       const float *lse, float *dq, float *dk, float *dv, int64_t n_q, int64_t n_k, int64_t kv_len,
                       int64_t e, int64_t ev, int64_t bs, const int64_t *row_ptr, const int64_t *cols, int causal,
                       float scale, int64_t g0, int64_t g1, int isa) {
    const bk_pat P = {n_q, n_k, kv_len, bs, 0, 0, causal, row_ptr, cols, NULL, NULL, 0.0f};
    return BK_DISPATCH(attend_bwd, &P, q, k, v, out, dout, lse, dq, dk, dv, e, ev, scale, g0, g1);
}

/* Any mask, from its block description (attnkit.functional.masks.MaskBlocks): query tiles of BK_TQ rows, key blocks
 * of BK_TK keys, block i reading the key blocks cols[row_ptr[i] .. row_ptr[i + 1]) in ascending order; entry c is
 * full (part[c] < 0: the unmasked path) or partial, with the words bits[part[c] * BK_TQ + row] (bit j: the row may
 * attend key j of the block). Partial blocks select, never multiply: a masked score is -inf before the max and its
 * weight and score gradient are 0 by selection, and keys of a partial block that no row of the tile may attend are
 * replaced by zeros in the products, so NaN or inf there never reaches an output or gradient. softcap > 0 caps the
 * scores before the mask, softcap * tanh(s / softcap) (Gemma 2), and the backward multiplies dS by 1 - tanh^2;
 * 0: no cap. Returns -2 when the kernel was built with tiles other than 64 x 64. */
int attnkit_mask_fwd(const float *q, const float *k, const float *v, float *out, float *lse, int64_t n_q, int64_t n_k,
                     int64_t kv_len, int64_t e, int64_t ev, const int64_t *row_ptr, const int64_t *cols,
                     const int64_t *part, const uint64_t *bits, float softcap, float scale, int64_t g0, int64_t g1,
                     int isa) {
    if (BK_TQ != 64 || BK_TK != 64) return -2;
    const bk_pat P = {n_q, n_k, kv_len, BK_TQ, 0, 0, 0, row_ptr, cols, part, bits, bk_cap2(softcap)};
    return BK_DISPATCH(attend_fwd, &P, q, k, v, out, lse, e, ev, scale, g0, g1);
}

int attnkit_mask_bwd(const float *q, const float *k, const float *v, const float *out, const float *dout,
                     const float *lse, float *dq, float *dk, float *dv, int64_t n_q, int64_t n_k, int64_t kv_len,
                     int64_t e, int64_t ev, const int64_t *row_ptr, const int64_t *cols, const int64_t *part,
                     const uint64_t *bits, float softcap, float scale, int64_t g0, int64_t g1, int isa) {
    if (BK_TQ != 64 || BK_TK != 64) return -2;
    const bk_pat P = {n_q, n_k, kv_len, BK_TQ, 0, 0, 0, row_ptr, cols, part, bits, bk_cap2(softcap)};
    return BK_DISPATCH(attend_bwd, &P, q, k, v, out, dout, lse, dq, dk, dv, e, ev, scale, g0, g1);
}

/* The exact softmax weights under a mask (attend_wts in band_impl.h): the query groups [g0, g1) of one row,
 * w (n_q, n_k) row-major, every entry of their rows written (zero where a row may not attend). */
int attnkit_mask_weights(const float *q, const float *k, float *w, int64_t n_q, int64_t n_k, int64_t kv_len, int64_t e,
                         const int64_t *row_ptr, const int64_t *cols, const int64_t *part, const uint64_t *bits,
                         float softcap, float scale, int64_t g0, int64_t g1, int isa) {
    if (BK_TQ != 64 || BK_TK != 64) return -2;
    const bk_pat P = {n_q, n_k, kv_len, BK_TQ, 0, 0, 0, row_ptr, cols, part, bits, bk_cap2(softcap)};
    return BK_DISPATCH(attend_wts, &P, q, k, w, e, scale, g0, g1);
}

/* Run task(ctx, t) for t < ntasks, pulled one at a time by `nthreads` OpenMP threads, the same threads PyTorch's
 * operators run on (one libgomp). Run on threads of its own, a kernel would share the cores with PyTorch's threads
 * while they spin after the operator before it (measured: 20 % slower right after a compiled FlexAttention call).
 * Returns 0, or a nonzero result of one of the tasks. Without OpenMP the tasks run in turn. */
static int bk_run_tasks(int (*task)(const void *ctx, int64_t t), const void *ctx, int64_t ntasks, int nthreads) {
    int err = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < ntasks; t++) {
        const int rc = task(ctx, t);
        if (rc) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            err = rc;
        }
    }
#ifndef _OPENMP
    (void)nthreads;
#endif
    return err;
}

/* The arguments of a whole call under a mask: every row of B*H (see attnkit_mask_fwd_tasks). */
typedef struct {
    const float *q, *k, *v;
    float *out, *lse, *w;
    int64_t n_q, n_k, e, ev, rep, groups;
    const int64_t *kv_len, *row_ptr, *row_of, *cols, *part, *tasks;
    const uint64_t *bits;
    float softcap, scale;
    int isa;
} bk_call;

static int bk_fwd_task(const void *ctx, int64_t t) {
    const bk_call *c = ctx;
    const int64_t row = c->tasks[3 * t], kv = row / c->rep;
    return attnkit_mask_fwd(c->q + row * c->n_q * c->e, c->k + kv * c->n_k * c->e, c->v + kv * c->n_k * c->ev,
                            c->out + row * c->n_q * c->ev, c->lse + row * c->n_q, c->n_q, c->n_k, c->kv_len[row], c->e,
                            c->ev, c->row_ptr + c->row_of[row] * (c->groups + 1), c->cols, c->part, c->bits,
                            c->softcap, c->scale, c->tasks[3 * t + 1], c->tasks[3 * t + 2], c->isa);
}

static int bk_weights_task(const void *ctx, int64_t t) {
    const bk_call *c = ctx;
    const int64_t row = c->tasks[3 * t], kv = row / c->rep;
    return attnkit_mask_weights(c->q + row * c->n_q * c->e, c->k + kv * c->n_k * c->e, c->w + row * c->n_q * c->n_k,
                                c->n_q, c->n_k, c->kv_len[row], c->e, c->row_ptr + c->row_of[row] * (c->groups + 1),
                                c->cols, c->part, c->bits, c->softcap, c->scale, c->tasks[3 * t + 1],
                                c->tasks[3 * t + 2], c->isa);
}

/* The forward of a whole call under a mask: the tasks (row of B*H, first and last query group) tasks[3 t .. 3 t + 2]
 * on PyTorch's OpenMP threads (bk_run_tasks). Row r reads key/value row r / rep, its first kv_len[r] keys, and the
 * description row row_of[r] (row_ptr has groups + 1 entries per description row). */
int attnkit_mask_fwd_tasks(const float *q, const float *k, const float *v, float *out, float *lse, int64_t n_q,
                           int64_t n_k, const int64_t *kv_len, int64_t e, int64_t ev, int64_t rep,
                           const int64_t *row_ptr, const int64_t *row_of, int64_t groups, const int64_t *cols,
                           const int64_t *part, const uint64_t *bits, float softcap, float scale,
                           const int64_t *tasks, int64_t ntasks, int nthreads, int isa) {
    const bk_call c = {q, k, v, out, lse, NULL, n_q, n_k, e, ev, rep, groups, kv_len, row_ptr, row_of, cols, part,
                       tasks, bits, softcap, scale, isa};
    return bk_run_tasks(bk_fwd_task, &c, ntasks, nthreads);
}

/* The exact weights of a whole call under a mask, the tasks as in attnkit_mask_fwd_tasks: w (rows, n_q, n_k). */
int attnkit_mask_weights_tasks(const float *q, const float *k, float *w, int64_t n_q, int64_t n_k,
                               const int64_t *kv_len, int64_t e, int64_t rep, const int64_t *row_ptr,
                               const int64_t *row_of, int64_t groups, const int64_t *cols, const int64_t *part,
                               const uint64_t *bits, float softcap, float scale, const int64_t *tasks,
                               int64_t ntasks, int nthreads, int isa) {
    const bk_call c = {q, k, NULL, NULL, NULL, w, n_q, n_k, e, 0, rep, groups, kv_len, row_ptr, row_of, cols, part,
                       tasks, bits, softcap, scale, isa};
    return bk_run_tasks(bk_weights_task, &c, ntasks, nthreads);
}

/* 1 when the library was built with OpenMP (attnkit_mask_fwd_tasks runs its tasks in parallel), else 0. */
int attnkit_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
