/* moeport's CPU kernels for half-precision (bf16 / fp16) and block-quantized (int8 / int4) weights.
 *
 * ONNX Runtime's CPU execution provider has no bf16 MatMul, so without these a bf16 artifact is
 * widened to float32 when a session loads (twice the bytes read per token); its int8/int4 kernels
 * pre-pack a second copy of the weights and, at their fast accuracy level, round activations to 8
 * bits. These kernels read the stored weights in place: half-precision ones are widened in registers,
 * quantized ones dequantized (code - zero) * scale as they stream; accumulation is float32.
 *
 *   moeport_linear: y[M, N] = x[M, K] . W[N, K]^T            (W in the checkpoint's [out, in] layout)
 *   moeport_moe:    DeepSeek's routed experts, the chosen experts only (see exporter/ops.py ``MoE``)
 *
 * Work is split into independent items run through a caller-given parallel-for (ONNX Runtime's
 * intra-op thread pool in ort_ops.c, a plain loop for tests). Code paths, chosen at run time: the
 * portable C one everywhere; AVX-512 on x86-64; AVX512-VNNI byte products for decode-sized products
 * (<= 4 rows) with quantized weights; AMX-BF16 tiles for larger products with bf16 or quantized
 * weights.
 */
#include "kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define MOEPORT_X86 1
#include <immintrin.h>
#endif

#define INLINE_ANY static inline __attribute__((always_inline))

/* ---- half -> float ------------------------------------------------------------------------ */

static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13); /* inf / nan */
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else { /* subnormal: normalise */
    exp = 113;
    while (!(mant & 0x400)) {
      mant <<= 1;
      exp--;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* ---- per-thread scratch -------------------------------------------------------------------
 * Each thread's buffers live in one ThreadScratch, found through a __thread pointer (the fast path:
 * one load and a compare) and registered under a pthread key whose destructor frees them when the
 * thread exits (ONNX Runtime pool threads of a closed session, Python threads that ran a model). */

typedef struct {
  void* buf[MOEPORT_SCRATCH_SLOTS];
  size_t cap[MOEPORT_SCRATCH_SLOTS];
} ThreadScratch;

static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;
static int g_scratch_key_ok;
static __thread ThreadScratch* t_scratch;
static int64_t g_scratch_threads, g_scratch_bytes; /* live, for moeport_scratch_stats (atomics) */

static void scratch_free(void* p) {
  ThreadScratch* s = (ThreadScratch*)p;
  size_t bytes = 0;
  for (int i = 0; i < MOEPORT_SCRATCH_SLOTS; i++) {
    free(s->buf[i]);
    bytes += s->cap[i];
  }
  free(s);
  __atomic_sub_fetch(&g_scratch_bytes, (int64_t)bytes, __ATOMIC_RELAXED);
  __atomic_sub_fetch(&g_scratch_threads, 1, __ATOMIC_RELAXED);
}

static void scratch_key_init(void) { g_scratch_key_ok = pthread_key_create(&g_scratch_key, scratch_free) == 0; }

/* The library may be unloaded while threads that used it live on: their destructor must not run then
 * (its code is gone); their scratch is left to the process. */
__attribute__((destructor)) static void scratch_key_delete(void) {
  if (g_scratch_key_ok) pthread_key_delete(g_scratch_key);
}

/* A per-thread buffer of at least `bytes`, grown on demand and kept (slot: one buffer per use). */
void* moeport_thread_scratch(int slot, size_t bytes) {
  ThreadScratch* s = t_scratch;
  if (!s) {
    pthread_once(&g_scratch_once, scratch_key_init);
    if (!g_scratch_key_ok || !(s = (ThreadScratch*)calloc(1, sizeof *s))) return NULL;
    if (pthread_setspecific(g_scratch_key, s)) {
      free(s);
      return NULL;
    }
    t_scratch = s;
    __atomic_add_fetch(&g_scratch_threads, 1, __ATOMIC_RELAXED);
  }
  if (bytes > s->cap[slot]) {
    size_t rounded = (bytes + 63) & ~(size_t)63;
    free(s->buf[slot]);
    s->buf[slot] = aligned_alloc(64, rounded);
    __atomic_add_fetch(&g_scratch_bytes, (int64_t)(s->buf[slot] ? rounded : 0) - (int64_t)s->cap[slot],
                       __ATOMIC_RELAXED);
    s->cap[slot] = s->buf[slot] ? rounded : 0;
  }
  return s->buf[slot];
}

void moeport_scratch_stats(int64_t* threads, int64_t* bytes) {
  *threads = __atomic_load_n(&g_scratch_threads, __ATOMIC_RELAXED);
  *bytes = __atomic_load_n(&g_scratch_bytes, __ATOMIC_RELAXED);
}

/* ---- weight rows -------------------------------------------------------------------------- */

static inline int quantized(int dtype) { return dtype == MOEPORT_Q4 || dtype == MOEPORT_Q8; }

static inline int64_t row_bytes(const MoeportWeights* w) {
  return w->dtype == MOEPORT_Q4 ? w->k / 2 : w->dtype == MOEPORT_Q8 ? w->k : 2 * w->k;
}

/* The same weights from row r on. */
static inline MoeportWeights rows_from(const MoeportWeights* w, int64_t r) {
  MoeportWeights out = *w;
  out.data += r * row_bytes(w);
  if (quantized(w->dtype)) out.scales += r * (w->k / w->block);
  return out;
}

/* Row n of w as float32. */
static void widen_generic(const MoeportWeights* w, int64_t n, float* dst) {
  const uint8_t* row = w->data + n * row_bytes(w);
  int64_t k = w->k;
  if (quantized(w->dtype)) {
    const float* sc = w->scales + n * (k / w->block);
    for (int64_t i = 0; i < k; i++) {
      int code = w->dtype == MOEPORT_Q8 ? row[i] - 128 : ((row[i / 2] >> (4 * (i & 1))) & 15) - 8;
      dst[i] = (float)code * sc[i / w->block];
    }
  } else if (w->dtype == MOEPORT_BF16) {
    for (int64_t i = 0; i < k; i++) dst[i] = bf16_to_f32(((const uint16_t*)row)[i]);
  } else {
    for (int64_t i = 0; i < k; i++) dst[i] = f16_to_f32(((const uint16_t*)row)[i]);
  }
}

/* ---- portable GEMM: y[m, n] = sum_k x[m, k] w[n, k] for n in [0, rows) ------------------------ */

static void gemm_generic(const float* x, int64_t m_rows, int64_t ldx, const MoeportWeights* w, int64_t rows, float* y,
                         int64_t ldy, float* scratch) {
  for (int64_t n = 0; n < rows; n++) {
    widen_generic(w, n, scratch);
    for (int64_t m = 0; m < m_rows; m++) {
      const float* xr = x + m * ldx;
      float acc = 0.f;
      for (int64_t i = 0; i < w->k; i++) acc += xr[i] * scratch[i];
      y[m * ldy + n] = acc;
    }
  }
}

/* ---- AVX-512 GEMM ---------------------------------------------------------------------------- */
#ifdef MOEPORT_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define INLINE static inline __attribute__((always_inline))

/* 16 weights of a row from element i (masked for half types; quantized k is a multiple of 16), as float
 * (quantized: the codes less their zero point, to be multiplied by the block's scale). */
AVX512 INLINE __m512 load_w16(const uint8_t* row, int64_t i, int dtype, __mmask16 mask) {
  if (dtype == MOEPORT_Q8) {
    __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + i)));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(c, _mm512_set1_epi32(128)));
  }
  if (dtype == MOEPORT_Q4) { /* 8 bytes: each byte twice, then its low nibble in even lanes, high in odd */
    __m128i b = _mm_loadl_epi64((const __m128i*)(row + i / 2));
    __m512i c = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
    c = _mm512_srlv_epi32(c, _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
    c = _mm512_and_si512(c, _mm512_set1_epi32(15));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(c, _mm512_set1_epi32(8)));
  }
  __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t*)row + i);
  if (dtype == MOEPORT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

/* 16 weights [i, i + 16) of a row as float32; quantized: sc = the row's scales, 2^sh values per scale. */
AVX512 INLINE __m512 weight16(const uint8_t* row, const float* sc, int sh, int64_t i, int dtype, __mmask16 mask) {
  __m512 v = load_w16(row, i, dtype, mask);
  if (dtype == MOEPORT_Q4 || dtype == MOEPORT_Q8) v = _mm512_mul_ps(v, _mm512_set1_ps(sc[i >> sh]));
  return v;
}

static inline const float* row_scales(const MoeportWeights* w, int64_t n) {
  return quantized(w->dtype) ? w->scales + n * (w->k / w->block) : NULL;
}

static inline int block_shift(const MoeportWeights* w) {
  return quantized(w->dtype) ? __builtin_ctzll((unsigned long long)w->block) : 0;
}

/* MR rows of x against 4 rows of W, all of K. The rows are either the stored ones (w, dtype: widened
 * and scaled in registers as they stream) or 4 already widened float rows (w NULL: wf, the scratch of
 * widen_rows, zero-padded to row stride ldw). */
AVX512 INLINE void tile(const float* x, int64_t ldx, const MoeportWeights* w, const float* wf, int64_t ldw, int64_t k,
                        float* y, int64_t ldy, int mr, int nr, int dtype, int prefetch) {
  __m512 acc[4][4];
  /* stored bytes per 16 weights: prefetch a line per row every 64 bytes of its stream, 2 KB ahead */
  const int64_t every = dtype == MOEPORT_Q4 ? 127 : dtype == MOEPORT_Q8 ? 63 : 31;
#pragma GCC unroll 4
  for (int m = 0; m < 4; m++)
#pragma GCC unroll 4
    for (int n = 0; n < 4; n++) acc[m][n] = _mm512_setzero_ps();
  const uint8_t* rows[4] = {NULL, NULL, NULL, NULL};
  const float* sc[4] = {NULL, NULL, NULL, NULL};
  int sh = w ? block_shift(w) : 0;
  if (w)
    for (int n = 0; n < nr; n++) {
      rows[n] = w->data + n * row_bytes(w);
      sc[n] = row_scales(w, n);
    }
  for (int64_t i = 0; i < k; i += 16) {
    __mmask16 mask = (k - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1);
    __m512 wv[4];
    if (w) {
      if (prefetch && !(i & every)) {
        int64_t ahead = dtype == MOEPORT_Q4 ? i / 2 : dtype == MOEPORT_Q8 ? i : 2 * i;
#pragma GCC unroll 4
        for (int n = 0; n < 4; n++) _mm_prefetch((const char*)(rows[n] + ahead + 2048), _MM_HINT_T0);
      }
#pragma GCC unroll 4
      for (int n = 0; n < 4; n++) wv[n] = n < nr ? weight16(rows[n], sc[n], sh, i, dtype, mask) : _mm512_setzero_ps();
    } else {
#pragma GCC unroll 4
      for (int n = 0; n < 4; n++) wv[n] = _mm512_load_ps(wf + n * ldw + i);
    }
#pragma GCC unroll 4
    for (int m = 0; m < 4; m++) {
      if (m < mr) {
        __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + i);
#pragma GCC unroll 4
        for (int n = 0; n < 4; n++) acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < 4; m++)
#pragma GCC unroll 4
    for (int n = 0; n < 4; n++)
      if (m < mr && n < nr) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m][n]);
}

