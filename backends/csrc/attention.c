/* moeport's fused attention over DeepSeek's MLA latent cache (exporter/ops.py ``LatentAttention``).
 *
 * In MLA's absorbed form every cached latent row (kv_lora_rank + qk_rope_head_dim values) is both the
 * key and the value of all heads, so one pass over the cache serves every head: the kernel reads each
 * row of a tile of keys once, scores it against all query rows of the work item (heads x positions),
 * and adds it to their outputs, with an online softmax (flash attention) so that nothing of size T is
 * kept. The cache is read where the runtime keeps it: past rows and this step's rows are two tensors,
 * never joined into one.
 *
 * Work items: (batch row, block of query positions, range of keys). Decode has few query rows, so its
 * keys are split into ranges whose partial results (max, sum, output) are merged afterwards
 * (flash-decoding); prefill splits the query positions instead. A tile of keys that no query of the
 * item may see (the causal future, padding) is skipped.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#define MOEPORT_X86 1
#include <immintrin.h>
#endif

#define KT 32        /* keys per tile */
#define RG 8         /* query rows per register group (rows are padded to a multiple) */
#define DG 48        /* values per output register block: 3 vectors (row length padded to a multiple) */
#define ITEM_ROWS 64 /* query rows (heads x positions) per prefill work item */
#ifndef PREFETCH
#define PREFETCH 4096 /* bytes ahead of the key rows being scored (cache rows are read in order) */
#endif

typedef struct {
  const float *q, *past, *fresh;
  const uint8_t* allowed;
  float* out;
  float* partial; /* split keys: per item [prow][dp] outputs, then the running max and sum per row */
  int64_t batch, heads, seq, dim, past_len, keys, dp;
  int64_t qb, nqb, nsplit, allowed_bstride;
  int64_t prow; /* rows of a partial result (those of a full query block) */
  float scale;
  int avx512, avx2;
  volatile int failed;
} AttnJob;

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

/* Work item bq's batch row b, first query position s0 and number of positions. */
static inline int64_t query_block(const AttnJob* j, int64_t bq, int64_t* b, int64_t* s0) {
  *b = bq / j->nqb;
  *s0 = bq % j->nqb * j->qb;
  return j->seq - *s0 < j->qb ? j->seq - *s0 : j->qb;
}

/* Offset in q and out of an item's row r: rows are position-major, row r is head r % heads of position
 * s0 + r / heads. */
static inline int64_t row_offset(const AttnJob* j, int64_t b, int64_t s0, int64_t r) {
  return ((b * j->heads + r % j->heads) * j->seq + s0 + r / j->heads) * j->dim;
}

static inline const float* key_row(const AttnJob* j, int64_t b, int64_t t) {
  if (t < j->past_len) return j->past + (b * j->past_len + t) * j->dim;
  return j->fresh + (b * j->seq + t - j->past_len) * j->dim;
}

/* ---- portable kernels ------------------------------------------------------------------------- */

/* sc[r][i] = qs[r] . k_i for `rows` rows and nk keys */
static void scores_generic(const float* qs, int64_t dp, const float* const* kp, int64_t nk, int64_t dim, float* sc,
                           int64_t rows) {
  for (int64_t r = 0; r < rows; r++)
    for (int64_t i = 0; i < nk; i++) {
      float acc = 0.f;
      for (int64_t d = 0; d < dim; d++) acc += qs[r * dp + d] * kp[i][d];
      sc[r * KT + i] = acc;
    }
}

/* O[r] = alpha[r] * O[r] + sum_i p[r][i] * k_i */
static void pv_generic(const float* p, const float* alpha, const float* const* kp, int64_t nk, int64_t dim, float* o,
                       int64_t dp, int64_t rows) {
  for (int64_t r = 0; r < rows; r++) {
    float* orow = o + r * dp;
    for (int64_t d = 0; d < dim; d++) orow[d] *= alpha[r];
    for (int64_t i = 0; i < nk; i++)
      for (int64_t d = 0; d < dim; d++) orow[d] += p[r * KT + i] * kp[i][d];
  }
}

