/* moeport's kernels as ONNX Runtime custom operators (domain "ai.moeport.cpu").
 *
 *   LinearBf16 / LinearFp16 (x float [..., K], w [N, K])                    -> y float [..., N]
 *   LinearQ8 / LinearQ4 (x float [..., K], codes uint8 [N, K*bits/8], scales float [N, K/block])
 *   MoEBf16 / MoEFp16 (x float [T, H], expert_idx int64 [T, k], expert_weights float [T, k],
 *                      gate_up [E, 2I, H], down [E, H, I])                 -> y float [T, H]
 *   MoEQ8 / MoEQ4 (x, expert_idx, expert_weights, gate_up codes [E, 2I, H*bits/8], gate_up scales
 *                  [E, 2I, H/block], down codes [E, H, I*bits/8], down scales [E, H, I/block])
 *   LatentAttention (q float [B, H, S, D], past float [B, P, D], new float [B, S, D],
 *                    allowed bool [B or 1, 1, S, P + S], scale float [] or [1]) -> float [B, H, S, D]
 *                   (moeport's LatentAttention, exporter/ops.py; kernel in attention.c)
 *
 * Quantized weights are moeport's QLinear/QMoE format (exporter/ops.py); the block size follows from
 * the shapes. The cpu backend rewrites its graph to these operators and loads this library with
 * SessionOptions.register_custom_ops_library. Work runs on the session's intra-op thread pool
 * (KernelContext_ParallelFor).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "ort_abi.h"

static const OrtAnyFn* g_api; /* OrtApi as its table of slots */

#define API(slot, type) ((type)g_api[SLOT_##slot])
typedef OrtStatus* (*Fn_CreateStatus)(int, const char*);
typedef OrtStatus* (*Fn_GetInput)(const OrtKernelContext*, size_t, const OrtValue**);
typedef OrtStatus* (*Fn_GetOutput)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
typedef OrtStatus* (*Fn_GetData)(OrtValue*, void**);
typedef OrtStatus* (*Fn_GetTypeAndShape)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
typedef OrtStatus* (*Fn_GetDimsCount)(const OrtTensorTypeAndShapeInfo*, size_t*);
typedef OrtStatus* (*Fn_GetDims)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
typedef void (*Fn_ReleaseInfo)(OrtTensorTypeAndShapeInfo*);
typedef void (*Fn_ReleaseStatus)(OrtStatus*);
typedef OrtStatus* (*Fn_ParallelFor)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
typedef OrtStatus* (*Fn_CreateDomain)(const char*, OrtCustomOpDomain**);
typedef OrtStatus* (*Fn_DomainAdd)(OrtCustomOpDomain*, const OrtCustomOp*);
typedef OrtStatus* (*Fn_AddDomain)(OrtSessionOptions*, OrtCustomOpDomain*);

#define MAX_RANK 8

static OrtStatus* fail(const char* op, const char* msg) {
  char text[512];
  snprintf(text, sizeof text, "moeport %s: %s", op, msg);
  return API(CreateStatus, Fn_CreateStatus)(ORT_E_INVALID_ARGUMENT, text);
}

#define TRY(expr)                  \
  do {                             \
    OrtStatus* status_ = (expr);   \
    if (status_) return status_;   \
  } while (0)

/* An input's data pointer and shape. */
static OrtStatus* input(OrtKernelContext* ctx, size_t i, void** data, int64_t* dims, size_t* rank) {
  const OrtValue* value = NULL;
  OrtTensorTypeAndShapeInfo* info = NULL;
  TRY(API(KernelContext_GetInput, Fn_GetInput)(ctx, i, &value));
  TRY(API(GetTensorTypeAndShape, Fn_GetTypeAndShape)(value, &info));
  OrtStatus* status = API(GetDimensionsCount, Fn_GetDimsCount)(info, rank);
  if (!status && *rank > MAX_RANK) status = fail("input", "rank above 8");
  if (!status) status = API(GetDimensions, Fn_GetDims)(info, dims, *rank);
  API(ReleaseTensorTypeAndShapeInfo, Fn_ReleaseInfo)(info);
  if (status) return status;
  return API(GetTensorMutableData, Fn_GetData)((OrtValue*)value, data);
}

static OrtStatus* output(OrtKernelContext* ctx, const int64_t* dims, size_t rank, void** data) {
  OrtValue* value = NULL;
  TRY(API(KernelContext_GetOutput, Fn_GetOutput)(ctx, 0, dims, rank, &value));
  return API(GetTensorMutableData, Fn_GetData)(value, data);
}