AVX512 INLINE void widen_rows(const MoeportWeights* w, int64_t nr, float* dst, int64_t kp, int dtype) {
  int sh = block_shift(w);
  for (int64_t n = 0; n < 4; n++) {
    const uint8_t* row = w->data + (n < nr ? n : 0) * row_bytes(w);
    const float* sc = row_scales(w, n < nr ? n : 0);
    for (int64_t i = 0; i < kp; i += 16) {
      __mmask16 mask = 0;
      if (n < nr && i < w->k) mask = (w->k - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (w->k - i)) - 1);
      _mm512_store_ps(dst + n * kp + i, mask ? weight16(row, sc, sh, i, dtype, mask) : _mm512_setzero_ps());
    }
  }
}

AVX512 INLINE void gemm_avx512_t(const float* x, int64_t m_rows, int64_t ldx, const MoeportWeights* w0, int64_t rows,
                                 float* y, int64_t ldy, int dtype, float* scratch) {
  int64_t k = w0->k, kp = (k + 15) & ~(int64_t)15;
  for (int64_t n = 0; n < rows; n += 4) {
    int nr = rows - n < 4 ? (int)(rows - n) : 4;
    MoeportWeights wn = rows_from(w0, n);
    if (m_rows <= 4) { /* decode-sized: stream the weights once, widening in registers */
      int more = rows - n >= 8; /* prefetching past the last rows would read past the weights */
      switch (m_rows) {
        case 1: tile(x, ldx, &wn, NULL, 0, k, y + n, ldy, 1, nr, dtype, more); break;
        case 2: tile(x, ldx, &wn, NULL, 0, k, y + n, ldy, 2, nr, dtype, more); break;
        case 3: tile(x, ldx, &wn, NULL, 0, k, y + n, ldy, 3, nr, dtype, more); break;
        default: tile(x, ldx, &wn, NULL, 0, k, y + n, ldy, 4, nr, dtype, more); break;
      }
      continue;
    }
    /* more rows: widen these 4 weight rows once, then reuse them for every 4 rows of x */
    widen_rows(&wn, nr, scratch, kp, dtype);
    int64_t m = 0;
    for (; m + 4 <= m_rows; m += 4) tile(x + m * ldx, ldx, NULL, scratch, kp, k, y + m * ldy + n, ldy, 4, nr, 0, 0);
    switch (m_rows - m) {
      case 1: tile(x + m * ldx, ldx, NULL, scratch, kp, k, y + m * ldy + n, ldy, 1, nr, 0, 0); break;
      case 2: tile(x + m * ldx, ldx, NULL, scratch, kp, k, y + m * ldy + n, ldy, 2, nr, 0, 0); break;
      case 3: tile(x + m * ldx, ldx, NULL, scratch, kp, k, y + m * ldy + n, ldy, 3, nr, 0, 0); break;
      default: break;
    }
  }
}

/* one instance per weight format, each with its loads inlined */
#define GEMM_AVX512(NAME, DTYPE)                                                                           \
  AVX512 static void NAME(const float* x, int64_t m_rows, int64_t ldx, const MoeportWeights* w, int64_t rows, \
                          float* y, int64_t ldy, float* scratch) {                                           \
    gemm_avx512_t(x, m_rows, ldx, w, rows, y, ldy, DTYPE, scratch);                                          \
  }
GEMM_AVX512(gemm_avx512_bf16, MOEPORT_BF16)
GEMM_AVX512(gemm_avx512_f16, MOEPORT_FP16)
GEMM_AVX512(gemm_avx512_q8, MOEPORT_Q8)
GEMM_AVX512(gemm_avx512_q4, MOEPORT_Q4)