/* One row's scores of a tile -> probabilities (in place), with its running max m and sum l; vis marks
 * the visible keys. Returns the factor for the row's earlier output. */
static float softmax_generic(float* s, const uint8_t* vis, int64_t nk, float* m, float* l) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < nk; i++)
    if (vis[i] && s[i] > mx) mx = s[i];
  if (mx == -INFINITY) { /* nothing visible in this tile */
    for (int64_t i = 0; i < nk; i++) s[i] = 0.f;
    return 1.f;
  }
  float mnew = *m > mx ? *m : mx, alpha = expf(*m - mnew), sum = 0.f;
  for (int64_t i = 0; i < nk; i++) {
    s[i] = vis[i] ? expf(s[i] - mnew) : 0.f;
    sum += s[i];
  }
  *l = *l * alpha + sum;
  *m = mnew;
  return alpha;
}

/* ---- AVX2 kernels (the portable ones with 8-wide dot products and updates) --------------------- */
#ifdef MOEPORT_X86
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static void scores_avx2(const float* qs, int64_t dp, const float* const* kp, int64_t nk, int64_t dim, float* sc,
                             int64_t rows) {
  int64_t d8 = dim & ~(int64_t)7;
  for (int64_t r = 0; r < rows; r++)
    for (int64_t i = 0; i < nk; i++) {
      const float *qr = qs + r * dp, *k = kp[i];
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 16 <= d8; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(k + d), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d + 8), _mm256_loadu_ps(k + d + 8), a1);
      }
      if (d < d8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(k + d), a0);
      a0 = _mm256_add_ps(a0, a1);
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
      s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
      float acc = _mm_cvtss_f32(s4);
      for (d = d8; d < dim; d++) acc += qr[d] * k[d];
      sc[r * KT + i] = acc;
    }
}

AVX2 static void pv_avx2(const float* p, const float* alpha, const float* const* kp, int64_t nk, int64_t dim, float* o,
                         int64_t dp, int64_t rows) {
  int64_t d8 = dim & ~(int64_t)7;
  for (int64_t r = 0; r < rows; r++) {
    float* orow = o + r * dp;
    __m256 a = _mm256_set1_ps(alpha[r]);
    for (int64_t d = 0; d < d8; d += 8) _mm256_storeu_ps(orow + d, _mm256_mul_ps(_mm256_loadu_ps(orow + d), a));
    for (int64_t d = d8; d < dim; d++) orow[d] *= alpha[r];
    for (int64_t i = 0; i < nk; i++) {
      float pr = p[r * KT + i];
      __m256 pv = _mm256_set1_ps(pr);
      const float* k = kp[i];
      for (int64_t d = 0; d < d8; d += 8)
        _mm256_storeu_ps(orow + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(k + d), _mm256_loadu_ps(orow + d)));
      for (int64_t d = d8; d < dim; d++) orow[d] += pr * k[d];
    }
  }
}
#endif

/* ---- AVX-512 kernels -------------------------------------------------------------------------- */
#ifdef MOEPORT_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define INLINE static inline __attribute__((always_inline))

/* e^x: 2^n e^r with n = round(x / ln 2), r = x - n ln 2 in two parts, e^r by its Taylor polynomial of
 * degree 6 (|r| <= ln 2 / 2: relative error ~1e-7); x is clamped to [-88, 88]. */
AVX512 INLINE __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

static inline __mmask16 chunk_mask(int64_t dim, int64_t c) { /* values [16c, 16c + 16) that exist */
  int64_t left = dim - 16 * c;
  return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

/* 128-bit lane k of the result: a, b, c, d each summed over their lane k */
AVX512 INLINE __m512 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
}

/* lane j: the sum of v[j]'s lanes */
AVX512 INLINE __m512 sum16(const __m512* v) {
  __m512 s0 = sum4(v[0], v[1], v[2], v[3]), s1 = sum4(v[4], v[5], v[6], v[7]);
  __m512 s2 = sum4(v[8], v[9], v[10], v[11]), s3 = sum4(v[12], v[13], v[14], v[15]);
  __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(s0, s1, 0x88), _mm512_shuffle_f32x4(s0, s1, 0xDD));
  __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(s2, s3, 0x88), _mm512_shuffle_f32x4(s2, s3, 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xDD));
}