/* ORT's intra-op pool; if it refuses, the same items run on this thread. */
static void ort_parallel_for(void* ctx, void (*fn)(void*, size_t), size_t n, void* data) {
  if (n > 1) {
    OrtStatus* status = API(KernelContext_ParallelFor, Fn_ParallelFor)((const OrtKernelContext*)ctx, fn, n, 0, data);
    if (!status) return;
    API(ReleaseStatus, Fn_ReleaseStatus)(status);
  }
  for (size_t i = 0; i < n; i++) fn(data, i);
}

/* ---- the operators -------------------------------------------------------------------------- */

enum { OP_LINEAR = 0, OP_MOE = 1, OP_ATTENTION = 2, OP_HEADS = 3 };

typedef struct {
  OrtCustomOp base;
  const char* name;
  int kind;  /* OP_LINEAR, OP_MOE, OP_ATTENTION */
  int dtype; /* weight format: MOEPORT_BF16, _FP16, _Q8, _Q4 (0: none) */
  int act8;  /* the *A8 variants: x may be rounded to int8 per block (see MoeportWeights) */
} MoeportOp;

static int is_quantized(const MoeportOp* op) { return op->dtype == MOEPORT_Q8 || op->dtype == MOEPORT_Q4; }

/* Weights [lead..., rows, k] from a stored tensor (half) or codes + scales (quantized); checks the
 * shapes against k. Returns NULL, or msg holding what is wrong (the caller's buffer: runs on several
 * threads at once). */
enum { MSG_LEN = 256 };
static const char* weights_of(const MoeportOp* op, void* data, const int64_t* dims, size_t rank, void* scales,
                              const int64_t* sdims, size_t srank, int64_t k, MoeportWeights* w, char msg[MSG_LEN]) {
  int64_t cols = dims[rank - 1];
  w->dtype = op->dtype;
  w->act8 = op->act8;
  w->data = (const uint8_t*)data;
  w->scales = (const float*)scales;
  w->k = k;
  w->block = 0;
  if (!is_quantized(op)) {
    if (cols == k) return NULL;
    char shape[96] = "";
    for (size_t i = 0; i < rank; i++)
      snprintf(shape + strlen(shape), sizeof shape - strlen(shape), "%s%lld", i ? ", " : "", (long long)dims[i]);
    snprintf(msg, MSG_LEN, "x has %lld features but the weight [%s] expects %lld", (long long)k, shape,
             (long long)cols);
    return msg;
  }
  int bits = op->dtype;
  int same_lead = srank == rank;
  for (size_t i = 0; same_lead && i + 1 < rank; i++) same_lead = sdims[i] == dims[i];
  if (cols * 8 != k * bits || !same_lead || sdims[srank - 1] < 1 || k % sdims[srank - 1]) {
    snprintf(msg, MSG_LEN,
             "x has %lld features, which %lld-bit codes with %lld bytes per row and %lld scales per row do not fit",
             (long long)k, (long long)bits, (long long)cols, (long long)sdims[srank - 1]);
    return msg;
  }
  w->block = k / sdims[srank - 1];
  if (w->block < 16 || (w->block & (w->block - 1))) {
    snprintf(msg, MSG_LEN, "block size %lld (%lld features / %lld scales) is not a power of two >= 16",
             (long long)w->block, (long long)k, (long long)sdims[srank - 1]);
    return msg;
  }
  return NULL;
}

typedef struct {
  const MoeportOp* op;
} Kernel;

static OrtStatus* linear_compute(const MoeportOp* op, OrtKernelContext* ctx) {
  void *x, *w, *y, *sc = NULL;
  int64_t xd[MAX_RANK], wd[MAX_RANK], yd[MAX_RANK], sd[MAX_RANK] = {0};
  size_t xr, wr, sr = 2;
  TRY(input(ctx, 0, &x, xd, &xr));
  TRY(input(ctx, 1, &w, wd, &wr));
  if (is_quantized(op)) TRY(input(ctx, 2, &sc, sd, &sr));
  if (xr < 1 || wr != 2 || sr != 2)
    return fail(op->name, is_quantized(op) ? "expects x [..., K], codes [N, K*bits/8] and scales [N, K/block]"
                                           : "expects x [..., K] and a 2-D weight [N, K]");
  int64_t k = xd[xr - 1], n = wd[0], m = 1;
  MoeportWeights weights;
  char msg[MSG_LEN];
  const char* bad = weights_of(op, w, wd, wr, sc, sd, sr, k, &weights, msg);
  if (bad) return fail(op->name, bad);
  for (size_t i = 0; i + 1 < xr; i++) {
    m *= xd[i];
    yd[i] = xd[i];
  }
  yd[xr - 1] = n;
  TRY(output(ctx, yd, xr, &y));
  if (moeport_linear((const float*)x, m, &weights, n, (float*)y, ort_parallel_for, ctx))
    return fail(op->name, "out of memory");
  return NULL;
}