/* ---- AVX2 GEMM (x86-64 without AVX-512: AMD Zen 1-3, Intel before Skylake-SP, ...) -------------
 * The float path widens weights in registers as the AVX-512 one does, 8 at a time: tiles of MR rows
 * of x against NR weight rows (MR x NR <= 8 accumulators of the 16 registers). Quantized decode-sized
 * products (<= 4 rows of x, block >= 32 for int4) take an integer path instead: x is rounded per
 * block to int16 (to 1/32383 of the block's largest value, as the VNNI path does), the codes are
 * widened to int16 and multiplied pairwise into int32 (vpmaddwd), and each block's sum is scaled
 * once: two-thirds fewer instructions per weight than dequantizing to float, which is what keeps a
 * 2-core AVX2 machine at its memory bandwidth. */
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* 8 weights [i, i + 8) of a row as float (quantized: the codes less their zero point). */
AVX2 INLINE __m256 load_w8(const uint8_t* row, int64_t i, int dtype) {
  if (dtype == MOEPORT_Q8) {
    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + i)));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(c, _mm256_set1_epi32(128)));
  }
  if (dtype == MOEPORT_Q4) { /* 4 bytes: each byte twice, then its low nibble in even lanes, high in odd */
    int32_t b;
    memcpy(&b, row + i / 2, 4);
    __m128i v = _mm_cvtsi32_si128(b);
    __m256i c = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(v, v));
    c = _mm256_and_si256(_mm256_srlv_epi32(c, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)), _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(c, _mm256_set1_epi32(8)));
  }
  __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)row + i));
  if (dtype == MOEPORT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

/* Element i of a stored row as float (the tail of half-precision rows whose k is not a multiple of 8). */
static inline float weight1(const uint8_t* row, const float* sc, int sh, int64_t i, int dtype) {
  if (dtype == MOEPORT_Q8) return (float)(row[i] - 128) * sc[i >> sh];
  if (dtype == MOEPORT_Q4) return (float)(((row[i / 2] >> (4 * (i & 1))) & 15) - 8) * sc[i >> sh];
  uint16_t h = ((const uint16_t*)row)[i];
  return dtype == MOEPORT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

/* MR rows of x against NR rows of W (stored: w; or already widened: wf with row stride ldw, zero-padded
 * to a multiple of 8). Rows of W past nr repeat row nr - 1 and are not stored. */
AVX2 INLINE void tile_avx2(const float* x, int64_t ldx, const MoeportWeights* w, const float* wf, int64_t ldw,
                           int64_t k, float* y, int64_t ldy, const int MR, const int NR, int nr, int dtype) {
  __m256 acc[4][4];
  #pragma GCC unroll 4
  for (int m = 0; m < MR; m++)
    #pragma GCC unroll 4
    for (int n = 0; n < NR; n++) acc[m][n] = _mm256_setzero_ps();
  const uint8_t* rows[4] = {NULL, NULL, NULL, NULL};
  const float* sc[4] = {NULL, NULL, NULL, NULL};
  int sh = w ? block_shift(w) : 0;
  if (w)
    #pragma GCC unroll 4
    for (int n = 0; n < NR; n++) {
      int r = n < nr ? n : nr - 1;
      rows[n] = w->data + r * row_bytes(w);
      sc[n] = row_scales(w, r);
    }
  int64_t k8 = w ? k & ~(int64_t)7 : (k + 7) & ~(int64_t)7;
  int q = dtype == MOEPORT_Q4 || dtype == MOEPORT_Q8;
  for (int64_t i = 0; i < k8; i += 8) {
    __m256 wv[4];
    #pragma GCC unroll 4
    for (int n = 0; n < NR; n++) {
      if (w) {
        wv[n] = load_w8(rows[n], i, dtype);
        if (q) wv[n] = _mm256_mul_ps(wv[n], _mm256_set1_ps(sc[n][i >> sh]));
      } else {
        wv[n] = _mm256_load_ps(wf + n * ldw + i);
      }
    }
    #pragma GCC unroll 4
    for (int m = 0; m < MR; m++) {
      __m256 xv;
      if (w || i + 8 <= k) {
        xv = _mm256_loadu_ps(x + m * ldx + i);
      } else { /* the zero-padded end of widened rows: read only x's own values */
        float t[8] = {0};
        memcpy(t, x + m * ldx + i, (size_t)(k - i) * sizeof(float));
        xv = _mm256_loadu_ps(t);
      }
      #pragma GCC unroll 4
      for (int n = 0; n < NR; n++) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  #pragma GCC unroll 4
  for (int m = 0; m < MR; m++)
    #pragma GCC unroll 4
    for (int n = 0; n < NR; n++) {
      if (n >= nr) continue;
      float s = hsum8(acc[m][n]);
      if (w)
        for (int64_t i = k8; i < k; i++) s += x[m * ldx + i] * weight1(rows[n], sc[n], sh, i, dtype);
      y[m * ldy + n] = s;
    }
}

AVX2 INLINE void widen_rows_avx2(const MoeportWeights* w, int nr, float* dst, int64_t kp, int dtype) {
  int sh = block_shift(w);
  int64_t k = w->k, k8 = k & ~(int64_t)7;
  for (int n = 0; n < nr; n++) {
    const uint8_t* row = w->data + n * row_bytes(w);
    const float* sc = row_scales(w, n);
    float* d = dst + n * kp;
    for (int64_t i = 0; i < k8; i += 8) {
      __m256 v = load_w8(row, i, dtype);
      if (sc) v = _mm256_mul_ps(v, _mm256_set1_ps(sc[i >> sh]));
      _mm256_store_ps(d + i, v);
    }
    for (int64_t i = k8; i < kp; i++) d[i] = i < k ? weight1(row, sc, sh, i, dtype) : 0.f;
  }
}

/* 2 rows of x or fewer: NR = 4 weight rows per pass; 3-4 rows: NR = 2 (at most 8 accumulators). */
#define AVX2_TILE(XP, LDX, W, WF, LDW, K, YP, LDY, MR, NR, DT) tile_avx2(XP, LDX, W, WF, LDW, K, YP, LDY, MR, NR, nr, DT)

AVX2 INLINE void gemm_avx2_t(const float* x, int64_t m_rows, int64_t ldx, const MoeportWeights* w0, int64_t rows,
                             float* y, int64_t ldy, int dtype, float* scratch) {
  int64_t k = w0->k, kp = (k + 15) & ~(int64_t)15;
  int step = m_rows <= 2 ? 4 : 2;
  for (int64_t n = 0; n < rows; n += step) {
    int nr = rows - n < step ? (int)(rows - n) : step;
    MoeportWeights wn = rows_from(w0, n);
    if (m_rows <= 4) { /* decode-sized: stream the weights once, widening in registers */
      switch (m_rows) {
        case 1: AVX2_TILE(x, ldx, &wn, NULL, 0, k, y + n, ldy, 1, 4, dtype); break;
        case 2: AVX2_TILE(x, ldx, &wn, NULL, 0, k, y + n, ldy, 2, 4, dtype); break;
        case 3: AVX2_TILE(x, ldx, &wn, NULL, 0, k, y + n, ldy, 3, 2, dtype); break;
        default: AVX2_TILE(x, ldx, &wn, NULL, 0, k, y + n, ldy, 4, 2, dtype); break;
      }
      continue;
    }
    /* more rows: widen these weight rows once, then reuse them for every 4 rows of x */
    widen_rows_avx2(&wn, nr, scratch, kp, dtype);
    int64_t m = 0;
    for (; m + 4 <= m_rows; m += 4) AVX2_TILE(x + m * ldx, ldx, NULL, scratch, kp, k, y + m * ldy + n, ldy, 4, 2, 0);
    switch (m_rows - m) {
      case 1: AVX2_TILE(x + m * ldx, ldx, NULL, scratch, kp, k, y + m * ldy + n, ldy, 1, 2, 0); break;
      case 2: AVX2_TILE(x + m * ldx, ldx, NULL, scratch, kp, k, y + m * ldy + n, ldy, 2, 2, 0); break;
      case 3: AVX2_TILE(x + m * ldx, ldx, NULL, scratch, kp, k, y + m * ldy + n, ldy, 3, 2, 0); break;
      default: break;
    }
  }
}

#define GEMM_AVX2(NAME, DTYPE)                                                                               \
  AVX2 static void NAME(const float* x, int64_t m_rows, int64_t ldx, const MoeportWeights* w, int64_t rows, \
                        float* y, int64_t ldy, float* scratch) {                                           \
    gemm_avx2_t(x, m_rows, ldx, w, rows, y, ldy, DTYPE, scratch);                                          \
  }
GEMM_AVX2(gemm_avx2_bf16, MOEPORT_BF16)
GEMM_AVX2(gemm_avx2_f16, MOEPORT_FP16)
GEMM_AVX2(gemm_avx2_q8, MOEPORT_Q8)
GEMM_AVX2(gemm_avx2_q4, MOEPORT_Q4)

/* Integer decode path. A packed row of x: x scales sx [nbp] floats, zero-point terms zq [nbp] floats
 * (zero * sx * sum of the block's int16 values), then the int16 values [kp] (kp = k rounded up to 32;
 * with 4-bit codes each 32-value group holds its even values first, then its odd ones, the order the
 * codes unpack to). nbp = k / block rounded up to 8. */
#define I16_MAX 32383 /* as VNNI_MAX: x to 1/32383 of its block's largest value */
static inline int64_t i16_nbp(int64_t k, int64_t block) { return ((k / block + 7) / 8) * 8; }
static inline size_t i16_row_bytes(int64_t k, int64_t block) {
  return (size_t)(8 * i16_nbp(k, block) + 2 * ((k + 31) & ~(int64_t)31));
}

static void i16_pack(const float* x, int64_t m_rows, int64_t ldx, const MoeportWeights* w, uint8_t* dst) {
  int64_t k = w->k, bs = w->block, nb = k / bs, nbp = i16_nbp(k, bs);
  int zero = w->dtype == MOEPORT_Q4 ? 8 : 128;
  for (int64_t m = 0; m < m_rows; m++) {
    uint8_t* row = dst + m * i16_row_bytes(k, bs);
    memset(row, 0, i16_row_bytes(k, bs));
    float* sxs = (float*)row;
    float* zq = sxs + nbp;
    int16_t* qv = (int16_t*)(zq + nbp);
    const float* xr = x + m * ldx;
    for (int64_t b = 0; b < nb; b++) {
      float amax = 0.f;
      for (int64_t i = b * bs; i < (b + 1) * bs; i++) amax = fmaxf(amax, fabsf(xr[i]));
      float inv = amax > 0.f ? I16_MAX / amax : 0.f;
      int64_t sum = 0;
      for (int64_t i = b * bs; i < (b + 1) * bs; i++) {
        long q = lrintf(xr[i] * inv);
        q = q > I16_MAX ? I16_MAX : q < -I16_MAX ? -I16_MAX : q;
        int64_t pos = w->dtype == MOEPORT_Q4 ? (i & ~(int64_t)31) + (i & 1) * 16 + (i & 31) / 2 : i;
        qv[pos] = (int16_t)q;
        sum += q;
      }
      sxs[b] = amax / I16_MAX;
      zq[b] = (float)zero * sxs[b] * (float)sum;
    }
  }
}

/* The integer tiles' operands: NR weight rows and their scales (rows past nr repeat row nr - 1), and MR
 * packed rows of x, each its block scales sx [nbp], zero-point terms [nbp], then its values (qx). */
AVX2 INLINE void int_tile_operands(const MoeportWeights* w, const uint8_t* px, int64_t ldp, int64_t nbp, const int MR,
                                   const int NR, int nr, const uint8_t** rows, const float** sc, const float** sx,
                                   const void** qx) {
#pragma GCC unroll 4
  for (int n = 0; n < NR; n++) {
    int r = n < nr ? n : nr - 1;
    rows[n] = w->data + r * row_bytes(w);
    sc[n] = w->scales + r * (w->k / w->block);
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; m++) {
    sx[m] = (const float*)(px + m * ldp);
    qx[m] = sx[m] + 2 * nbp;
  }
}

/* y = the tile's scaled sums less each block's zero-point term (weight scale x zq, summed over blocks). */
AVX2 INLINE void int_tile_store(__m256 acc[4][4], const float* const* sx, const float* const* sc, int64_t nbp,
                                int64_t nb, float* y, int64_t ldy, const int MR, const int NR, int nr) {
#pragma GCC unroll 4
  for (int m = 0; m < MR; m++) {
    const float* zq = sx[m] + nbp;
#pragma GCC unroll 4
    for (int n = 0; n < NR; n++) {
      if (n >= nr) continue;
      __m256 corr = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) corr = _mm256_fmadd_ps(_mm256_loadu_ps(sc[n] + b), _mm256_loadu_ps(zq + b), corr);
      float c = hsum8(corr);
      for (; b < nb; b++) c += sc[n][b] * zq[b];
      y[m * ldy + n] = hsum8(acc[m][n]) - c;
    }
  }
}

/* MR packed rows of x against NR weight rows (rows past nr repeat row nr - 1 and are not stored). */
AVX2 INLINE void i16_tile(const uint8_t* px, int64_t ldp, const MoeportWeights* w, float* y, int64_t ldy,
                          const int MR, const int NR, int nr, int dtype) {
  int64_t k = w->k, bs = w->block, nb = k / bs, nbp = i16_nbp(k, bs);
  const uint8_t* rows[4];
  const float *sc[4], *sx[4];
  const int16_t* qx[4];
  int_tile_operands(w, px, ldp, nbp, MR, NR, nr, rows, sc, sx, (const void**)qx);
  /* int32 sums overflow past 2^31 / (255 * 32383 * 2) = 130 vpmaddwd steps: flush to float every 2048 values */
  int64_t chunk = bs < 2048 ? bs : 2048;
  const __m256i low4 = _mm256_set1_epi8(15);
  __m256 acc[4][4];
#pragma GCC unroll 4
  for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
    for (int n = 0; n < NR; n++) acc[m][n] = _mm256_setzero_ps();
  for (int64_t c0 = 0, b = 0; c0 < k; c0 += chunk, b += (c0 & (bs - 1)) == 0) { /* bs: a power of two */
    __m256i ai[4][4];
#pragma GCC unroll 4
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
      for (int n = 0; n < NR; n++) ai[m][n] = _mm256_setzero_si256();
    if (dtype == MOEPORT_Q8) {
      for (int64_t i = c0; i < c0 + chunk; i += 16) {
        __m256i cv[4];
#pragma GCC unroll 4
        for (int n = 0; n < NR; n++) cv[n] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(rows[n] + i)));
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++) {
          __m256i xv = _mm256_load_si256((const __m256i*)(qx[m] + i));
#pragma GCC unroll 4
          for (int n = 0; n < NR; n++) ai[m][n] = _mm256_add_epi32(ai[m][n], _mm256_madd_epi16(cv[n], xv));
        }
      }
    } else {
      for (int64_t i = c0; i < c0 + chunk; i += 32) {
        __m256i lo[4], hi[4];
#pragma GCC unroll 4
        for (int n = 0; n < NR; n++) {
          __m128i bytes = _mm_loadu_si128((const __m128i*)(rows[n] + i / 2));
          lo[n] = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, _mm256_castsi256_si128(low4)));
          hi[n] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), _mm256_castsi256_si128(low4)));
        }
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++) {
          __m256i xe = _mm256_load_si256((const __m256i*)(qx[m] + i));
          __m256i xo = _mm256_load_si256((const __m256i*)(qx[m] + i + 16));
#pragma GCC unroll 4
          for (int n = 0; n < NR; n++)
            ai[m][n] = _mm256_add_epi32(ai[m][n],
                                        _mm256_add_epi32(_mm256_madd_epi16(lo[n], xe), _mm256_madd_epi16(hi[n], xo)));
        }
      }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
      for (int n = 0; n < NR; n++)
        acc[m][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[m][n]), _mm256_set1_ps(sc[n][b] * sx[m][b]), acc[m][n]);
  }
  int_tile_store(acc, sx, sc, nbp, nb, y, ldy, MR, NR, nr);
}

AVX2 INLINE void gemm_i16_t(const uint8_t* px, int64_t m_rows, const MoeportWeights* w0, int64_t rows, float* y,
                            int64_t ldy, int dtype) {
  int64_t ldp = (int64_t)i16_row_bytes(w0->k, w0->block);
  int step = m_rows == 1 ? 4 : m_rows == 2 ? 2 : 1;
  for (int64_t n = 0; n < rows; n += step) {
    int nr = rows - n < step ? (int)(rows - n) : step;
    MoeportWeights wn = rows_from(w0, n);
    switch (m_rows) {
      case 1: i16_tile(px, ldp, &wn, y + n, ldy, 1, 4, nr, dtype); break;
      case 2: i16_tile(px, ldp, &wn, y + n, ldy, 2, 2, nr, dtype); break;
      case 3: i16_tile(px, ldp, &wn, y + n, ldy, 3, 1, nr, dtype); break;
      default: i16_tile(px, ldp, &wn, y + n, ldy, 4, 1, nr, dtype); break;
    }
  }
}