/* Scores of RG query rows (qs, zero-padded to dp) against nk keys, two keys at a time, stored key-major:
 * st[i * RG + r] (a duplicate pair member past nk is computed and ignored). */
AVX512 static void scores_avx512(const float* qs, int64_t dp, const float* const* kp, int64_t nk, int64_t dim,
                                 float* st) {
  int64_t nc = (dim + 15) / 16;
  for (int64_t i = 0; i < nk; i += 2) {
    const float *k0 = kp[i], *k1 = kp[i + 1 < nk ? i + 1 : i];
    __m512 a[2 * RG];
    for (int r = 0; r < 2 * RG; r++) a[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; c++) {
      __mmask16 mk = chunk_mask(dim, c);
      __m512 x0 = _mm512_maskz_loadu_ps(mk, k0 + 16 * c), x1 = _mm512_maskz_loadu_ps(mk, k1 + 16 * c);
      _mm_prefetch((const char*)(k0 + 16 * c) + PREFETCH, _MM_HINT_T0);
      _mm_prefetch((const char*)(k1 + 16 * c) + PREFETCH, _MM_HINT_T0);
      for (int r = 0; r < RG; r++) {
        __m512 qv = _mm512_load_ps(qs + r * dp + 16 * c);
        a[r] = _mm512_fmadd_ps(x0, qv, a[r]);
        a[RG + r] = _mm512_fmadd_ps(x1, qv, a[RG + r]);
      }
    }
    _mm512_store_ps(st + i * RG, sum16(a));
  }
}

/* O[r] = alpha[r] * O[r] + sum_i p[i][r] * k_i for RG rows, DG values at a time (O is padded to dp). */
AVX512 static void pv_avx512(const float* pt, const float* alpha, const float* const* kp, int64_t nk, int64_t dim,
                             float* o, int64_t dp) {
  for (int64_t c = 0; c < dp; c += DG) {
    __mmask16 m0 = chunk_mask(dim, c / 16), m1 = chunk_mask(dim, c / 16 + 1), m2 = chunk_mask(dim, c / 16 + 2);
    __m512 acc[RG][3];
    for (int r = 0; r < RG; r++) {
      __m512 al = _mm512_set1_ps(alpha[r]);
      for (int v = 0; v < 3; v++) acc[r][v] = _mm512_mul_ps(_mm512_load_ps(o + r * dp + c + 16 * v), al);
    }
    for (int64_t i = 0; i < nk; i++) {
      const float* k = kp[i] + c;
      __m512 x0 = _mm512_maskz_loadu_ps(m0, k), x1 = _mm512_maskz_loadu_ps(m1, k + 16),
             x2 = _mm512_maskz_loadu_ps(m2, k + 32);
      for (int r = 0; r < RG; r++) {
        __m512 pr = _mm512_set1_ps(pt[i * RG + r]);
        acc[r][0] = _mm512_fmadd_ps(x0, pr, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x1, pr, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(x2, pr, acc[r][2]);
      }
    }
    for (int r = 0; r < RG; r++)
      for (int v = 0; v < 3; v++) _mm512_store_ps(o + r * dp + c + 16 * v, acc[r][v]);
  }
}

/* The online softmax step of RG rows over a tile of key-major scores st (turned into probabilities in
 * place): rowmask[i] has bit r set when row r sees key i. Updates the rows' running max m and sum l and
 * gives alpha, the factor for their earlier outputs. */
AVX512 static void softmax_avx512(float* st, const uint8_t* rowmask, int64_t nk, float* m, float* l, float* alpha) {
  int64_t pairs = (nk + 1) / 2;
  __m512 ninf = _mm512_set1_ps(-INFINITY), mx = ninf;
  for (int64_t i = 0; i < pairs; i++) {
    __mmask16 vm = (__mmask16)(rowmask[2 * i] | (2 * i + 1 < nk ? rowmask[2 * i + 1] << 8 : 0));
    mx = _mm512_mask_max_ps(mx, vm, mx, _mm512_load_ps(st + 2 * i * RG));
  }
  mx = _mm512_max_ps(mx, _mm512_shuffle_f32x4(mx, mx, 0x4E)); /* both halves: each row's max */
  __m512 mold = _mm512_broadcast_f32x8(_mm256_loadu_ps(m)), mnew = _mm512_max_ps(mold, mx);
  __mmask16 none = _mm512_cmp_ps_mask(mnew, ninf, _CMP_EQ_OQ); /* rows that have seen no key yet */
  __m512 al = _mm512_mask_mov_ps(exp16(_mm512_sub_ps(mold, mnew)), none, _mm512_set1_ps(1.f));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; i++) {
    __mmask16 vm = (__mmask16)(rowmask[2 * i] | (2 * i + 1 < nk ? rowmask[2 * i + 1] << 8 : 0));
    __m512 p = _mm512_maskz_mov_ps(vm, exp16(_mm512_sub_ps(_mm512_load_ps(st + 2 * i * RG), mnew)));
    _mm512_store_ps(st + 2 * i * RG, p);
    sum = _mm512_add_ps(sum, p);
  }
  sum = _mm512_add_ps(sum, _mm512_shuffle_f32x4(sum, sum, 0x4E));
  __m256 lnew = _mm256_fmadd_ps(_mm256_loadu_ps(l), _mm512_castps512_ps256(al), _mm512_castps512_ps256(sum));
  _mm256_storeu_ps(l, lnew);
  _mm256_storeu_ps(m, _mm512_castps512_ps256(mnew));
  _mm256_storeu_ps(alpha, _mm512_castps512_ps256(al));
}
#endif /* MOEPORT_X86 */