static OrtStatus* moe_compute(const MoeportOp* op, OrtKernelContext* ctx) {
  void *x, *idx, *wts, *gu, *dn, *y, *gs = NULL, *ds = NULL;
  int64_t xd[MAX_RANK], id[MAX_RANK], wd[MAX_RANK], gd[MAX_RANK], dd[MAX_RANK], gsd[MAX_RANK] = {0},
      dsd[MAX_RANK] = {0};
  size_t xr, ir, wr, gr, dr, gsr = 3, dsr = 3;
  int q = is_quantized(op);
  TRY(input(ctx, 0, &x, xd, &xr));
  TRY(input(ctx, 1, &idx, id, &ir));
  TRY(input(ctx, 2, &wts, wd, &wr));
  TRY(input(ctx, 3, &gu, gd, &gr));
  if (q) TRY(input(ctx, 4, &gs, gsd, &gsr));
  TRY(input(ctx, q ? 5 : 4, &dn, dd, &dr));
  if (q) TRY(input(ctx, 6, &ds, dsd, &dsr));
  if (xr != 2 || ir != 2 || wr != 2 || gr != 3 || dr != 3 || gsr != 3 || dsr != 3)
    return fail(op->name, q ? "expects x [T, H], expert_idx [T, k], expert_weights [T, k], 3-D gate_up codes and "
                              "scales [E, 2I, ...], 3-D down codes and scales [E, H, ...]"
                            : "expects x [T, H], expert_idx [T, k], expert_weights [T, k], gate_up [E, 2I, H], "
                              "down [E, H, I]");
  int64_t t = xd[0], h = xd[1], k = id[1], e = gd[0], inter = gd[1] / 2;
  /* down's in-dimension (inter) from its stored row length */
  int64_t down_k = q ? dd[2] * 8 / op->dtype : dd[2];
  if (id[0] != t || wd[0] != t || wd[1] != k || gd[1] % 2 || dd[0] != e || dd[1] != h || down_k != inter) {
    char msg[256];
    snprintf(msg, sizeof msg,
             "inconsistent shapes: x [%lld, %lld], expert_idx [%lld, %lld], expert_weights [%lld, %lld], "
             "gate_up [%lld, %lld, %lld], down [%lld, %lld, %lld]",
             (long long)xd[0], (long long)xd[1], (long long)id[0], (long long)id[1], (long long)wd[0],
             (long long)wd[1], (long long)gd[0], (long long)gd[1], (long long)gd[2], (long long)dd[0],
             (long long)dd[1], (long long)dd[2]);
    return fail(op->name, msg);
  }
  MoeportWeights gate_up, down;
  char msg[MSG_LEN];
  const char* bad = weights_of(op, gu, gd, gr, gs, gsd, gsr, h, &gate_up, msg);
  if (!bad) bad = weights_of(op, dn, dd, dr, ds, dsd, dsr, inter, &down, msg);
  if (bad) return fail(op->name, bad);
  if (q && gate_up.block != down.block) return fail(op->name, "gate_up and down have different block sizes");
  TRY(output(ctx, xd, 2, &y));
  char err[256] = "";
  if (moeport_moe((const float*)x, t, h, (const int64_t*)idx, (const float*)wts, k, &gate_up, &down, e, inter,
                  (float*)y, ort_parallel_for, ctx, err, sizeof err))
    return fail(op->name, err);
  return NULL;
}