AVX2 static void gemm_i16(const uint8_t* px, int64_t m_rows, const MoeportWeights* w, int64_t rows, float* y,
                          int64_t ldy) {
  if (w->dtype == MOEPORT_Q8)
    gemm_i16_t(px, m_rows, w, rows, y, ldy, MOEPORT_Q8);
  else
    gemm_i16_t(px, m_rows, w, rows, y, ldy, MOEPORT_Q4);
}

/* 4-bit decode with x rounded to int8 per block (as llama.cpp's Q4 x Q8 dot products and ONNX Runtime's
 * MatMulNBits at accuracy level 4 do): 64 codes per 32-byte load, multiplied as unsigned bytes by signed
 * bytes into int16 pairs (vpmaddubsw: 15 * 127 * 2 cannot saturate), then summed into int32. Half the
 * instructions per weight of the int16 path, which keeps two AVX2 cores at the memory's bandwidth; x
 * loses precision only to 1/254 of its block's largest value, against the int4 weights' 1/15. A packed
 * row: sx [nbp] floats, zq [nbp] floats, then the int8 values [kp] (kp = k rounded up to 64), each
 * 64-value group holding its even values first, then its odd ones. Blocks of 32 or of 64 and more. */
static inline size_t i8_row_bytes(int64_t k, int64_t block) {
  return (size_t)(8 * i16_nbp(k, block) + ((k + 63) & ~(int64_t)63));
}

static void i8_pack(const float* x, int64_t m_rows, int64_t ldx, const MoeportWeights* w, uint8_t* dst) {
  int64_t k = w->k, bs = w->block, nb = k / bs, nbp = i16_nbp(k, bs);
  for (int64_t m = 0; m < m_rows; m++) {
    uint8_t* row = dst + m * i8_row_bytes(k, bs);
    memset(row, 0, i8_row_bytes(k, bs));
    float* sxs = (float*)row;
    float* zq = sxs + nbp;
    int8_t* qv = (int8_t*)(zq + nbp);
    const float* xr = x + m * ldx;
    for (int64_t b = 0; b < nb; b++) {
      float amax = 0.f;
      for (int64_t i = b * bs; i < (b + 1) * bs; i++) amax = fmaxf(amax, fabsf(xr[i]));
      float inv = amax > 0.f ? 127.f / amax : 0.f;
      int64_t sum = 0;
      for (int64_t i = b * bs; i < (b + 1) * bs; i++) {
        long q = lrintf(xr[i] * inv);
        q = q > 127 ? 127 : q < -127 ? -127 : q;
        qv[(i & ~(int64_t)63) + (i & 1) * 32 + (i & 63) / 2] = (int8_t)q;
        sum += q;
      }
      sxs[b] = amax / 127.f;
      zq[b] = 8.f * sxs[b] * (float)sum;
    }
  }
}

/* MR packed rows of x against NR rows of 4-bit weights (rows past nr repeat row nr - 1, not stored). */
AVX2 INLINE void i8_tile(const uint8_t* px, int64_t ldp, const MoeportWeights* w, float* y, int64_t ldy, const int MR,
                         const int NR, int nr) {
  int64_t k = w->k, bs = w->block, nb = k / bs, nbp = i16_nbp(k, bs);
  const uint8_t* rows[4];
  const float *sc[4], *sx[4];
  const int8_t* qx[4];
  int_tile_operands(w, px, ldp, nbp, MR, NR, nr, rows, sc, sx, (const void**)qx);
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 acc[4][4];
#pragma GCC unroll 4
  for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
    for (int n = 0; n < NR; n++) acc[m][n] = _mm256_setzero_ps();
  /* one 64-value group: int32 sums of [MR][NR], low 4 lanes from its first 32 values, high 4 the rest */
#define I8_GROUP(I, AI)                                                                                            \
  do {                                                                                                             \
    __m256i c_lo[4], c_hi[4];                                                                                      \
    _Pragma("GCC unroll 4") for (int n = 0; n < NR; n++) {                                                        \
      __m256i bytes = _mm256_loadu_si256((const __m256i*)(rows[n] + (I) / 2));                                    \
      c_lo[n] = _mm256_and_si256(bytes, low4);                                                                     \
      c_hi[n] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);                                               \
    }                                                                                                              \
    _Pragma("GCC unroll 4") for (int m = 0; m < MR; m++) {                                                        \
      __m256i xe = _mm256_load_si256((const __m256i*)(qx[m] + (I)));                                              \
      __m256i xo = _mm256_load_si256((const __m256i*)(qx[m] + (I) + 32));                                         \
      _Pragma("GCC unroll 4") for (int n = 0; n < NR; n++) {                                                      \
        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(c_lo[n], xe), _mm256_maddubs_epi16(c_hi[n], xo));       \
        AI[m][n] = _mm256_madd_epi16(p, ones);                                                                     \
      }                                                                                                            \
    }                                                                                                              \
  } while (0)
  if (bs == 32) { /* each group spans two blocks: scale its halves by their own block's scales */
    for (int64_t i = 0; i < k; i += 64) {
      __m256i ai[4][4];
      I8_GROUP(i, ai);
      int64_t b = i >> 5;
#pragma GCC unroll 4
      for (int m = 0; m < MR; m++) {
        __m256 sxm = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(sx[m] + b)))), halves);
#pragma GCC unroll 4
        for (int n = 0; n < NR; n++) {
          __m256 swn = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(sc[n] + b)))), halves);
          acc[m][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[m][n]), _mm256_mul_ps(sxm, swn), acc[m][n]);
        }
      }
    }
  } else { /* blocks of 64 values or more: sum a block's groups in int32, then scale once */
    for (int64_t b = 0; b < nb; b++) {
      __m256i sum[4][4];
#pragma GCC unroll 4
      for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
        for (int n = 0; n < NR; n++) sum[m][n] = _mm256_setzero_si256();
      for (int64_t i = b * bs; i < (b + 1) * bs; i += 64) {
        __m256i ai[4][4];
        I8_GROUP(i, ai);
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
          for (int n = 0; n < NR; n++) sum[m][n] = _mm256_add_epi32(sum[m][n], ai[m][n]);
      }
#pragma GCC unroll 4
      for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
        for (int n = 0; n < NR; n++)
          acc[m][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m][n]), _mm256_set1_ps(sc[n][b] * sx[m][b]), acc[m][n]);
    }
  }
#undef I8_GROUP
  int_tile_store(acc, sx, sc, nbp, nb, y, ldy, MR, NR, nr);
}

AVX2 static void gemm_i8(const uint8_t* px, int64_t m_rows, const MoeportWeights* w0, int64_t rows, float* y,
                         int64_t ldy) {
  int64_t ldp = (int64_t)i8_row_bytes(w0->k, w0->block);
  int step = m_rows == 1 ? 4 : 2;
  for (int64_t n = 0; n < rows; n += step) {
    int nr = rows - n < step ? (int)(rows - n) : step;
    MoeportWeights wn = rows_from(w0, n);
    switch (m_rows) {
      case 1: i8_tile(px, ldp, &wn, y + n, ldy, 1, 4, nr); break;
      case 2: i8_tile(px, ldp, &wn, y + n, ldy, 2, 2, nr); break;
      case 3: i8_tile(px, ldp, &wn, y + n, ldy, 3, 2, nr); break;
      default: i8_tile(px, ldp, &wn, y + n, ldy, 4, 2, nr); break;
    }
  }
}

/* ---- AMX-BF16 GEMM (Sapphire Rapids and later) -----------------------------------------------
 * Tiles compute y^T: A = 16 weight rows x 32 k (bf16, copied into tile order), B = 32 k x 16 rows of x
 * in the pair-interleaved layout AMX wants, packed once per call. x is split into bf16 hi + lo parts
 * (x = hi + lo to 2^-17) and both are multiplied, so with bf16 weights the result keeps float32
 * accuracy: the weights are exact in bf16 and AMX accumulates in float32. Quantized weights are
 * dequantized into the same tile order, rounded to bf16 (relative error <= 2^-9 per weight, below the
 * quantization step of int8 and int4 codes). */
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,f16c,fma")))

typedef struct {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((packed)) TileConfig;

AMX static void amx_configure(void) {
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) { /* every tile: 16 rows of 64 bytes */
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

/* x [m_rows, K] -> hi, lo: per block of 16 rows, K/32 tiles of 1 KB (16 k-pairs x 16 rows x 2). */
AMX static void amx_pack(const float* x, int64_t m_rows, int64_t ldx, int64_t k, uint16_t* hi, uint16_t* lo) {
  int64_t kb_count = k / 32;
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(16));
  for (int64_t mb = 0; mb * 16 < m_rows; mb++) {
    for (int64_t m = 0; m < 16; m++) {
      int64_t row = mb * 16 + m;
      for (int64_t kb = 0; kb < kb_count; kb++) {
        uint32_t* th = (uint32_t*)(hi + (mb * kb_count + kb) * 512) + m;
        uint32_t* tl = (uint32_t*)(lo + (mb * kb_count + kb) * 512) + m;
        __m512i vh = _mm512_setzero_si512(), vl = _mm512_setzero_si512();
        if (row < m_rows) {
          const float* src = x + row * ldx + kb * 32;
          __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
          __m512bh h = _mm512_cvtne2ps_pbh(b, a);
          __m512i hbits = (__m512i)h;
          __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hbits)), 16));
          __m512 hb = _mm512_castsi512_ps(
              _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hbits, 1)), 16));
          vh = hbits;
          vl = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha));
        }
        _mm512_i32scatter_epi32(th, idx, vh, 4); /* k-pair p of this row -> tile row p, column m */
        _mm512_i32scatter_epi32(tl, idx, vl, 4);
      }
    }
  }
}

/* 32 weight rows [32, K] -> K/32 pairs of 1 KB A tiles, contiguous (bf16 copied, quantized dequantized).
 * Loaded in place, bf16 rows' 2K-byte stride maps a tile's 16 lines to two L1 sets, and the loads
 * stall on conflict misses. */
