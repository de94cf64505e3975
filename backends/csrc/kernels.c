/* moeport's CPU kernels for half-precision (bf16 / fp16) weights.
 *
 * ONNX Runtime's CPU execution provider has no bf16 MatMul, so without these a bf16 artifact is
 * widened to float32 when a session loads (twice the bytes read per token). These kernels read the
 * stored 2-byte weights directly and widen them in registers; activations and accumulation stay
 * float32, so results equal float32 math on the stored weights up to summation order.
 *
 *   moeport_linear: y[M, N] = x[M, K] . W[N, K]^T            (W in the checkpoint's [out, in] layout)
 *   moeport_moe:    DeepSeek's routed experts, the chosen experts only (see exporter/ops.py ``MoE``)
 *
 * Work is split into independent items run through a caller-given parallel-for (ONNX Runtime's
 * intra-op thread pool in ort_ops.c, a plain loop for tests). x86-64 gets AVX-512 paths, and AMX-BF16
 * tiles for bf16 products of more than 4 rows, chosen at run time; every machine has the portable C path.
 */
#include "kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define MOEPORT_X86 1
#include <immintrin.h>
#endif

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

static void widen_generic(const uint16_t* src, float* dst, int64_t n, int dtype) {
  if (dtype == MOEPORT_BF16)
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
  else
    for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

/* A per-thread buffer of at least `bytes`, grown on demand and kept (slot: one buffer per use). */
static void* thread_scratch(int slot, size_t bytes) {
  static __thread void* buf[2];
  static __thread size_t cap[2];
  if (bytes > cap[slot]) {
    free(buf[slot]);
    buf[slot] = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    cap[slot] = buf[slot] ? bytes : 0;
  }
  return buf[slot];
}
enum { SCRATCH_ROWS = 0, SCRATCH_TILES = 1 };

/* ---- portable GEMM: y[m, n] = sum_k x[m, k] w[n, k] for n in [0, rows) ------------------------ */

static void gemm_generic(const float* x, int64_t m_rows, int64_t ldx, const uint16_t* w, int64_t rows, int64_t k,
                         float* y, int64_t ldy, int dtype, float* scratch) {
  for (int64_t n = 0; n < rows; n++) {
    widen_generic(w + n * k, scratch, k, dtype);
    for (int64_t m = 0; m < m_rows; m++) {
      const float* xr = x + m * ldx;
      float acc = 0.f;
      for (int64_t i = 0; i < k; i++) acc += xr[i] * scratch[i];
      y[m * ldy + n] = acc;
    }
  }
}

/* ---- AVX-512 GEMM ---------------------------------------------------------------------------- */
#ifdef MOEPORT_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define INLINE static inline __attribute__((always_inline))

AVX512 INLINE __m512 load_w16(const uint16_t* p, int dtype, __mmask16 mask) {
  __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  if (dtype == MOEPORT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

/* MR rows of x against 4 rows of W, all of K. The rows are either the stored half-precision ones
 * (wtype = their dtype; widened in registers as they stream, row stride k) or 4 already widened float
 * rows (wtype 0; the scratch of widen_rows, zero-padded to row stride ldw). */
AVX512 INLINE void tile(const float* x, int64_t ldx, const void* w, int64_t ldw, int64_t k, float* y, int64_t ldy,
                        int mr, int nr, int wtype, int prefetch) {
  __m512 acc[4][4];
#pragma GCC unroll 4
  for (int m = 0; m < 4; m++)
#pragma GCC unroll 4
    for (int n = 0; n < 4; n++) acc[m][n] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    __mmask16 mask = (k - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1);
    __m512 wv[4];
    if (wtype) {
      const uint16_t* wh = (const uint16_t*)w;
      if (prefetch && !(i & 31)) /* 2 KB ahead in each row's stream, a line per row every 32 k */
#pragma GCC unroll 4
        for (int n = 0; n < 4; n++) _mm_prefetch((const char*)(wh + n * ldw + i + 1024), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int n = 0; n < 4; n++) wv[n] = n < nr ? load_w16(wh + n * ldw + i, wtype, mask) : _mm512_setzero_ps();
    } else {
#pragma GCC unroll 4
      for (int n = 0; n < 4; n++) wv[n] = _mm512_load_ps((const float*)w + n * ldw + i);
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

AVX512 INLINE void widen_rows(const uint16_t* w, int64_t nr, int64_t k, float* dst, int64_t kp, int dtype) {
  for (int64_t n = 0; n < 4; n++) {
    for (int64_t i = 0; i < kp; i += 16) {
      __mmask16 mask = 0;
      if (n < nr && i < k) mask = (k - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1);
      _mm512_store_ps(dst + n * kp + i, load_w16(w + n * k + i, dtype, mask));
    }
  }
}

AVX512 INLINE void gemm_avx512_t(const float* x, int64_t m_rows, int64_t ldx, const uint16_t* w, int64_t rows,
                                 int64_t k, float* y, int64_t ldy, int dtype, float* scratch) {
  int64_t kp = (k + 15) & ~(int64_t)15;
  for (int64_t n = 0; n < rows; n += 4) {
    int nr = rows - n < 4 ? (int)(rows - n) : 4;
    const uint16_t* wn = w + n * k;
    if (m_rows <= 4) { /* decode-sized: stream the weights once, widening in registers */
      int more = rows - n >= 8; /* prefetching past the last rows would read past the weights */
      switch (m_rows) {
        case 1: tile(x, ldx, wn, k, k, y + n, ldy, 1, nr, dtype, more); break;
        case 2: tile(x, ldx, wn, k, k, y + n, ldy, 2, nr, dtype, more); break;
        case 3: tile(x, ldx, wn, k, k, y + n, ldy, 3, nr, dtype, more); break;
        default: tile(x, ldx, wn, k, k, y + n, ldy, 4, nr, dtype, more); break;
      }
      continue;
    }
    /* more rows: widen these 4 weight rows once, then reuse them for every 4 rows of x */
    widen_rows(wn, nr, k, scratch, kp, dtype);
    int64_t m = 0;
    for (; m + 4 <= m_rows; m += 4) tile(x + m * ldx, ldx, scratch, kp, k, y + m * ldy + n, ldy, 4, nr, 0, 0);
    switch (m_rows - m) {
      case 1: tile(x + m * ldx, ldx, scratch, kp, k, y + m * ldy + n, ldy, 1, nr, 0, 0); break;
      case 2: tile(x + m * ldx, ldx, scratch, kp, k, y + m * ldy + n, ldy, 2, nr, 0, 0); break;
      case 3: tile(x + m * ldx, ldx, scratch, kp, k, y + m * ldy + n, ldy, 3, nr, 0, 0); break;
      default: break;
    }
  }
}

AVX512 static void gemm_avx512_bf16(const float* x, int64_t m_rows, int64_t ldx, const uint16_t* w, int64_t rows,
                                    int64_t k, float* y, int64_t ldy, float* scratch) {
  gemm_avx512_t(x, m_rows, ldx, w, rows, k, y, ldy, MOEPORT_BF16, scratch);
}

AVX512 static void gemm_avx512_f16(const float* x, int64_t m_rows, int64_t ldx, const uint16_t* w, int64_t rows,
                                   int64_t k, float* y, int64_t ldy, float* scratch) {
  gemm_avx512_t(x, m_rows, ldx, w, rows, k, y, ldy, MOEPORT_FP16, scratch);
}

/* ---- AMX-BF16 GEMM (Sapphire Rapids and later) -----------------------------------------------
 * Tiles compute y^T: A = 16 weight rows x 32 k (read in place from the [N, K] weights, bf16),
 * B = 32 k x 16 rows of x in the pair-interleaved layout AMX wants, packed once per call. x is split
 * into bf16 hi + lo parts (x = hi + lo to 2^-17) and both are multiplied, so the result keeps float32
 * accuracy: the weights are exact in bf16 and AMX accumulates in float32. */
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

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
  for (int t = 0; t < 6; t++) { /* every tile: 16 rows of 64 bytes */
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

/* 32 weight rows [32, K] -> K/32 pairs of 1 KB A tiles, contiguous. Loaded in place, the rows' 2K-byte
 * stride maps a tile's 16 lines to two L1 sets, and the loads stall on conflict misses. */
AMX static void amx_copy_rows(const uint16_t* w, int64_t k, uint16_t* dst) {
  int64_t kb_count = k / 32;
  for (int64_t r = 0; r < 32; r++) {
    const uint16_t* src = w + r * k;
    uint16_t* out = dst + (r / 16) * 512 + (r % 16) * 32;
    for (int64_t kb = 0; kb < kb_count; kb++)
      _mm512_store_si512((__m512i*)(out + kb * 1024), _mm512_loadu_si512(src + kb * 32));
  }
}


/* y[m, n] for n in [0, rows32), rows32 a multiple of 32, from packed x (hi, lo) and bf16 w. */
AMX static int amx_gemm(const uint16_t* hi, const uint16_t* lo, int64_t m_rows, const uint16_t* w, int64_t rows32,
                        int64_t k, float* y, int64_t ldy) {
  int64_t kb_count = k / 32;
  float c[2][256] __attribute__((aligned(64)));
  uint16_t* wt = (uint16_t*)thread_scratch(SCRATCH_TILES, (size_t)(32 * k) * sizeof(uint16_t));
  if (!wt) return -1;
  amx_configure();
  for (int64_t n = 0; n < rows32; n += 32) {
    amx_copy_rows(w + n * k, k, wt);
    for (int64_t mb = 0; mb * 16 < m_rows; mb++) {
      const uint16_t* ph = hi + mb * kb_count * 512;
      const uint16_t* pl = lo + mb * kb_count * 512;
      _tile_zero(0);
      _tile_zero(1);
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

/* ---- dispatch ------------------------------------------------------------------------------- */

enum { ISA_GENERIC = 0, ISA_AVX512 = 1, ISA_AMX = 2 };

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

/* The best code path of this CPU; MOEPORT_KERNELS_ISA=generic|avx512 caps it (for tests and comparisons). */
static int isa(void) {
  static int cached = -1;
  if (cached >= 0) return cached;
  int level = ISA_GENERIC;
#ifdef MOEPORT_X86
  const char* env = getenv("MOEPORT_KERNELS_ISA");
  int cap = !env || !*env                  ? ISA_AMX
            : strcmp(env, "generic") == 0 ? ISA_GENERIC
            : strcmp(env, "avx512") == 0  ? ISA_AVX512
                                          : ISA_AMX;
  __builtin_cpu_init();
  if (cap >= ISA_AVX512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    level = ISA_AVX512;
  if (level == ISA_AVX512 && cap >= ISA_AMX && amx_usable()) level = ISA_AMX;
#endif
  cached = level;
  return level;
}

const char* moeport_kernels_isa(void) {
  static const char* names[] = {"generic", "avx512", "avx512+amx-bf16"};
  return names[isa()];
}

/* Whether a product of m rows of x with bf16 weights over k goes to the AMX tiles (x packed first). */
static int use_amx(int64_t m, int64_t k, int dtype) {
  return m > 4 && k % 32 == 0 && dtype == MOEPORT_BF16 && isa() == ISA_AMX;
}

static size_t packed_elems(int64_t m, int64_t k) { return (size_t)((m + 15) / 16) * (size_t)(k / 32) * 512; }


/* y[m, n] = sum_k x[m, k] w[n, k] for `rows` rows of w; hi/lo: x packed for AMX (or NULL). */
static int gemm(const float* x, int64_t m_rows, int64_t ldx, const uint16_t* hi, const uint16_t* lo,
                const uint16_t* w, int64_t rows, int64_t k, float* y, int64_t ldy, int dtype) {
  /* 4 widened weight rows, zero-padded to a multiple of 16 */
  float* scratch = (float*)thread_scratch(SCRATCH_ROWS, (size_t)(4 * (((k + 15) & ~(int64_t)15) + 16)) * 4);
  if (!scratch) return -1;
#ifdef MOEPORT_X86
  if (hi && rows >= 32) {
    int64_t rows32 = rows & ~(int64_t)31;
    if (amx_gemm(hi, lo, m_rows, w, rows32, k, y, ldy)) return -1;
    w += rows32 * k;
    y += rows32;
    rows -= rows32;
    if (!rows) return 0;
  }
  if (isa() >= ISA_AVX512) {
    if (dtype == MOEPORT_BF16)
      gemm_avx512_bf16(x, m_rows, ldx, w, rows, k, y, ldy, scratch);
    else
      gemm_avx512_f16(x, m_rows, ldx, w, rows, k, y, ldy, scratch);
    return 0;
  }
#endif
  (void)hi;
  (void)lo;
  gemm_generic(x, m_rows, ldx, w, rows, k, y, ldy, dtype, scratch);
  return 0;
}

static int pack(const float* x, int64_t m, int64_t ldx, int64_t k, uint16_t* hi, uint16_t* lo) {
#ifdef MOEPORT_X86
  amx_pack(x, m, ldx, k, hi, lo);
  return 0;
#else
  (void)x, (void)m, (void)ldx, (void)k, (void)hi, (void)lo;
  return -1;
#endif
}


/* ---- workspace ------------------------------------------------------------------------------
 * A call's large buffers are kept for the next call: fresh allocations of this size come straight
 * from mmap, and the kernel zeroing their pages cost as much as the expert products themselves. */
#include <pthread.h>

typedef struct {
  void* ptr;
  size_t size;
} Buffer;

#define POOL_SLOTS 8
static Buffer g_pool[POOL_SLOTS];
static pthread_mutex_t g_pool_lock = PTHREAD_MUTEX_INITIALIZER;

static Buffer buffer_get(size_t size) {
  Buffer found = {NULL, 0};
  pthread_mutex_lock(&g_pool_lock);
  int best = -1;
  for (int i = 0; i < POOL_SLOTS; i++)
    if (g_pool[i].ptr && g_pool[i].size >= size && (best < 0 || g_pool[i].size < g_pool[best].size)) best = i;
  if (best >= 0) {
    found = g_pool[best];
    g_pool[best].ptr = NULL;
  }
  pthread_mutex_unlock(&g_pool_lock);
  if (found.ptr) return found;
  found.size = (size + 4095) & ~(size_t)4095;
  found.ptr = aligned_alloc(64, found.size ? found.size : 4096);
  return found;
}

static void buffer_put(Buffer b) {
  if (!b.ptr) return;
  pthread_mutex_lock(&g_pool_lock);
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
  Buffer evicted = g_pool[slot];
  g_pool[slot] = b;
  pthread_mutex_unlock(&g_pool_lock);
  free(evicted.ptr);
}

/* ---- Linear: items are blocks of output rows ------------------------------------------------ */

typedef struct {
  const float* x;
  const uint16_t *w, *hi, *lo;
  float* y;
  int64_t m, n, k, block;
  int dtype;
  volatile int failed;
} LinearJob;

static void linear_item(void* data, size_t item) {
  LinearJob* j = (LinearJob*)data;
  int64_t n0 = (int64_t)item * j->block, rows = j->n - n0 < j->block ? j->n - n0 : j->block;
  if (gemm(j->x, j->m, j->k, j->hi, j->lo, j->w + n0 * j->k, rows, j->k, j->y + n0, j->n, j->dtype)) j->failed = 1;
}

/* Output rows per work item: enough items to share out, each a multiple of `align` rows. */
static int64_t row_block(int64_t n, int64_t m, int64_t align) {
  int64_t block = m <= 4 ? 64 : 32;
  if (n / block < 8) block = n / 8;
  block = (block + align - 1) / align * align;
  return block < align ? align : block;
}

int moeport_linear(const float* x, int64_t m, int64_t k, const uint16_t* w, int64_t n, float* y, int dtype,
                   moeport_parallel_for pfor, void* pctx) {
  if (m == 0 || n == 0) return 0;
  int amx = use_amx(m, k, dtype);
  LinearJob job = {x, w, NULL, NULL, y, m, n, k, row_block(n, m, amx ? 32 : 4), dtype, 0};
  Buffer packed = {NULL, 0};
  if (amx) {
    size_t elems = packed_elems(m, k);
    packed = buffer_get(2 * elems * sizeof(uint16_t));
    if (!packed.ptr || pack(x, m, k, k, (uint16_t*)packed.ptr, (uint16_t*)packed.ptr + elems)) {
      buffer_put(packed);
      return -1;
    }
    job.hi = (uint16_t*)packed.ptr;
    job.lo = job.hi + elems;
  }
  pfor(pctx, linear_item, (size_t)((n + job.block - 1) / job.block), &job);
  buffer_put(packed);
  return job.failed ? -1 : 0;
}

/* ---- MoE ------------------------------------------------------------------------------------- */

typedef struct {
  const uint16_t *gate_up, *down;
  int64_t hidden, inter, experts;
  int dtype;
  /* routing, grouped by expert: slot s holds a row of token s's choices; expert e owns [start[e], start[e+1]) */
  int64_t* start;
  const float* xg;   /* [slots, hidden] the routed rows of x */
  float* act;        /* [slots, inter]  silu(gate) * up */
  float* out;        /* [slots, hidden] each expert's output */
  int64_t *items_e, *items_r, *active; /* work items: (expert, first row); experts with tokens */
  int64_t *off1, *off2;                /* per expert: offset of its packed rows (AMX), or -1 */
  uint16_t *packed1, *packed2;         /* hi parts, then lo parts (sizes total1, total2) */
  size_t total1, total2;
  int64_t block1, block2;
  volatile int failed;
} MoeJob;

static inline float silu(float v) { return v / (1.f + expf(-v)); }

#define EXPERT_ROWS(j, e) ((j)->start[(e) + 1] - (j)->start[e])
#define PACKED(j, n, e, lo) \
  ((j)->off##n[e] < 0 ? NULL : (j)->packed##n + (lo ? (j)->total##n : 0) + (j)->off##n[e])

static void moe_pack1(void* data, size_t item) { /* x rows of one expert -> AMX layout */
  MoeJob* j = (MoeJob*)data;
  int64_t e = j->active[item];
  if (j->off1[e] >= 0 && pack(j->xg + j->start[e] * j->hidden, EXPERT_ROWS(j, e), j->hidden, j->hidden,
                              PACKED(j, 1, e, 0), PACKED(j, 1, e, 1)))
    j->failed = 1;
}

static void moe_pack2(void* data, size_t item) { /* activations of one expert -> AMX layout */
  MoeJob* j = (MoeJob*)data;
  int64_t e = j->active[item];
  if (j->off2[e] >= 0 && pack(j->act + j->start[e] * j->inter, EXPERT_ROWS(j, e), j->inter, j->inter,
                              PACKED(j, 2, e, 0), PACKED(j, 2, e, 1)))
    j->failed = 1;
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
  const uint16_t* w = j->gate_up + (e * two_i + r) * j->hidden;
  if (gemm(j->xg + s0 * j->hidden, count, j->hidden, PACKED(j, 1, e, 0), PACKED(j, 1, e, 1), w, rows, j->hidden, h,
           rows, j->dtype))
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
  const uint16_t* w = j->down + (e * j->hidden + r) * j->inter;
  if (gemm(j->act + s0 * j->inter, EXPERT_ROWS(j, e), j->inter, PACKED(j, 2, e, 0), PACKED(j, 2, e, 1), w, rows,
           j->inter, j->out + s0 * j->hidden + r, j->hidden, j->dtype))
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

/* Offsets of each expert's packed rows for a product over k; returns the total (0: nothing packed). */
static size_t moe_pack_offsets(MoeJob* j, int64_t k, int64_t* off) {
  size_t total = 0;
  for (int64_t e = 0; e < j->experts; e++) {
    off[e] = -1;
    if (use_amx(EXPERT_ROWS(j, e), k, j->dtype)) {
      off[e] = (int64_t)total;
      total += packed_elems(EXPERT_ROWS(j, e), k);
    }
  }
  return total;
}

int moeport_moe(const float* x, int64_t tokens, int64_t hidden, const int64_t* idx, const float* weights, int64_t k,
                const uint16_t* gate_up, const uint16_t* down, int64_t experts, int64_t inter, float* y, int dtype,
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
  j.dtype = dtype;
  int64_t per_expert = slots / (experts < slots ? experts : slots), align = use_amx(per_expert, 32, dtype) ? 32 : 4;
  j.block1 = row_block(2 * inter, per_expert, align); /* a multiple of 4: whole gate/up pairs */
  j.block2 = row_block(hidden, per_expert, align);
  int64_t max_items = experts * ((2 * inter + j.block1 - 1) / j.block1 + (hidden + j.block2 - 1) / j.block2);
  int64_t* ints = (int64_t*)calloc((size_t)(5 * (experts + 1) + 2 * slots + 2 * max_items), sizeof(int64_t));
  size_t floats = (size_t)(slots * (2 * hidden + inter)) + 16;
  Buffer work = buffer_get(floats * sizeof(float)), packed = {NULL, 0};
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
  j.total1 = moe_pack_offsets(&j, hidden, j.off1);
  j.total2 = moe_pack_offsets(&j, inter, j.off2);
  if (j.total1 + j.total2) {
    packed = buffer_get(2 * (j.total1 + j.total2) * sizeof(uint16_t));
    j.packed1 = (uint16_t*)packed.ptr;
    if (!j.packed1) {
      snprintf(err, err_len, "out of memory for %lld routed rows", (long long)slots);
      goto done;
    }
    j.packed2 = j.packed1 + 2 * j.total1;
    pfor(pctx, moe_pack1, n_active, &j);
  }
  if (!j.failed) pfor(pctx, moe_stage1, moe_items(&j, 2 * inter, j.block1), &j);
  if (!j.failed && j.total2) pfor(pctx, moe_pack2, n_active, &j);
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
  buffer_put(work);
  buffer_put(packed);
  return rc;
}

static void serial_for(void* ctx, void (*fn)(void*, size_t), size_t n, void* data) {
  (void)ctx;
  for (size_t i = 0; i < n; i++) fn(data, i);
}

/* Entry points for tests (ctypes): the same kernels, run on the calling thread. */
int moeport_linear_serial(const float* x, int64_t m, int64_t k, const uint16_t* w, int64_t n, float* y, int dtype) {
  return moeport_linear(x, m, k, w, n, y, dtype, serial_for, NULL);
}

int moeport_moe_serial(const float* x, int64_t tokens, int64_t hidden, const int64_t* idx, const float* weights,
                       int64_t k, const uint16_t* gate_up, const uint16_t* down, int64_t experts, int64_t inter,
                       float* y, int dtype, char* err, size_t err_len) {
  return moeport_moe(x, tokens, hidden, idx, weights, k, gate_up, down, experts, inter, y, dtype, serial_for, NULL,
                     err, err_len);
}