/* ---- work items ------------------------------------------------------------------------------- */

/* The mean of all keys of batch row b: what the reference gives a query that sees none. */
static void mean_of_keys(const AttnJob* j, int64_t b, float* dst) {
  memset(dst, 0, (size_t)j->dim * sizeof(float));
  for (int64_t t = 0; t < j->keys; t++) {
    const float* k = key_row(j, b, t);
    for (int64_t d = 0; d < j->dim; d++) dst[d] += k[d];
  }
  for (int64_t d = 0; d < j->dim; d++) dst[d] /= (float)j->keys;
}

/* Bit i set when vis[i] != 0, for i < nk <= 32. */
static uint32_t tile_bits(const uint8_t* vis, int64_t nk) {
  uint32_t bits = 0;
  for (int64_t i = 0; i < nk; i++) bits |= (uint32_t)(vis[i] != 0) << i;
  return bits;
}

/* rowmask[i], bit r: row g + r of the item (position (g + r) / heads) sees key i of the tile. */
static void tile_rowmask(const uint32_t* vbits, int64_t g, int64_t rows, int64_t heads, int64_t nk, uint8_t* rowmask) {
  int64_t last = (g + RG < rows ? g + RG : rows) - 1;
  memset(rowmask, 0, KT);
  if (last < g) return;
  if (g / heads == last / heads) { /* one position: the same mask for every row */
    uint8_t full = (uint8_t)((1u << (last - g + 1)) - 1);
    for (int64_t i = 0; i < nk; i++) rowmask[i] = (vbits[g / heads] >> i) & 1 ? full : 0;
    return;
  }
  for (int64_t r = g; r <= last; r++)
    for (int64_t i = 0; i < nk; i++) rowmask[i] |= (uint8_t)(((vbits[r / heads] >> i) & 1) << (r - g));
}