AMX INLINE void amx_rows_t(const MoeportWeights* w, uint16_t* dst, int dtype) {
  int64_t kb_count = w->k / 32;
  int sh = block_shift(w);
  for (int64_t r = 0; r < 32; r++) {
    uint16_t* out = dst + (r / 16) * 512 + (r % 16) * 32;
    const uint8_t* row = w->data + r * row_bytes(w);
    if (dtype == MOEPORT_BF16) {
      for (int64_t kb = 0; kb < kb_count; kb++)
        _mm512_store_si512((__m512i*)(out + kb * 1024), _mm512_loadu_si512((const uint16_t*)row + kb * 32));
    } else {
      const float* sc = row_scales(w, r);
      for (int64_t kb = 0; kb < kb_count; kb++) { /* hi tiles, then lo tiles: w = hi + lo to 2^-16 */
        __m512 a = weight16(row, sc, sh, kb * 32, dtype, 0xffff), b = weight16(row, sc, sh, kb * 32 + 16, dtype, 0xffff);
        __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
        __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
        __m512 hb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
        _mm512_store_si512((__m512i*)(out + kb * 2048), h);
        _mm512_store_si512((__m512i*)(out + kb * 2048 + 1024),
                           (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha)));
      }
    }
  }
}

AMX static void amx_rows(const MoeportWeights* w, uint16_t* dst) {
  switch (w->dtype) {
    case MOEPORT_Q4: amx_rows_t(w, dst, MOEPORT_Q4); break;
    case MOEPORT_Q8: amx_rows_t(w, dst, MOEPORT_Q8); break;
    default: amx_rows_t(w, dst, MOEPORT_BF16); break;
  }
}

/* y[m, n] for n in [0, rows32), rows32 a multiple of 32, from packed x (hi, lo) and the weights. */
AMX static int amx_gemm(const uint16_t* hi, const uint16_t* lo, int64_t m_rows, const MoeportWeights* w0,
                        int64_t rows32, float* y, int64_t ldy) {
  int64_t k = w0->k, kb_count = k / 32;
  float c[2][256] __attribute__((aligned(64)));
  int split = quantized(w0->dtype); /* dequantized weights as bf16 hi + lo tiles */
  uint16_t* wt = (uint16_t*)moeport_thread_scratch(MOEPORT_SCRATCH_TILES, (size_t)((split ? 64 : 32) * k) * sizeof(uint16_t));
  if (!wt) return -1;
  amx_configure();
  for (int64_t n = 0; n < rows32; n += 32) {
    MoeportWeights wn = rows_from(w0, n);
    amx_rows(&wn, wt);
    for (int64_t mb = 0; mb * 16 < m_rows; mb++) {
      const uint16_t* ph = hi + mb * kb_count * 512;
      const uint16_t* pl = lo + mb * kb_count * 512;
      _tile_zero(0);
      _tile_zero(1);
      if (split) {
        for (int64_t kb = 0; kb < kb_count; kb++) { /* w.x = hi.hi + hi.lo + lo.hi (lo.lo is below 2^-32) */
          _tile_loadd(2, wt + kb * 2048, 64);
          _tile_loadd(3, wt + kb * 2048 + 512, 64);
          _tile_loadd(4, ph + kb * 512, 64);
          _tile_loadd(5, pl + kb * 512, 64);
          _tile_loadd(6, wt + kb * 2048 + 1024, 64);
          _tile_loadd(7, wt + kb * 2048 + 1536, 64);
          _tile_dpbf16ps(0, 2, 4);
          _tile_dpbf16ps(0, 2, 5);
          _tile_dpbf16ps(0, 6, 4);
          _tile_dpbf16ps(1, 3, 4);
          _tile_dpbf16ps(1, 3, 5);
          _tile_dpbf16ps(1, 7, 4);
        }
      } else {
        for (int64_t kb = 0; kb < kb_count; kb++) {
          _tile_loadd(2, wt + kb * 1024, 64);
          _tile_loadd(3, wt + kb * 1024 + 512, 64);
          _tile_loadd(4, ph + kb * 512, 64);
          _tile_loadd(5, pl + kb * 512, 64);
          _tile_dpbf16ps(0, 2, 4);
          _tile_dpbf16ps(0, 2, 5);
          _tile_dpbf16ps(1, 3, 4);
          _tile_dpbf16ps(1, 3, 5);
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      int64_t valid = m_rows - mb * 16 < 16 ? m_rows - mb * 16 : 16;
      for (int64_t m = 0; m < valid; m++) {
        float* yr = y + (mb * 16 + m) * ldy + n;
        for (int64_t i = 0; i < 16; i++) {
          yr[i] = c[0][i * 16 + m];
          yr[16 + i] = c[1][i * 16 + m];
        }
      }
    }
  }
  _tile_release();
  return 0;
}
#endif /* MOEPORT_X86 */


/* ---- AVX512-VNNI decode GEMV for quantized weights --------------------------------------------
 * Decode-sized products (<= 4 rows of x) with int8/int4 weights multiply the stored codes as bytes:
 * VPDPBUSD sums 4 code x activation byte products into each int32 lane, 64 codes per instruction,
 * where widening every code to float32 would make the kernel compute-bound below memory speed. Each
 * row of x is packed once per call into two signed bytes per value: per block of the weights, x =
 * sx * (256 * hi + lo) with |256 * hi + lo| <= 32383, so x keeps 15 bits against the block's largest
 * value (the weights stay exact). The zero point is subtracted with the block sums of x.
 *
 * Packed row (bytes, Kp = k rounded up to 64): lane scales [Kp / 64][16] float (sx of the block each
 * int32 lane belongs to), zero-point terms [nb rounded up to 16] float (zero * sx * sum of the block's
 * values), hi digits [Kp], lo digits [Kp]. With 4-bit codes each 64-value chunk is stored in the
 * order the codes unpack to: the even values (low nibbles) first, then the odd ones. */
#define VNNI_MAX 32383

static inline int64_t round64(int64_t v) { return (v + 63) & ~(int64_t)63; }
static inline int64_t vnni_nbp(int64_t k, int64_t block) { return ((k / block + 15) / 16) * 16; }
static inline size_t vnni_row_bytes(int64_t k, int64_t block) {
  return (size_t)(3 * round64(k) + 4 * vnni_nbp(k, block));
}

/* Where value e of a 64-value chunk goes (4-bit codes unpack as the even values, then the odd ones). */
static inline int64_t vnni_pos(int64_t e, int dtype) { return dtype == MOEPORT_Q4 ? (e & 1) * 32 + e / 2 : e; }

/* The first value (within its chunk) that int32 lane j of a chunk sums. */
static inline int64_t vnni_lane_first(int j, int dtype) { return dtype == MOEPORT_Q4 ? 8 * (j % 8) + j / 8 : 4 * j; }

static void vnni_pack(const float* x, int64_t m_rows, int64_t ldx, const MoeportWeights* w, uint8_t* dst) {
  int64_t k = w->k, bs = w->block, kp = round64(k), nb = k / bs;
  int zero = w->dtype == MOEPORT_Q4 ? 8 : 128;
  for (int64_t m = 0; m < m_rows; m++) {
    uint8_t* row = dst + m * vnni_row_bytes(k, bs);
    float* lanes = (float*)row;
    float* zq = (float*)(row + kp);
    int8_t* hi = (int8_t*)(row + kp + 4 * vnni_nbp(k, bs));
    int8_t* lo = hi + kp;
    memset(row, 0, vnni_row_bytes(k, bs));
    const float* xr = x + m * ldx;
    for (int64_t b = 0; b < nb; b++) {
      float amax = 0.f;
      for (int64_t i = b * bs; i < (b + 1) * bs; i++) amax = fmaxf(amax, fabsf(xr[i]));
      float sx = amax / VNNI_MAX, inv = amax > 0.f ? VNNI_MAX / amax : 0.f;
      int64_t sum = 0;
      for (int64_t i = b * bs; i < (b + 1) * bs; i++) {
        long q = lrintf(xr[i] * inv);
        q = q > VNNI_MAX ? VNNI_MAX : q < -VNNI_MAX ? -VNNI_MAX : q;
        long h = (q + 128) >> 8; /* floor: lo in [-128, 127] */
        int64_t pos = (i / 64) * 64 + vnni_pos(i % 64, w->dtype);
        hi[pos] = (int8_t)h;
        lo[pos] = (int8_t)(q - 256 * h);
        sum += q;
      }
      zq[b] = (float)zero * sx * (float)sum;
      for (int64_t c = (b * bs) / 64; c <= ((b + 1) * bs - 1) / 64; c++) /* the lanes summing this block */
        for (int j = 0; j < 16; j++) {
          int64_t first = c * 64 + vnni_lane_first(j, w->dtype);
          if (first >= b * bs && first < (b + 1) * bs) lanes[c * 16 + j] = sx;
        }
    }
  }
}

#ifdef MOEPORT_X86
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

/* MR packed rows of x against 4 weight rows. */
VNNI INLINE void vnni_tile(const uint8_t* px, int64_t ldp, const MoeportWeights* w, float* y, int64_t ldy, int mr,
                           int nr, int dtype, int prefetch) {
  int64_t k = w->k, bs = w->block, kp = round64(k), nb = k / bs, per_chunk = bs >= 64 ? 1 : 64 / bs;
  int sh = block_shift(w);
  const uint8_t* rows[4];
  const float* sc[4];
  for (int n = 0; n < 4; n++) {
    int r = n < nr ? n : 0;
    rows[n] = w->data + r * row_bytes(w);
    sc[n] = w->scales + r * nb;
  }
  /* lane j of a chunk -> which of the chunk's blocks */
  int lane_block[16];
  for (int j = 0; j < 16; j++) lane_block[j] = bs >= 64 ? 0 : (int)(vnni_lane_first(j, dtype) / bs);
  const __m512i lb = _mm512_loadu_si512(lane_block);
  const __m512 f256 = _mm512_set1_ps(256.f);
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 acc[4][4];
#pragma GCC unroll 4
  for (int m = 0; m < 4; m++)
#pragma GCC unroll 4
    for (int n = 0; n < 4; n++) acc[m][n] = _mm512_setzero_ps();
  int64_t offh = kp + 4 * vnni_nbp(k, bs);
  for (int64_t i = 0; i < kp; i += 64) {
    __m512i cv[4];
    __m512 sv[4];
    int64_t left = k - i; /* values of this chunk that exist (k is a multiple of 16) */
    __mmask16 bmask = (__mmask16)((1u << (left >= 64 ? per_chunk : (left + bs - 1) / bs)) - 1);
#pragma GCC unroll 4
    for (int n = 0; n < 4; n++) {
      if (dtype == MOEPORT_Q8) {
        __mmask64 mask = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        if (prefetch) _mm_prefetch((const char*)(rows[n] + i + 2048), _MM_HINT_T0);
        cv[n] = _mm512_maskz_loadu_epi8(mask, rows[n] + i);
      } else {
        __mmask64 mask = ((__mmask64)1 << (left >= 64 ? 32 : left / 2)) - 1; /* this chunk's bytes only */
        if (prefetch && !(i & 127)) _mm_prefetch((const char*)(rows[n] + i / 2 + 2048), _MM_HINT_T0);
        __m512i b = _mm512_maskz_loadu_epi8(mask, rows[n] + i / 2); /* 32 bytes used */
        __m512i both = _mm512_inserti64x4(b, _mm256_srli_epi16(_mm512_castsi512_si256(b), 4), 1);
        cv[n] = _mm512_and_si512(both, low4);
      }
      sv[n] = _mm512_permutexvar_ps(lb, _mm512_maskz_loadu_ps(bmask, sc[n] + (i >> sh)));
    }
#pragma GCC unroll 4
    for (int m = 0; m < 4; m++) {
      if (m < mr) {
        const uint8_t* row = px + m * ldp;
        __m512i xh = _mm512_load_si512(row + offh + i), xl = _mm512_load_si512(row + offh + kp + i);
        __m512 ls = _mm512_load_ps((const float*)row + i / 4);
#pragma GCC unroll 4
        for (int n = 0; n < 4; n++) {
          __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cv[n], xh);
          __m512i l = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cv[n], xl);
          __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), f256, _mm512_cvtepi32_ps(l));
          acc[m][n] = _mm512_fmadd_ps(_mm512_mul_ps(t, ls), sv[n], acc[m][n]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < 4; m++) {
    if (m >= mr) continue;
    const float* zq = (const float*)(px + m * ldp + kp);
#pragma GCC unroll 4
    for (int n = 0; n < 4; n++) {
      if (n >= nr) continue;
      __m512 corr = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; b += 16) {
        __mmask16 mask = nb - b >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nb - b)) - 1);
        corr = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, sc[n] + b), _mm512_load_ps(zq + b), corr);
      }
      y[m * ldy + n] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[m][n], corr));
    }
  }
}

