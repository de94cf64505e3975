/* moeport's CPU kernels for half-precision weights (see kernels.c). */
#ifndef MOEPORT_KERNELS_H
#define MOEPORT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Weight dtypes, numbered as ONNX's TensorProto data types. */
#define MOEPORT_FP16 10
#define MOEPORT_BF16 16

#define MOEPORT_API __attribute__((visibility("default")))

/* Runs fn(data, i) for every i in [0, n), possibly on several threads. */
typedef void (*moeport_parallel_for)(void* ctx, void (*fn)(void*, size_t), size_t n, void* data);

MOEPORT_API const char* moeport_kernels_isa(void);

/* y [m, n] = x [m, k] . w [n, k]^T */
int moeport_linear(const float* x, int64_t m, int64_t k, const uint16_t* w, int64_t n, float* y, int dtype,
                   moeport_parallel_for pfor, void* pctx);

/* y [tokens, hidden] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = idx[t, j];
 * gate_up [experts, 2 * inter, hidden] with gate/up rows interleaved, down [experts, hidden, inter].
 * Returns 0, or -1 with a message in err. */
int moeport_moe(const float* x, int64_t tokens, int64_t hidden, const int64_t* idx, const float* weights, int64_t k,
                const uint16_t* gate_up, const uint16_t* down, int64_t experts, int64_t inter, float* y, int dtype,
                moeport_parallel_for pfor, void* pctx, char* err, size_t err_len);

/* The same kernels on the calling thread (for tests through ctypes). */
MOEPORT_API int moeport_linear_serial(const float* x, int64_t m, int64_t k, const uint16_t* w, int64_t n, float* y,
                                      int dtype);
MOEPORT_API int moeport_moe_serial(const float* x, int64_t tokens, int64_t hidden, const int64_t* idx,
                                   const float* weights, int64_t k, const uint16_t* gate_up, const uint16_t* down,
                                   int64_t experts, int64_t inter, float* y, int dtype, char* err, size_t err_len);

#endif