static void attention_item(void* data, size_t item) {
  AttnJob* j = (AttnJob*)data;
  int64_t split = (int64_t)item % j->nsplit, b, s0, ns = query_block(j, (int64_t)item / j->nsplit, &b, &s0);
  int64_t rows = j->heads * ns, rp = round_up(rows, RG), dp = j->dp, dim = j->dim;
  int64_t per = (j->keys + j->nsplit - 1) / j->nsplit, k0 = split * per, k1 = k0 + per < j->keys ? k0 + per : j->keys;

  float* scratch = (float*)moeport_thread_scratch(MOEPORT_SCRATCH_ATTENTION,
                                                  (size_t)(2 * rp * dp + rp * KT + 3 * rp) * sizeof(float));
  if (!scratch) {
    j->failed = 1;
    return;
  }
  /* m[r] stays -inf while row r has seen no key */
  float *qs = scratch, *o = qs + rp * dp, *sc = o + rp * dp, *m = sc + rp * KT, *l = m + rp, *alpha = l + rp;
  memset(qs, 0, (size_t)(2 * rp * dp) * sizeof(float));
  for (int64_t r = 0; r < rows; r++) {
    const float* src = j->q + row_offset(j, b, s0, r);
    for (int64_t d = 0; d < dim; d++) qs[r * dp + d] = src[d] * j->scale;
  }
  for (int64_t r = 0; r < rp; r++) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  const uint8_t* vis0 = j->allowed + b * j->allowed_bstride + s0 * j->keys; /* position s0's row of `allowed` */
  const float* kp[KT];
  for (int64_t t0 = k0; t0 < k1; t0 += KT) {
    int64_t nk = k1 - t0 < KT ? k1 - t0 : KT;
    uint32_t vbits[ITEM_ROWS], any = 0; /* bit i: position s may see key t0 + i */
    for (int64_t s = 0; s < ns; s++) any |= vbits[s] = tile_bits(vis0 + s * j->keys + t0, nk);
    if (!any) continue;
    for (int64_t i = 0; i < KT; i++) kp[i] = key_row(j, b, t0 + (i < nk ? i : nk - 1));
#ifdef MOEPORT_X86
    if (j->avx512) {
      for (int64_t g = 0; g < rp; g += RG) {
        uint8_t rowmask[KT];
        tile_rowmask(vbits, g, rows, j->heads, nk, rowmask);
        float* st = sc + g * KT;
        scores_avx512(qs + g * dp, dp, kp, nk, dim, st);
        softmax_avx512(st, rowmask, nk, m + g, l + g, alpha + g);
        pv_avx512(st, alpha + g, kp, nk, dim, o + g * dp, dp);
      }
      continue;
    }
#endif
#ifdef MOEPORT_X86
    if (j->avx2) {
      scores_avx2(qs, dp, kp, nk, dim, sc, rows);
      for (int64_t r = 0; r < rows; r++)
        alpha[r] = softmax_generic(sc + r * KT, vis0 + (r / j->heads) * j->keys + t0, nk, m + r, l + r);
      pv_avx2(sc, alpha, kp, nk, dim, o, dp, rows);
      continue;
    }
#endif
    scores_generic(qs, dp, kp, nk, dim, sc, rows);
    for (int64_t r = 0; r < rows; r++) {
      alpha[r] = softmax_generic(sc + r * KT, vis0 + (r / j->heads) * j->keys + t0, nk, m + r, l + r);
    }
    pv_generic(sc, alpha, kp, nk, dim, o, dp, rows);
  }

  if (j->nsplit > 1) { /* partial results, merged by attention_merge */
    int64_t pr = j->prow;
    float* part = j->partial + (int64_t)item * pr * (dp + 2);
    memcpy(part, o, (size_t)(rows * dp) * sizeof(float));
    memcpy(part + pr * dp, m, (size_t)rows * sizeof(float));
    memcpy(part + pr * dp + pr, l, (size_t)rows * sizeof(float));
    return;
  }
  for (int64_t r = 0; r < rows; r++) {
    float* dst = j->out + row_offset(j, b, s0, r);
    if (m[r] == -INFINITY) {
      mean_of_keys(j, b, dst);
      continue;
    }
    float inv = 1.f / l[r];
    for (int64_t d = 0; d < dim; d++) dst[d] = o[r * dp + d] * inv;
  }
}