static OrtStatus* attention_compute(const MoeportOp* op, OrtKernelContext* ctx) {
  void *q, *past, *fresh, *allowed, *scale, *y;
  int64_t qd[MAX_RANK], pd[MAX_RANK], nd[MAX_RANK], ad[MAX_RANK], sd[MAX_RANK];
  size_t qr, pr, nr, ar, sr;
  TRY(input(ctx, 0, &q, qd, &qr));
  TRY(input(ctx, 1, &past, pd, &pr));
  TRY(input(ctx, 2, &fresh, nd, &nr));
  TRY(input(ctx, 3, &allowed, ad, &ar));
  TRY(input(ctx, 4, &scale, sd, &sr));
  if (qr != 4 || pr != 3 || nr != 3 || ar != 4 || sr > 1 || (sr == 1 && sd[0] != 1))
    return fail(op->name, "expects q [B, H, S, D], past [B, P, D], new [B, S, D], allowed [B, 1, S, P + S] and a "
                          "scalar scale");
  int64_t b = qd[0], h = qd[1], s = qd[2], d = qd[3], p = pd[1];
  if (pd[0] != b || pd[2] != d || nd[0] != b || nd[1] != s || nd[2] != d || (ad[0] != b && ad[0] != 1) ||
      ad[1] != 1 || ad[2] != s || ad[3] != p + s) {
    char msg[320];
    snprintf(msg, sizeof msg,
             "inconsistent shapes: q [%lld, %lld, %lld, %lld], past [%lld, %lld, %lld], new [%lld, %lld, %lld], "
             "allowed [%lld, %lld, %lld, %lld]",
             (long long)b, (long long)h, (long long)s, (long long)d, (long long)pd[0], (long long)pd[1],
             (long long)pd[2], (long long)nd[0], (long long)nd[1], (long long)nd[2], (long long)ad[0],
             (long long)ad[1], (long long)ad[2], (long long)ad[3]);
    return fail(op->name, msg);
  }
  TRY(output(ctx, qd, 4, &y));
  if (moeport_latent_attention((const float*)q, b, h, s, d, (const float*)past, p, (const float*)fresh,
                               (const uint8_t*)allowed, ad[0] == b && b > 1, *(const float*)scale, (float*)y,
                               ort_parallel_for, ctx))
    return fail(op->name, "out of memory");
  return NULL;
}

/* HeadsMatMulBf16(x [..., H, S, K], w [H, K, N] bf16) -> [..., H, S, N] */
static OrtStatus* heads_compute(const MoeportOp* op, OrtKernelContext* ctx) {
  void *x, *w, *y;
  int64_t xd[MAX_RANK], wd[MAX_RANK], yd[MAX_RANK];
  size_t xr, wr;
  TRY(input(ctx, 0, &x, xd, &xr));
  TRY(input(ctx, 1, &w, wd, &wr));
  if (xr < 3 || wr != 3 || xd[xr - 3] != wd[0] || xd[xr - 1] != wd[1]) {
    char msg[MSG_LEN];
    snprintf(msg, sizeof msg, "expects x [..., H, S, K] and w [H, K, N]; got x of rank %zu with H=%lld, K=%lld and w "
             "[%lld, %lld, %lld]", xr, (long long)(xr >= 3 ? xd[xr - 3] : -1), (long long)(xr ? xd[xr - 1] : -1),
             (long long)wd[0], (long long)(wr > 1 ? wd[1] : -1), (long long)(wr > 2 ? wd[2] : -1));
    return fail(op->name, msg);
  }
  int64_t outer = 1;
  for (size_t i = 0; i + 3 < xr; i++) outer *= xd[i];
  memcpy(yd, xd, xr * sizeof(int64_t));
  yd[xr - 1] = wd[2];
  TRY(output(ctx, yd, xr, &y));
  moeport_heads_matmul((const float*)x, outer, wd[0], xd[xr - 2], wd[1], (const uint16_t*)w, wd[2], (float*)y,
                       ort_parallel_for, ctx);
  return NULL;
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const MoeportOp* op = ((Kernel*)kernel)->op;
  switch (op->kind) {
    case OP_MOE: return moe_compute(op, ctx);
    case OP_ATTENTION: return attention_compute(op, ctx);
    case OP_HEADS: return heads_compute(op, ctx);
    default: return linear_compute(op, ctx);
  }
}

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  (void)api;
  (void)info;
  Kernel* kernel = (Kernel*)malloc(sizeof(Kernel));
  if (!kernel) return fail(((const MoeportOp*)op)->name, "out of memory");
  kernel->op = (const MoeportOp*)op;
  *out = kernel;
  return NULL;
}