VNNI INLINE void gemm_vnni_t(const uint8_t* px, int64_t m_rows, const MoeportWeights* w0, int64_t rows, float* y,
                             int64_t ldy, int dtype) {
  int64_t ldp = (int64_t)vnni_row_bytes(w0->k, w0->block);
  for (int64_t n = 0; n < rows; n += 4) {
    int nr = rows - n < 4 ? (int)(rows - n) : 4, more = rows - n >= 8;
    MoeportWeights wn = rows_from(w0, n);
    switch (m_rows) {
      case 1: vnni_tile(px, ldp, &wn, y + n, ldy, 1, nr, dtype, more); break;
      case 2: vnni_tile(px, ldp, &wn, y + n, ldy, 2, nr, dtype, more); break;
      case 3: vnni_tile(px, ldp, &wn, y + n, ldy, 3, nr, dtype, more); break;
      default: vnni_tile(px, ldp, &wn, y + n, ldy, 4, nr, dtype, more); break;
    }
  }
}

VNNI static void gemm_vnni(const uint8_t* px, int64_t m_rows, const MoeportWeights* w, int64_t rows, float* y,
                           int64_t ldy) {
  if (w->dtype == MOEPORT_Q8)
    gemm_vnni_t(px, m_rows, w, rows, y, ldy, MOEPORT_Q8);
  else
    gemm_vnni_t(px, m_rows, w, rows, y, ldy, MOEPORT_Q4);
}
#endif /* MOEPORT_X86 */

/* ---- dispatch ------------------------------------------------------------------------------- */

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_VNNI = 3, ISA_AMX = 4 };

#ifdef MOEPORT_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

static int amx_usable(void) {
  unsigned a, b, c, d;
  /* AMX-BF16, AMX-TILE */
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return 0;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return 0;                       /* AVX512-BF16 */
#ifdef __linux__
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
  return 0;
#endif
}
#endif

/* The best code path of this CPU; MOEPORT_KERNELS_ISA=generic|avx512|vnni caps it (for tests and
 * comparisons). Each level includes the ones below it. */