/* Merges the key ranges' partial results of one (batch row, query block). */
static void attention_merge(void* data, size_t bq) {
  AttnJob* j = (AttnJob*)data;
  int64_t b, s0, ns = query_block(j, (int64_t)bq, &b, &s0);
  int64_t rows = j->heads * ns, pr = j->prow, dp = j->dp, dim = j->dim, stride = pr * (dp + 2);
  const float* first = j->partial + (int64_t)bq * j->nsplit * stride;
  for (int64_t r = 0; r < rows; r++) {
    float* dst = j->out + row_offset(j, b, s0, r);
    float mx = -INFINITY; /* stays -inf if no range saw a key for this row */
    for (int64_t s = 0; s < j->nsplit; s++) {
      float ms = first[s * stride + pr * dp + r];
      if (ms > mx) mx = ms;
    }
    if (mx == -INFINITY) {
      mean_of_keys(j, b, dst);
      continue;
    }
    float total = 0.f;
    memset(dst, 0, (size_t)dim * sizeof(float));
    for (int64_t s = 0; s < j->nsplit; s++) {
      const float* part = first + s * stride;
      if (part[pr * dp + r] == -INFINITY) continue;
      float w = expf(part[pr * dp + r] - mx);
      total += w * part[pr * dp + pr + r];
      for (int64_t d = 0; d < dim; d++) dst[d] += w * part[r * dp + d];
    }
    float inv = 1.f / total;
    for (int64_t d = 0; d < dim; d++) dst[d] *= inv;
  }
}

int moeport_latent_attention(const float* q, int64_t batch, int64_t heads, int64_t seq, int64_t dim, const float* past,
                             int64_t past_len, const float* fresh, const uint8_t* allowed, int allowed_batched,
                             float scale, float* out, moeport_parallel_for pfor, void* pctx) {
  if (batch == 0 || heads == 0 || seq == 0 || dim == 0) return 0;
  AttnJob j;
  memset(&j, 0, sizeof j);
  j.q = q, j.past = past, j.fresh = fresh, j.allowed = allowed, j.out = out, j.scale = scale;
  j.batch = batch, j.heads = heads, j.seq = seq, j.dim = dim, j.past_len = past_len, j.keys = past_len + seq;
  j.dp = round_up(dim, DG);
  j.qb = heads >= ITEM_ROWS ? 1 : ITEM_ROWS / heads;
  if (j.qb > seq) j.qb = seq;
  j.nqb = (seq + j.qb - 1) / j.qb;
  j.allowed_bstride = allowed_batched ? seq * j.keys : 0;
#ifdef MOEPORT_X86
  j.avx512 = moeport_has_avx512();
  j.avx2 = moeport_has_avx2();
#endif
  /* few items (decode): split the keys, at least 4 tiles per range */
  j.nsplit = 1;
  if (batch * j.nqb < 8) {
    j.nsplit = j.keys / (4 * KT);
    if (j.nsplit > 16) j.nsplit = 16;
    if (j.nsplit < 1) j.nsplit = 1;
  }
  j.prow = j.qb * heads;
  MoeportBuffer partial = {NULL, 0};
  if (j.nsplit > 1) {
    partial = moeport_buffer_get((size_t)(batch * j.nqb * j.nsplit * j.prow * (j.dp + 2)) * sizeof(float));
    if (!partial.ptr) return -1;
    j.partial = (float*)partial.ptr;
  }
  pfor(pctx, attention_item, (size_t)(batch * j.nqb * j.nsplit), &j);
  if (j.nsplit > 1 && !j.failed) pfor(pctx, attention_merge, (size_t)(batch * j.nqb), &j);
  moeport_buffer_put(partial);
  return j.failed ? -1 : 0;
}

int moeport_latent_attention_serial(const float* q, int64_t batch, int64_t heads, int64_t seq, int64_t dim,
                                    const float* past, int64_t past_len, const float* fresh, const uint8_t* allowed,
                                    int allowed_batched, float scale, float* out) {
  return moeport_latent_attention(q, batch, heads, seq, dim, past, past_len, fresh, allowed, allowed_batched, scale,
                                  out, moeport_serial_for, NULL);
}
