/* attnkit.h: every C entry point of attnkit's native library (decode.c and band.c, built into one library by
 * attnkit/functional/_native.py). Both sources include this header, so the compiler checks each definition against
 * its declaration; tests/test_native_header.py checks each declaration against the ctypes argtypes and restype in
 * _native._declare, so a signature that drifts on either side fails a test.
 *
 * Conventions: float buffers are row-major float32; int64_t sizes; `isa` picks the body (0 portable, 1 AVX2, 2
 * AVX-512) and is lowered to what the CPU has; entry points that return int return 0 on success and nonzero when
 * they could not allocate their tile buffers.
 */
#ifndef ATTNKIT_H
#define ATTNKIT_H

#include <stdint.h>

/* ---- decode.c: a few queries over a long KV cache (dt: 0 float32, 1 bfloat16, 2 float16) ---- */
int attnkit_has_f16(void);
int attnkit_simd(void);
void attnkit_decode_scores(const void *k, int dt, int64_t B, int64_t Hk, int64_t S, int64_t E, int64_t sb,
                           int64_t sh, int64_t ss, const float *q, int64_t R, float *out, int64_t block,
                           int nthreads);
void attnkit_decode_pv(const float *p, const void *v, int dt, int64_t B, int64_t Hk, int64_t S, int64_t Ev,
                       int64_t sb, int64_t sh, int64_t ss, int64_t R, float *part, int64_t nchunk, int nthreads);
void attnkit_decode_fused(const void *k, const void *v, int dt, int64_t B, int64_t Hk, int64_t S, int64_t E,
                          int64_t Ev, int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh, int64_t vs,
                          const float *q, int64_t R, float *acc_out, float *m_out, float *l_out, int64_t nchunk,
                          int nthreads);

/* ---- band.c: the block engine (sliding window, block-sparse layouts, compiled mask blocks) ---- */
int attnkit_band_isa(void);
int attnkit_band_fwd(const float *q, const float *k, const float *v, float *out, float *lse, int64_t n,
                     int64_t kv_len, int64_t e, int64_t ev, int64_t w, int64_t lb, int64_t lf, int causal, float scale,
                     int64_t b0, int64_t b1, int isa);
int attnkit_band_bwd(const float *q, const float *k, const float *v, const float *out, const float *dout,
                     const float *lse, float *dq, float *dk, float *dv, int64_t n, int64_t kv_len, int64_t e,
                     int64_t ev, int64_t w, int64_t lb, int64_t lf, int causal, float scale, int64_t b0, int64_t b1,
                     int isa);
int attnkit_sparse_fwd(const float *q, const float *k, const float *v, float *out, float *lse, int64_t n_q,
                       int64_t n_k, int64_t kv_len, int64_t e, int64_t ev, int64_t bs, const int64_t *row_ptr,
                       const int64_t *cols, int causal, float scale, int64_t g0, int64_t g1, int isa);
int attnkit_sparse_bwd(const float *q, const float *k, const float *v, const float *out, const float *dout,
                       const float *lse, float *dq, float *dk, float *dv, int64_t n_q, int64_t n_k, int64_t kv_len,
                       int64_t e, int64_t ev, int64_t bs, const int64_t *row_ptr, const int64_t *cols, int causal,
                       float scale, int64_t g0, int64_t g1, int isa);
int attnkit_mask_fwd(const float *q, const float *k, const float *v, float *out, float *lse, int64_t n_q, int64_t n_k,
                     int64_t kv_len, int64_t e, int64_t ev, const int64_t *row_ptr, const int64_t *cols,
                     const int64_t *part, const uint64_t *bits, float softcap, float scale, int64_t g0, int64_t g1,
                     int isa);
int attnkit_mask_bwd(const float *q, const float *k, const float *v, const float *out, const float *dout,
                     const float *lse, float *dq, float *dk, float *dv, int64_t n_q, int64_t n_k, int64_t kv_len,
                     int64_t e, int64_t ev, const int64_t *row_ptr, const int64_t *cols, const int64_t *part,
                     const uint64_t *bits, float softcap, float scale, int64_t g0, int64_t g1, int isa);
int attnkit_mask_fwd_tasks(const float *q, const float *k, const float *v, float *out, float *lse, int64_t n_q,
                           int64_t n_k, const int64_t *kv_len, int64_t e, int64_t ev, int64_t rep,
                           const int64_t *row_ptr, const int64_t *row_of, int64_t groups, const int64_t *cols,
                           const int64_t *part, const uint64_t *bits, float softcap, float scale,
                           const int64_t *tasks, int64_t ntasks, int nthreads, int isa);
int attnkit_mask_weights(const float *q, const float *k, float *w, int64_t n_q, int64_t n_k, int64_t kv_len, int64_t e,
                         const int64_t *row_ptr, const int64_t *cols, const int64_t *part, const uint64_t *bits,
                         float softcap, float scale, int64_t g0, int64_t g1, int isa);
int attnkit_mask_weights_tasks(const float *q, const float *k, float *w, int64_t n_q, int64_t n_k,
                               const int64_t *kv_len, int64_t e, int64_t rep, const int64_t *row_ptr,
                               const int64_t *row_of, int64_t groups, const int64_t *cols, const int64_t *part,
                               const uint64_t *bits, float softcap, float scale, const int64_t *tasks,
                               int64_t ntasks, int nthreads, int isa);
int attnkit_openmp(void);
int64_t attnkit_scratch_held(void);
void attnkit_scratch_release(void);

#endif /* ATTNKIT_H */
