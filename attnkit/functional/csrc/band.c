/* attnkit native sliding-window attention: forward and backward of one row of B*H, exact, in O(N*w).
 *
 * The readable versions are attnkit/functional/local.py (_window_blockwise, and the flash-piece path) and the dense
 * reference attnkit.functional.attention_reference with WindowMask(...).materialize(); tests compare all of them.
 *
 * The window. Positions are cut into buckets of w tokens. Query i (bucket b = i / w) sees the keys of buckets
 * b - lb ... b + lf, and with `causal` only keys j <= i; and only keys j < kv_len (right padding: the keys from
 * kv_len on are never attended, and a query with no key left gives zeros, lse = -inf and zero gradients). One call
 * handles the query buckets [b0, b1) of one row.
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
 * Layout: q, k (n, e), v, out, dout (n, ev) row-major float32, lse (n); e and ev multiples of 16. A call reads the
 * keys [key0, key1) that its buckets can see (key0 = max(0, (b0 - lb) w), key1 = min(n, (b1 + lf) w)) and
 * transposes them into its own buffer. dq is written for the rows of [b0, b1); dk and dv point at key key0 and hold
 * key1 - key0 rows, which the call owns: it zeroes them, then accumulates into them. Single-threaded: the caller
 * runs rows, or bucket ranges of a row with their own dk / dv buffers, in parallel. Returns 0, or -1 when a buffer
 * cannot be allocated.
 *
 * Instruction sets: the body is compiled once for the build's target (AVX2/FMA where _native enables it, portable C
 * otherwise) and, with GCC on x86-64, once more for AVX-512; the entry points pick at run time.
 * A NaN in a key after a query's position inside its last key block reaches that query's output through a zero
 * weight (as in PyTorch's causal flash kernel); keys outside the window are never read.
 */
#include <math.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef BK_TQ
#define BK_TQ 64
#endif
#ifndef BK_TK
#define BK_TK 64
#endif

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

int attnkit_band_fwd(const float *q, const float *k, const float *v, float *out, float *lse, int64_t n,
                     int64_t kv_len, int64_t e, int64_t ev, int64_t w, int64_t lb, int64_t lf, int causal, float scale,
                     int64_t b0, int64_t b1, int isa) {
#ifdef ATTNKIT_HAVE_AVX512
    if (isa == 2 && attnkit_band_isa() == 2)
        return band_fwd_avx512(q, k, v, out, lse, n, kv_len, e, ev, w, lb, lf, causal, scale, b0, b1);
#endif
    (void)isa;
    return band_fwd_generic(q, k, v, out, lse, n, kv_len, e, ev, w, lb, lf, causal, scale, b0, b1);
}

int attnkit_band_bwd(const float *q, const float *k, const float *v, const float *out, const float *dout,
                     const float *lse, float *dq, float *dk, float *dv, int64_t n, int64_t kv_len, int64_t e,
                     int64_t ev, int64_t w, int64_t lb, int64_t lf, int causal, float scale, int64_t b0, int64_t b1,
                     int isa) {
#ifdef ATTNKIT_HAVE_AVX512
    if (isa == 2 && attnkit_band_isa() == 2)
        return band_bwd_avx512(q, k, v, out, dout, lse, dq, dk, dv, n, kv_len, e, ev, w, lb, lf, causal, scale, b0,
                               b1);
#endif
    (void)isa;
    return band_bwd_generic(q, k, v, out, dout, lse, dq, dk, dv, n, kv_len, e, ev, w, lb, lf, causal, scale, b0,
                            b1);
}