static int isa(void) {
  static int cached = -1;
  if (cached >= 0) return cached;
  int level = ISA_GENERIC;
#ifdef MOEPORT_X86
  const char* env = getenv("MOEPORT_KERNELS_ISA");
  int cap = !env || !*env                  ? ISA_AMX
            : strcmp(env, "generic") == 0 ? ISA_GENERIC
            : strcmp(env, "avx2") == 0    ? ISA_AVX2
            : strcmp(env, "avx512") == 0  ? ISA_AVX512
            : strcmp(env, "vnni") == 0    ? ISA_VNNI
                                          : ISA_AMX;
  __builtin_cpu_init();
  if (cap >= ISA_AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    level = ISA_AVX2;
  if (level == ISA_AVX2 && cap >= ISA_AVX512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    level = ISA_AVX512;
  if (level == ISA_AVX512 && cap >= ISA_VNNI && __builtin_cpu_supports("avx512vnni")) level = ISA_VNNI;
  if (level == ISA_VNNI && cap >= ISA_AMX && amx_usable()) level = ISA_AMX;
#endif
  cached = level;
  return level;
}

int moeport_has_avx512(void) { return isa() >= ISA_AVX512; }
int moeport_has_avx2(void) { return isa() == ISA_AVX2; }

const char* moeport_kernels_isa(void) {
  static const char* names[] = {"generic", "avx2", "avx512", "avx512+vnni", "avx512+vnni+amx-bf16"};
  return names[isa()];
}

/* How x is packed before a product of m rows with these weights, if at all: for the AMX tiles (more
 * than 4 rows, bf16 or quantized weights; fp16 would need AMX-FP16), or as bytes for VNNI (decode rows,
 * quantized weights). */
enum { PACK_NONE = 0, PACK_AMX = 1, PACK_VNNI = 2, PACK_I16 = 3, PACK_I8 = 4 };

static int pack_kind(int64_t m, const MoeportWeights* w) {
  if (m > 4 && w->k % 32 == 0 && w->dtype != MOEPORT_FP16 && isa() == ISA_AMX) return PACK_AMX;
  if (m <= 4 && quantized(w->dtype) && isa() >= ISA_VNNI) return PACK_VNNI;
  /* AVX2: 4-bit codes at accuracy level 4 (act8) in int8 products for any number of rows (in groups of
   * 4); otherwise decode-sized products in int16 (x to 15 bits, as VNNI) and larger ones widened to
   * float32, exact */
  if (w->dtype == MOEPORT_Q4 && w->act8 && isa() == ISA_AVX2 && w->block >= 32 && w->k % 64 == 0) return PACK_I8;
  if (m <= 4 && quantized(w->dtype) && isa() == ISA_AVX2 && (w->dtype == MOEPORT_Q8 || w->block >= 32))
    return PACK_I16;
  return PACK_NONE;
}

static size_t amx_elems(int64_t m, int64_t k) { return (size_t)((m + 15) / 16) * (size_t)(k / 32) * 512; }

/* Bytes of x packed for a product of m rows with w (0: not packed). */
static size_t packed_bytes(int64_t m, const MoeportWeights* w) {
  switch (pack_kind(m, w)) {
    case PACK_AMX: return 2 * amx_elems(m, w->k) * sizeof(uint16_t);
    case PACK_VNNI: return (size_t)m * vnni_row_bytes(w->k, w->block);
#ifdef MOEPORT_X86
    case PACK_I16: return (size_t)m * i16_row_bytes(w->k, w->block);
    case PACK_I8: return (size_t)m * i8_row_bytes(w->k, w->block);
#endif
    default: return 0;
  }
}

/* y[m, n] = sum_k x[m, k] w[n, k] for `rows` rows of w; packed: x as pack() made it (or NULL). */
static int gemm(const float* x, int64_t m_rows, int64_t ldx, const uint8_t* packed, const MoeportWeights* w,
                int64_t rows, float* y, int64_t ldy) {
  int64_t k = w->k;
  int kind = packed ? pack_kind(m_rows, w) : PACK_NONE;
#ifdef MOEPORT_X86
  if (kind == PACK_VNNI) {
    gemm_vnni(packed, m_rows, w, rows, y, ldy);
    return 0;
  }
  if (kind == PACK_I16 || kind == PACK_I8) { /* 4 rows of x at a time, against the same weight rows */
    size_t ldp = kind == PACK_I16 ? i16_row_bytes(w->k, w->block) : i8_row_bytes(w->k, w->block);
    for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
      int64_t mr = m_rows - m0 < 4 ? m_rows - m0 : 4;
      if (kind == PACK_I16)
        gemm_i16(packed + m0 * ldp, mr, w, rows, y + m0 * ldy, ldy);
      else
        gemm_i8(packed + m0 * ldp, mr, w, rows, y + m0 * ldy, ldy);
    }
    return 0;
  }
#endif
  /* 4 widened weight rows, zero-padded to a multiple of 16 */
  float* scratch = (float*)moeport_thread_scratch(MOEPORT_SCRATCH_ROWS, (size_t)(4 * (((k + 15) & ~(int64_t)15) + 16)) * 4);
  if (!scratch) return -1;
#ifdef MOEPORT_X86
  MoeportWeights rest;
  if (kind == PACK_AMX && rows >= 32) {
    const uint16_t* hi = (const uint16_t*)packed;
    int64_t rows32 = rows & ~(int64_t)31;
    if (amx_gemm(hi, hi + amx_elems(m_rows, k), m_rows, w, rows32, y, ldy)) return -1;
    rest = rows_from(w, rows32);
    w = &rest;
    y += rows32;
    rows -= rows32;
    if (!rows) return 0;
  }
  if (isa() >= ISA_AVX512) {
    switch (w->dtype) {
      case MOEPORT_BF16: gemm_avx512_bf16(x, m_rows, ldx, w, rows, y, ldy, scratch); break;
      case MOEPORT_FP16: gemm_avx512_f16(x, m_rows, ldx, w, rows, y, ldy, scratch); break;
      case MOEPORT_Q8: gemm_avx512_q8(x, m_rows, ldx, w, rows, y, ldy, scratch); break;
      default: gemm_avx512_q4(x, m_rows, ldx, w, rows, y, ldy, scratch); break;
    }
    return 0;
  }
  if (isa() == ISA_AVX2) {
    switch (w->dtype) {
      case MOEPORT_BF16: gemm_avx2_bf16(x, m_rows, ldx, w, rows, y, ldy, scratch); break;
      case MOEPORT_FP16: gemm_avx2_f16(x, m_rows, ldx, w, rows, y, ldy, scratch); break;
      case MOEPORT_Q8: gemm_avx2_q8(x, m_rows, ldx, w, rows, y, ldy, scratch); break;
      default: gemm_avx2_q4(x, m_rows, ldx, w, rows, y, ldy, scratch); break;
    }
    return 0;
  }
#endif
  gemm_generic(x, m_rows, ldx, w, rows, y, ldy, scratch);
  return 0;
}

/* x [m, k] packed for a product with w, into packed_bytes(m, w) bytes at dst (64-byte aligned). */
static void pack(const float* x, int64_t m, int64_t ldx, const MoeportWeights* w, uint8_t* dst) {
  switch (pack_kind(m, w)) {
#ifdef MOEPORT_X86
    case PACK_AMX: {
      uint16_t* hi = (uint16_t*)dst;
      amx_pack(x, m, ldx, w->k, hi, hi + amx_elems(m, w->k));
      break;
    }
#endif
    case PACK_VNNI: vnni_pack(x, m, ldx, w, dst); break;
#ifdef MOEPORT_X86
    case PACK_I16: i16_pack(x, m, ldx, w, dst); break;
    case PACK_I8: i8_pack(x, m, ldx, w, dst); break;
#endif
    default: break;
  }
}


/* ---- workspace ------------------------------------------------------------------------------
 * A call's large buffers are kept for the next call: fresh allocations of this size come straight
 * from mmap, and the kernel zeroing their pages cost as much as the expert products themselves.
 * The pool follows the work: a buffer larger than POOL_FLOOR and than POOL_SLACK x the largest of
 * the last POOL_RECENT requests is freed (when returned, or when a request finds it idle), so after a
 * long prefill (~2 GB of MoE workspace for 4k tokens of DeepSeek-V3) decode keeps only what it uses,
 * while a run of large calls (the layers of one prefill) keeps reusing its buffers. */

#define POOL_SLOTS 8
#define POOL_RECENT 64
#define POOL_SLACK 4
#define POOL_FLOOR ((size_t)16 << 20)
static MoeportBuffer g_pool[POOL_SLOTS];
static size_t g_recent[POOL_RECENT]; /* sizes of the last requests (ring) */
static unsigned g_recent_next;
static int64_t g_pool_allocs; /* buffers allocated, for tests */
static pthread_mutex_t g_pool_lock = PTHREAD_MUTEX_INITIALIZER;

/* The largest size worth keeping now (under the lock). */
static size_t pool_keep_limit(void) {
  size_t recent = 0;
  for (int i = 0; i < POOL_RECENT; i++)
    if (g_recent[i] > recent) recent = g_recent[i];
  recent *= POOL_SLACK;
  return recent > POOL_FLOOR ? recent : POOL_FLOOR;
}

MoeportBuffer moeport_buffer_get(size_t size) {
  MoeportBuffer found = {NULL, 0}, stale[POOL_SLOTS];
  int n_stale = 0;
  pthread_mutex_lock(&g_pool_lock);
  g_recent[g_recent_next++ % POOL_RECENT] = size;
  size_t keep = pool_keep_limit();
  int best = -1;
  for (int i = 0; i < POOL_SLOTS; i++) {
    if (!g_pool[i].ptr) continue;
    if (g_pool[i].size > keep) { /* idle and far larger than anything asked for lately */
      stale[n_stale++] = g_pool[i];
      g_pool[i].ptr = NULL;
      g_pool[i].size = 0;
    } else if (g_pool[i].size >= size && (best < 0 || g_pool[i].size < g_pool[best].size)) {
      best = i;
    }
  }
  if (best >= 0) {
    found = g_pool[best];
    g_pool[best].ptr = NULL;
    g_pool[best].size = 0;
  } else {
    g_pool_allocs++;
  }
  pthread_mutex_unlock(&g_pool_lock);
  for (int i = 0; i < n_stale; i++) free(stale[i].ptr);
  if (found.ptr) return found;
  found.size = (size + 4095) & ~(size_t)4095;
  found.ptr = aligned_alloc(64, found.size ? found.size : 4096);
  return found;
}

void moeport_buffer_put(MoeportBuffer b) {
  if (!b.ptr) return;
  pthread_mutex_lock(&g_pool_lock);
  if (b.size > pool_keep_limit()) {
    pthread_mutex_unlock(&g_pool_lock);
    free(b.ptr);
    return;
  }
  int slot = -1;
  for (int i = 0; i < POOL_SLOTS && slot < 0; i++)
    if (!g_pool[i].ptr) slot = i;
  if (slot < 0) { /* full: the pool keeps the larger buffers */
    slot = 0;
    for (int i = 1; i < POOL_SLOTS; i++)
      if (g_pool[i].size < g_pool[slot].size) slot = i;
    if (g_pool[slot].size >= b.size) {
      pthread_mutex_unlock(&g_pool_lock);
      free(b.ptr);
      return;
    }
  }
  MoeportBuffer evicted = g_pool[slot];
  g_pool[slot] = b;
  pthread_mutex_unlock(&g_pool_lock);
  free(evicted.ptr);
}

void moeport_pool_stats(int64_t* buffers, int64_t* bytes, int64_t* allocs) {
  pthread_mutex_lock(&g_pool_lock);
  *buffers = *bytes = 0;
  for (int i = 0; i < POOL_SLOTS; i++) {
    if (!g_pool[i].ptr) continue;
    (*buffers)++;
    *bytes += (int64_t)g_pool[i].size;
  }
  *allocs = g_pool_allocs;
  pthread_mutex_unlock(&g_pool_lock);
}

void moeport_buffer_cycle(size_t size) { moeport_buffer_put(moeport_buffer_get(size)); }

/* ---- Linear: items are blocks of output rows ------------------------------------------------ */

typedef struct {
  const float* x;
  const MoeportWeights* w;
  const uint8_t* packed;
  float* y;
  int64_t m, n, block;
  volatile int failed;
} LinearJob;

static void linear_item(void* data, size_t item) {
  LinearJob* j = (LinearJob*)data;
  int64_t n0 = (int64_t)item * j->block, rows = j->n - n0 < j->block ? j->n - n0 : j->block;
  MoeportWeights w = rows_from(j->w, n0);
  if (gemm(j->x, j->m, j->w->k, j->packed, &w, rows, j->y + n0, j->n)) j->failed = 1;
}

/* Output rows per work item: enough items to share out, each a multiple of `align` rows. */
static int64_t row_block(int64_t n, int64_t m, int64_t align) {
  int64_t block = m <= 4 ? 64 : 32;
  if (n / block < 8) block = n / 8;
  block = (block + align - 1) / align * align;
  return block < align ? align : block;
}

int moeport_linear(const float* x, int64_t m, const MoeportWeights* w, int64_t n, float* y, moeport_parallel_for pfor,
                   void* pctx) {
  if (m == 0 || n == 0) return 0;
  int kind = pack_kind(m, w);
  LinearJob job = {x, w, NULL, y, m, n, row_block(n, m, kind == PACK_AMX ? 32 : 4), 0};
  MoeportBuffer packed = {NULL, 0};
  if (kind != PACK_NONE) {
    packed = moeport_buffer_get(packed_bytes(m, w));
    if (!packed.ptr) return -1;
    pack(x, m, w->k, w, (uint8_t*)packed.ptr);
    job.packed = (const uint8_t*)packed.ptr;
  }
  pfor(pctx, linear_item, (size_t)((n + job.block - 1) / job.block), &job);
  moeport_buffer_put(packed);
  return job.failed ? -1 : 0;
}

/* ---- MoE ------------------------------------------------------------------------------------- */

typedef struct {
  const MoeportWeights *gate_up, *down;
  int64_t hidden, inter, experts;
  /* routing, grouped by expert: slot s holds a row of token s's choices; expert e owns [start[e], start[e+1]) */
  int64_t* start;
  const float* xg;   /* [slots, hidden] the routed rows of x */
  float* act;        /* [slots, inter]  silu(gate) * up */
  float* out;        /* [slots, hidden] each expert's output */
  int64_t *items_e, *items_r, *active; /* work items: (expert, first row); experts with tokens */
  int64_t *off1, *off2;                /* per expert: byte offset of its packed rows, or -1 */
  uint8_t *packed1, *packed2;          /* x packed for stage 1, activations for stage 2 */
  int64_t block1, block2;
  volatile int failed;
} MoeJob;

static inline float silu(float v) { return v / (1.f + expf(-v)); }

#define EXPERT_ROWS(j, e) ((j)->start[(e) + 1] - (j)->start[e])
#define PACKED(j, n, e) ((j)->off##n[e] < 0 ? NULL : (j)->packed##n + (j)->off##n[e])

static void moe_pack1(void* data, size_t item) { /* x rows of one expert, packed for gate_up */
  MoeJob* j = (MoeJob*)data;
  int64_t e = j->active[item];
  if (j->off1[e] >= 0) pack(j->xg + j->start[e] * j->hidden, EXPERT_ROWS(j, e), j->hidden, j->gate_up, PACKED(j, 1, e));
}

static void moe_pack2(void* data, size_t item) { /* activations of one expert, packed for down */
  MoeJob* j = (MoeJob*)data;
  int64_t e = j->active[item];
  if (j->off2[e] >= 0) pack(j->act + j->start[e] * j->inter, EXPERT_ROWS(j, e), j->inter, j->down, PACKED(j, 2, e));
}

static void moe_stage1(void* data, size_t item) { /* gate/up rows [r, r + block1) of one expert -> act */
  MoeJob* j = (MoeJob*)data;
  int64_t e = j->items_e[item], r = j->items_r[item], two_i = 2 * j->inter;
  int64_t rows = two_i - r < j->block1 ? two_i - r : j->block1, s0 = j->start[e], count = EXPERT_ROWS(j, e);
  float* h = (float*)malloc((size_t)(count * rows) * sizeof(float));
  if (!h) {
    j->failed = 1;
    return;
  }
  MoeportWeights w = rows_from(j->gate_up, e * two_i + r);
  if (gemm(j->xg + s0 * j->hidden, count, j->hidden, PACKED(j, 1, e), &w, rows, h, rows))
    j->failed = 1;
  for (int64_t s = 0; s < count; s++)
    for (int64_t i = 0; i < rows / 2; i++)
      j->act[(s0 + s) * j->inter + r / 2 + i] = silu(h[s * rows + 2 * i]) * h[s * rows + 2 * i + 1];
  free(h);
}

static void moe_stage2(void* data, size_t item) { /* down rows [r, r + block2) of one expert -> out */
  MoeJob* j = (MoeJob*)data;
  int64_t e = j->items_e[item], r = j->items_r[item];
  int64_t rows = j->hidden - r < j->block2 ? j->hidden - r : j->block2, s0 = j->start[e];
  MoeportWeights w = rows_from(j->down, e * j->hidden + r);
  if (gemm(j->act + s0 * j->inter, EXPERT_ROWS(j, e), j->inter, PACKED(j, 2, e), &w, rows,
           j->out + s0 * j->hidden + r, j->hidden))
    j->failed = 1;
}

static size_t moe_items(MoeJob* j, int64_t rows, int64_t block) {
  size_t n = 0;
  for (int64_t e = 0; e < j->experts; e++) {
    if (!EXPERT_ROWS(j, e)) continue;
    for (int64_t r = 0; r < rows; r += block) {
      j->items_e[n] = e;
      j->items_r[n] = r;
      n++;
    }
  }
  return n;
}

/* Byte offsets of each expert's packed rows for a product with w; returns the total (0: nothing packed). */
static size_t moe_pack_offsets(MoeJob* j, const MoeportWeights* w, int64_t* off) {
  size_t total = 0;
  for (int64_t e = 0; e < j->experts; e++) {
    size_t bytes = EXPERT_ROWS(j, e) ? packed_bytes(EXPERT_ROWS(j, e), w) : 0;
    off[e] = bytes ? (int64_t)total : -1;
    total += bytes;
  }
  return total;
}

int moeport_moe(const float* x, int64_t tokens, int64_t hidden, const int64_t* idx, const float* weights, int64_t k,
                const MoeportWeights* gate_up, const MoeportWeights* down, int64_t experts, int64_t inter, float* y,
                moeport_parallel_for pfor, void* pctx, char* err, size_t err_len) {
  int64_t slots = tokens * k;
  memset(y, 0, (size_t)(tokens * hidden) * sizeof(float));
  if (slots == 0) return 0;
  for (int64_t s = 0; s < slots; s++) {
    if (idx[s] < 0 || idx[s] >= experts) {
      snprintf(err, err_len, "expert index %lld out of range [0, %lld) (token %lld)", (long long)idx[s],
               (long long)experts, (long long)(s / k));
      return -1;
    }
  }
  MoeJob j;
  memset(&j, 0, sizeof j);
  j.gate_up = gate_up;
  j.down = down;
  j.hidden = hidden;
  j.inter = inter;
  j.experts = experts;
  int64_t per_expert = slots / (experts < slots ? experts : slots);
  int64_t align = pack_kind(per_expert, gate_up) == PACK_AMX ? 32 : 4;
  j.block1 = row_block(2 * inter, per_expert, align); /* a multiple of 4: whole gate/up pairs */
  j.block2 = row_block(hidden, per_expert, align);
  int64_t max_items = experts * ((2 * inter + j.block1 - 1) / j.block1 + (hidden + j.block2 - 1) / j.block2);
  int64_t* ints = (int64_t*)calloc((size_t)(5 * (experts + 1) + 2 * slots + 2 * max_items), sizeof(int64_t));
  size_t floats = (size_t)(slots * (2 * hidden + inter)) + 16;
  MoeportBuffer work = moeport_buffer_get(floats * sizeof(float)), packed = {NULL, 0};
  float* xg = (float*)work.ptr;
  j.act = xg ? xg + slots * hidden : NULL;
  j.out = xg ? j.act + slots * inter : NULL;
  int rc = -1;
  if (!ints || !xg) {
    snprintf(err, err_len, "out of memory for %lld routed rows", (long long)slots);
    goto done;
  }
  j.start = ints;
  int64_t* fill = ints + (experts + 1);
  j.active = fill + (experts + 1);
  j.off1 = j.active + (experts + 1);
  j.off2 = j.off1 + (experts + 1);
  int64_t* slot_of = j.off2 + (experts + 1); /* [tokens * k] -> slot */
  j.items_e = slot_of + slots + slots;
  j.items_r = j.items_e + max_items;
  for (int64_t s = 0; s < slots; s++) j.start[idx[s] + 1]++;
  for (int64_t e = 0; e < experts; e++) j.start[e + 1] += j.start[e];
  memcpy(fill, j.start, (size_t)(experts + 1) * sizeof(int64_t));
  for (int64_t s = 0; s < slots; s++) { /* stable: token order within each expert */
    int64_t slot = fill[idx[s]]++;
    slot_of[s] = slot;
    memcpy(xg + slot * hidden, x + (s / k) * hidden, (size_t)hidden * sizeof(float));
  }
  j.xg = xg;
  size_t n_active = 0;
  for (int64_t e = 0; e < experts; e++)
    if (EXPERT_ROWS(&j, e)) j.active[n_active++] = e;
  size_t total1 = moe_pack_offsets(&j, gate_up, j.off1), total2 = moe_pack_offsets(&j, down, j.off2);
  if (total1 + total2) {
    packed = moeport_buffer_get(total1 + total2);
    j.packed1 = (uint8_t*)packed.ptr;
    if (!j.packed1) {
      snprintf(err, err_len, "out of memory for %lld routed rows", (long long)slots);
      goto done;
    }
    j.packed2 = j.packed1 + total1;
    if (total1) pfor(pctx, moe_pack1, n_active, &j);
  }
  if (!j.failed) pfor(pctx, moe_stage1, moe_items(&j, 2 * inter, j.block1), &j);
  if (!j.failed && total2) pfor(pctx, moe_pack2, n_active, &j);
  if (!j.failed) pfor(pctx, moe_stage2, moe_items(&j, hidden, j.block2), &j);
  if (j.failed) {
    snprintf(err, err_len, "out of memory in an expert kernel");
    goto done;
  }
  for (int64_t t = 0; t < tokens; t++) { /* fixed order: deterministic whatever the threads */
    float* yr = y + t * hidden;
    for (int64_t c = 0; c < k; c++) {
      const float* o = j.out + slot_of[t * k + c] * hidden;
      float wt = weights[t * k + c];
      for (int64_t h = 0; h < hidden; h++) yr[h] += wt * o[h];
    }
  }
  rc = 0;
done:
  free(ints);
  moeport_buffer_put(work);
  moeport_buffer_put(packed);
  return rc;
}

void moeport_serial_for(void* ctx, void (*fn)(void*, size_t), size_t n, void* data) {
  (void)ctx;
  for (size_t i = 0; i < n; i++) fn(data, i);
}

/* Entry points for tests (ctypes): the same kernels, run on the calling thread. */
int moeport_linear_serial(const float* x, int64_t m, int64_t k, const void* w, const float* scales, int64_t block,
                          int64_t n, float* y, int dtype) {
  MoeportWeights wt = {dtype & 0xff, (const uint8_t*)w, scales, k, block, (dtype & MOEPORT_ACT8) != 0};
  return moeport_linear(x, m, &wt, n, y, moeport_serial_for, NULL);
}

int moeport_moe_serial(const float* x, int64_t tokens, int64_t hidden, const int64_t* idx, const float* weights,
                       int64_t k, const void* gate_up, const float* gate_up_scales, const void* down,
                       const float* down_scales, int64_t block, int64_t experts, int64_t inter, float* y, int dtype,
                       char* err, size_t err_len) {
  int act8 = (dtype & MOEPORT_ACT8) != 0;
  MoeportWeights gu = {dtype & 0xff, (const uint8_t*)gate_up, gate_up_scales, hidden, block, act8};
  MoeportWeights dn = {dtype & 0xff, (const uint8_t*)down, down_scales, inter, block, act8};
  return moeport_moe(x, tokens, hidden, idx, weights, k, &gu, &dn, experts, inter, y, moeport_serial_for, NULL, err,
                     err_len);
}

/* ---- per-head products: y[..., h, s, :] = x[..., h, s, :] . W[h] --------------------------------
 * W [H, K, N] bf16, the layout of MLA's absorbed kv_b_proj halves (exporter/graph: "kv_b_proj.weight:k"
 * and ":v"). Read as stored (ONNX Runtime would fold their Cast into float32 copies: twice the bytes
 * per token, held twice); items are heads; each row of x streams W's K rows, 64 columns at a time,
 * widening them in registers. */
#define HEADS_COLS 64

typedef struct {
  const float* x;
  const uint16_t* w;
  float* y;
  int64_t outer, heads, seq, k, n, chunks;
} HeadsJob;

INLINE_ANY void heads_chunk(const HeadsJob* j, int64_t h, int64_t n0) {
  int64_t nn = j->n - n0 < HEADS_COLS ? j->n - n0 : HEADS_COLS;
  const uint16_t* wh = j->w + h * j->k * j->n + n0;
  for (int64_t o = 0; o < j->outer; o++)
    for (int64_t s = 0; s < j->seq; s++) {
      int64_t row = (o * j->heads + h) * j->seq + s;
      const float* xr = j->x + row * j->k;
      float acc[HEADS_COLS];
      for (int c = 0; c < HEADS_COLS; c++) acc[c] = 0.f;
      if (nn == HEADS_COLS) {
        for (int64_t kk = 0; kk < j->k; kk++) {
          const uint16_t* wr = wh + kk * j->n;
          float xv = xr[kk];
          for (int c = 0; c < HEADS_COLS; c++) acc[c] += xv * bf16_to_f32(wr[c]);
        }
      } else {
        for (int64_t kk = 0; kk < j->k; kk++) {
          const uint16_t* wr = wh + kk * j->n;
          float xv = xr[kk];
          for (int64_t c = 0; c < nn; c++) acc[c] += xv * bf16_to_f32(wr[c]);
        }
      }
      memcpy(j->y + row * j->n + n0, acc, (size_t)nn * sizeof(float));
    }
}

/* one item per head: its column chunks in turn */
INLINE_ANY void heads_rows(const HeadsJob* j, size_t item) {
  for (int64_t c = 0; c < j->chunks; c++) heads_chunk(j, (int64_t)item, c * HEADS_COLS);
}

static void heads_generic(void* data, size_t item) { heads_rows((const HeadsJob*)data, item); }
#ifdef MOEPORT_X86
AVX2 static void heads_avx2(void* data, size_t item) { heads_rows((const HeadsJob*)data, item); }
AVX512 static void heads_avx512(void* data, size_t item) { heads_rows((const HeadsJob*)data, item); }
#endif

int moeport_heads_matmul(const float* x, int64_t outer, int64_t heads, int64_t seq, int64_t k, const uint16_t* w,
                         int64_t n, float* y, moeport_parallel_for pfor, void* pctx) {
  if (outer == 0 || heads == 0 || seq == 0 || n == 0) return 0;
  HeadsJob j = {x, w, y, outer, heads, seq, k, n, (n + HEADS_COLS - 1) / HEADS_COLS};
  void (*fn)(void*, size_t) = heads_generic;
#ifdef MOEPORT_X86
  if (isa() >= ISA_AVX512)
    fn = heads_avx512;
  else if (isa() == ISA_AVX2)
    fn = heads_avx2;
#endif
  pfor(pctx, fn, (size_t)heads, &j);
  return 0;
}

int moeport_heads_matmul_serial(const float* x, int64_t outer, int64_t heads, int64_t seq, int64_t k,
                                const uint16_t* w, int64_t n, float* y) {
  return moeport_heads_matmul(x, outer, heads, seq, k, w, n, y, moeport_serial_for, NULL);
}