static void destroy_kernel(void* kernel) { free(kernel); }
static const char* op_name(const OrtCustomOp* op) { return ((const MoeportOp*)op)->name; }
static const char* op_provider(const OrtCustomOp* op) {
  (void)op;
  return "CPUExecutionProvider";
}
static size_t op_inputs(const OrtCustomOp* base) {
  const MoeportOp* op = (const MoeportOp*)base;
  if (op->kind == OP_ATTENTION) return 5;
  if (op->kind == OP_HEADS) return 2;
  return (op->kind == OP_MOE ? 5 : 2) + (is_quantized(op) ? (op->kind == OP_MOE ? 2 : 1) : 0);
}
static size_t op_outputs(const OrtCustomOp* op) {
  (void)op;
  return 1;
}
static int op_input_type(const OrtCustomOp* base, size_t i) {
  const MoeportOp* op = (const MoeportOp*)base;
  if (op->kind == OP_ATTENTION) return i == 3 ? ORT_T_BOOL : ORT_T_FLOAT;
  if (op->kind == OP_HEADS) return i == 1 ? ORT_T_BFLOAT16 : ORT_T_FLOAT;
  size_t first = op->kind == OP_MOE ? 3 : 1; /* inputs before the weights */
  static const int moe_types[3] = {ORT_T_FLOAT, ORT_T_INT64, ORT_T_FLOAT};
  if (i < first) return op->kind == OP_MOE ? moe_types[i] : ORT_T_FLOAT;
  if (!is_quantized(op)) return op->dtype;
  return (i - first) % 2 ? ORT_T_FLOAT : ORT_T_UINT8; /* codes, scales[, codes, scales] */
}
static int op_output_type(const OrtCustomOp* op, size_t i) {
  (void)op;
  (void)i;
  return ORT_T_FLOAT;
}
static int op_required(const OrtCustomOp* op, size_t i) {
  (void)op;
  (void)i;
  return 0;
}

#define MOEPORT_OP_A(NAME, KIND, DTYPE, ACT8)                                                               \
  {                                                                                                           \
    {16,          NULL,          op_name,     op_provider, op_input_type, op_inputs, op_output_type, op_outputs, \
     NULL,        destroy_kernel, op_required, op_required, op_required, NULL,      NULL,          NULL,         \
     NULL,        create_kernel, compute},                                                                    \
        NAME, KIND, DTYPE, ACT8                                                                               \
  }
#define MOEPORT_OP(NAME, KIND, DTYPE) MOEPORT_OP_A(NAME, KIND, DTYPE, 0)

static MoeportOp g_ops[] = {
    MOEPORT_OP("LinearBf16", OP_LINEAR, ORT_T_BFLOAT16),
    MOEPORT_OP("LinearFp16", OP_LINEAR, ORT_T_FLOAT16),
    MOEPORT_OP("MoEBf16", OP_MOE, ORT_T_BFLOAT16),
    MOEPORT_OP("MoEFp16", OP_MOE, ORT_T_FLOAT16),
    MOEPORT_OP("LinearQ8", OP_LINEAR, MOEPORT_Q8),
    MOEPORT_OP("LinearQ4", OP_LINEAR, MOEPORT_Q4),
    MOEPORT_OP("MoEQ8", OP_MOE, MOEPORT_Q8),
    MOEPORT_OP("MoEQ4", OP_MOE, MOEPORT_Q4),
    MOEPORT_OP_A("LinearQ4A8", OP_LINEAR, MOEPORT_Q4, 1),
    MOEPORT_OP_A("MoEQ4A8", OP_MOE, MOEPORT_Q4, 1),
    MOEPORT_OP("LatentAttention", OP_ATTENTION, 0),
    MOEPORT_OP("HeadsMatMulBf16", OP_HEADS, ORT_T_BFLOAT16),
};

MOEPORT_API OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(MOEPORT_ORT_API_VERSION);
  if (!api) {
    fprintf(stderr, "moeport kernels: ONNX Runtime %s is older than 1.%d\n", base->GetVersionString(),
            MOEPORT_ORT_API_VERSION);
    api = base->GetApi(1);
    if (!api) return NULL;
    Fn_CreateStatus create_status = (Fn_CreateStatus)((const OrtAnyFn*)api)[SLOT_CreateStatus];
    return create_status(ORT_E_FAIL, "moeport kernels need ONNX Runtime >= 1.17");
  }
  g_api = (const OrtAnyFn*)api;
  OrtCustomOpDomain* domain = NULL;
  TRY(API(CreateCustomOpDomain, Fn_CreateDomain)("ai.moeport.cpu", &domain));
  for (size_t i = 0; i < sizeof g_ops / sizeof g_ops[0]; i++)
    TRY(API(CustomOpDomain_Add, Fn_DomainAdd)(domain, &g_ops[i].base));
  /* the domain lives as long as the process: sessions may outlive the options that registered it */
  return API(AddCustomOpDomain, Fn_AddDomain)(options, domain);
}
