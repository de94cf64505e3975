/* moeport's CPU kernels for half-precision and block-quantized weights (see kernels.c). */
#ifndef MOEPORT_KERNELS_H
#define MOEPORT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Weight formats. The half types are numbered as ONNX's TensorProto data types; the quantized ones are
 * moeport's QLinear/QMoE codes (uint8, 4-bit codes two per byte, the even k in the low nibble) with one
 * float32 scale per block of k: w = (code - 2^(bits-1)) * scale. */
#define MOEPORT_Q4 4
#define MOEPORT_Q8 8
#define MOEPORT_FP16 10
#define MOEPORT_BF16 16
#define MOEPORT_ACT8 0x100 /* or-ed into the serial entry points' dtype: MoeportWeights.act8 */

#define MOEPORT_API __attribute__((visibility("default")))

/* Rows of weights in the checkpoint's [out, in] layout: row r of k values. */
typedef struct {
  int dtype;
  const uint8_t* data;  /* row 0 */
  const float* scales;  /* quantized: row 0's k / block scales */
  int64_t k, block;     /* row length; values per scale (quantized) */
  int act8;             /* 4-bit codes: x may be rounded to int8 per block (AVX2 decode; accuracy level 4) */
} MoeportWeights;

/* Runs fn(data, i) for every i in [0, n), possibly on several threads. */
typedef void (*moeport_parallel_for)(void* ctx, void (*fn)(void*, size_t), size_t n, void* data);

MOEPORT_API const char* moeport_kernels_isa(void);

/* y [m, n] = x [m, k] . w [n, k]^T */
int moeport_linear(const float* x, int64_t m, const MoeportWeights* w, int64_t n, float* y, moeport_parallel_for pfor,
                   void* pctx);

/* y [tokens, hidden] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = idx[t, j];
 * gate_up [experts, 2 * inter, hidden] with gate/up rows interleaved, down [experts, hidden, inter].
 * Returns 0, or -1 with a message in err. */
int moeport_moe(const float* x, int64_t tokens, int64_t hidden, const int64_t* idx, const float* weights, int64_t k,
                const MoeportWeights* gate_up, const MoeportWeights* down, int64_t experts, int64_t inter, float* y,
                moeport_parallel_for pfor, void* pctx, char* err, size_t err_len);

/* out [B, H, S, D]: attention of queries q [B, H, S, D] over the keys kv[b] = [past[b] (P rows) | fresh[b]
 * (S rows)], each a latent row of D values serving as key and value (MLA's absorbed form): scores
 * scale * q . kv[t], key t visible to query s iff allowed[b (or 0 when not batched), s, t] != 0 (T = P + S),
 * softmax over the visible keys; a query that sees no key gets the mean of all T rows (the reference's
 * softmax over equal masked scores). Returns 0, or -1 when out of memory. */
int moeport_latent_attention(const float* q, int64_t batch, int64_t heads, int64_t seq, int64_t dim, const float* past,
                             int64_t past_len, const float* fresh, const uint8_t* allowed, int allowed_batched,
                             float scale, float* out, moeport_parallel_for pfor, void* pctx);

/* The same kernels on the calling thread (for tests through ctypes); scales/block only for quantized
 * dtypes. */
MOEPORT_API int moeport_linear_serial(const float* x, int64_t m, int64_t k, const void* w, const float* scales,
                                      int64_t block, int64_t n, float* y, int dtype);
MOEPORT_API int moeport_moe_serial(const float* x, int64_t tokens, int64_t hidden, const int64_t* idx,
                                   const float* weights, int64_t k, const void* gate_up, const float* gate_up_scales,
                                   const void* down, const float* down_scales, int64_t block, int64_t experts,
                                   int64_t inter, float* y, int dtype, char* err, size_t err_len);

/* y[..., h, s, :] = x[..., h, s, :] . W[h]: x [outer, heads, seq, k] float32, W [heads, k, n] bf16 */
int moeport_heads_matmul(const float* x, int64_t outer, int64_t heads, int64_t seq, int64_t k, const uint16_t* w,
                         int64_t n, float* y, moeport_parallel_for pfor, void* pctx);
MOEPORT_API int moeport_heads_matmul_serial(const float* x, int64_t outer, int64_t heads, int64_t seq, int64_t k,
                                            const uint16_t* w, int64_t n, float* y);

MOEPORT_API int moeport_latent_attention_serial(const float* q, int64_t batch, int64_t heads, int64_t seq, int64_t dim,
                                               const float* past, int64_t past_len, const float* fresh,
                                               const uint8_t* allowed, int allowed_batched, float scale, float* out);

/* Shared by the library's source files (not exported). */
typedef struct {
  void* ptr;
  size_t size;
} MoeportBuffer;
MoeportBuffer moeport_buffer_get(size_t size); /* 64-byte aligned, reused across calls; ptr NULL if out of memory */
void moeport_buffer_put(MoeportBuffer b);
/* A per-thread buffer of at least `bytes`, kept for the thread's next call (NULL if out of memory); one
 * slot per use, so that nested uses never share a buffer. */
enum { MOEPORT_SCRATCH_ROWS = 0, MOEPORT_SCRATCH_TILES = 1, MOEPORT_SCRATCH_ATTENTION = 2, MOEPORT_SCRATCH_SLOTS = 3 };
void* moeport_thread_scratch(int slot, size_t bytes);
/* For tests (ctypes): live threads holding scratch and its bytes; pooled buffers, their bytes and how many
 * buffers the pool has allocated; one get + put of a workspace buffer of `size` bytes. */
MOEPORT_API void moeport_scratch_stats(int64_t* threads, int64_t* bytes);
MOEPORT_API void moeport_pool_stats(int64_t* buffers, int64_t* bytes, int64_t* allocs);
MOEPORT_API void moeport_buffer_cycle(size_t size);
int moeport_has_avx512(void); /* the AVX-512 path is in use (cpu support and MOEPORT_KERNELS_ISA) */
int moeport_has_avx2(void);   /* the AVX2 path (and not AVX-512) is in use */
void moeport_serial_for(void* ctx, void (*fn)(void*, size_t), size_t n, void* data); /* a plain loop */

#endif
