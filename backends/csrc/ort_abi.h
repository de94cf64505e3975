/* The few pieces of ONNX Runtime's C ABI that moeport's custom-op library uses, declared by hand.
 *
 * ONNX Runtime's Python wheels ship no C headers, so this file declares only what ort_ops.c calls.
 * The ABI is stable: OrtApi is a table of function pointers that only ever grows at the end, and
 * OrtApiBase::GetApi(version) returns it for any version the runtime supports. Slot numbers below
 * are positions in that table (0-based, counted from ONNX Runtime's public onnxruntime_c_api.h of
 * API version 22 and checked against ONNX Runtime 1.32); the layout of OrtCustomOp is that of its
 * version 16, the first with status-returning kernels.
 */
#ifndef MOEPORT_ORT_ABI_H
#define MOEPORT_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef void (*OrtAnyFn)(void);
typedef struct OrtApi OrtApi; /* opaque: used as an array of function pointers */

typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

/* ONNX tensor element types (TensorProto.DataType) */
enum { ORT_T_FLOAT = 1, ORT_T_UINT8 = 2, ORT_T_INT64 = 7, ORT_T_BOOL = 9, ORT_T_FLOAT16 = 10, ORT_T_BFLOAT16 = 16 };
/* OrtErrorCode */
enum { ORT_E_FAIL = 1, ORT_E_INVALID_ARGUMENT = 2 };

/* OrtApi slots */
enum {
  SLOT_CreateStatus = 0,                 /* OrtStatus* (int code, const char* msg) */
  SLOT_CreateCustomOpDomain = 26,        /* (const char* domain, OrtCustomOpDomain** out) */
  SLOT_CustomOpDomain_Add = 27,          /* (OrtCustomOpDomain*, const OrtCustomOp*) */
  SLOT_AddCustomOpDomain = 28,           /* (OrtSessionOptions*, OrtCustomOpDomain*) */
  SLOT_GetTensorMutableData = 51,        /* (OrtValue*, void** out) */
  SLOT_GetDimensionsCount = 61,          /* (const OrtTensorTypeAndShapeInfo*, size_t* out) */
  SLOT_GetDimensions = 62,               /* (const OrtTensorTypeAndShapeInfo*, int64_t* dims, size_t n) */
  SLOT_GetTensorTypeAndShape = 65,       /* (const OrtValue*, OrtTensorTypeAndShapeInfo** out) */
  SLOT_KernelContext_GetInput = 90,      /* (const OrtKernelContext*, size_t i, const OrtValue** out) */
  SLOT_KernelContext_GetOutput = 91,     /* (OrtKernelContext*, size_t i, const int64_t* dims, size_t n, OrtValue**) */
  SLOT_ReleaseStatus = 93,               /* void (OrtStatus*) */
  SLOT_ReleaseTensorTypeAndShapeInfo = 99, /* void (OrtTensorTypeAndShapeInfo*) */
  SLOT_KernelContext_ParallelFor = 274,  /* (const OrtKernelContext*, void (*fn)(void*, size_t), size_t total,
                                            size_t num_batch, void* data); API 17 */
};
#define MOEPORT_ORT_API_VERSION 17 /* the oldest API with every slot above */

typedef struct OrtCustomOp OrtCustomOp;
struct OrtCustomOp { /* version 16 layout */
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  int (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  int (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);  /* 0: required */
  int (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index); /* 0: required */
  int (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);      /* 0: the provider's default */
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
};

#endif
