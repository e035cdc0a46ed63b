// Causal attention for training, forward and backward, with AVX-512 BF16 (vdpbf16ps): grouped-query
// heads, ALiBi computed in the kernel, bf16 inputs and outputs, float32 softmax and accumulation.
//
// Built and loaded by andromeda/train/attention_kernel.py, which documents the arithmetic and holds
// the PyTorch reference the tests compare against.
//
// Shapes: q (B, H, T, D), k and v (B, K, T, D), query head h reading key/value head h / (H / K);
// each tensor given by its pointer and its (b, h, t) strides in elements, the last dimension
// contiguous. Query i reads keys j <= i with weights softmax_j(scale q_i.k_j - slope_h |p_i - p_j|),
// p the positions (B or 1, T) as float32 (batch stride 0 when shared), slope_h 0 without ALiBi.
//
// The work goes in tiles of 64 queries x 64 keys. Without AMX every product is one micro-kernel, `gemm`: C (M x
// N, float32) += A (M x 2P) B (2P x N) in bf16 pairs: A's pair p of row r (two bf16 as one 32-bit
// word) at a[r * ars + p * aps], B "in pairs" (row p holds N pairs, the VNNI layout vdpbf16ps
// reads), so A may be read row-major (aps = 1) or column-major (ars = 1) and no tile is
// transposed: S = Q K^T reads K packed over d, O += P V reads V packed over j, and the backward's
// dV += P^T dO and dK += dS^T Q read P and dS as pairs of rows interleaved. Keys and values are
// packed once per call and key/value head; the backward packs each head's queries and output
// gradient.
//
// Forward (flash attention 2): per (b, h, 64-query tile) an online softmax over the key tiles up to
// the diagonal; out = O / l in bf16 and the row's log-sum-exp lse = m + log l kept for the backward.
// With AMX tiles the forward runs transposed (S^T = K Q^T, O^T += V^T P^T: `forward_tile_amx`), so
// the softmax's per-query maxima and sums run down vectors of 16 queries, over blocks of two key
// tiles (one softmax update, rescale and O product per 128 keys).
// Backward: per (b, h), dQ in float32 over all key tiles; per key tile dK and dV accumulate over the
// query tiles from the diagonal down: P = exp(S - lse), dV += P^T dO, dP = dO V^T,
// dS = scale P (dP - delta) with delta_i = dO_i . O_i, dQ += dS K, dK += dS^T Q. With AMX tiles the
// three sums are deep products (`backward_head_amx`): a key tile's P^T and dS^T against a segment of
// up to SEGMENT query tiles, then one dV and one dK product over it; dS^T kept for a band of key
// tiles (the caller's `band`), then one dQ product per query tile. Without `partials` a task is a
// key/value head, whose group's query heads add their dK and dV into one float32 sum in
// the thread's scratch (the caller passes none where B x K tasks keep its threads busy); with them,
// a task is a query head, its dK and dV go to its own partials, summed over each group at the end.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx512_math.h"
#include "scratch.h"
#ifdef __AMX_BF16__
#include "amx.h"
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#define TILE 64
#define SEGMENT 16  // the AMX backward's query tiles per dV and dK product (BackwardScratch)

typedef struct {
  int64_t B, H, K, T, D;
  const uint16_t *q, *k, *v;
  int64_t q_stride[3], k_stride[3], v_stride[3];
  const float *positions;  // (B or 1, T)
  int64_t positions_stride;  // between batch rows: 0 when shared
  const float *slopes;  // (H,) or NULL
  float scale;
  uint16_t *out;  // (B, H, T, D) at out_stride
  int64_t out_stride[3];
  float *lse;  // (B, H, T) contiguous
  uint16_t *packed;  // 2 (forward) or 3 (backward) x B x K x padded T x D bf16: `packed_at`
  // backward only
  const uint16_t *dout;
  int64_t dout_stride[3];
  uint16_t *dq, *dk, *dv;
  int64_t dq_stride[3], dk_stride[3], dv_stride[3];
  float *partials;  // 2 x B x H x padded T x D float32: each query head's dK and dV; or NULL (a task per kv head)
  int64_t amx;  // 1: the products by AMX tiles (`andromeda_flash_amx()` granted them, D % 32 == 0)
  int64_t band;  // the AMX backward: key tiles whose dS^T it keeps for one dQ product (BackwardScratch; < 1 as 1)
} FlashArgs;

// 1 where this library was built with AMX and Linux granted this process the tiles.
int andromeda_flash_amx(void) {
#if HAVE_AMX
  return amx_request();
#else
  return 0;
#endif
}

static inline int64_t padded(int64_t T) { return (T + TILE - 1) / TILE * TILE; }

// 16 floats to 16 bf16, rounded to nearest even (NaN stays NaN), as torch converts.
static inline __m256i round_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// ------------------------------------------------------------------------------------ micro-kernel

// C[r][16 v + lane] for R rows and NV vectors of 16 columns, over `pairs` pairs of A and B.
static inline __attribute__((always_inline)) void tile(const int R, const int NV, const uint32_t *a, int64_t ars,
                                                       int64_t aps, const uint16_t *b, int64_t ldb, int64_t pairs,
                                                       float *c, int64_t ldc, int load) {
  __m512 acc[4][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = load ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i bv[4];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512((const void *)(b + p * ldb + 32 * v));
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32((int)a[r * ars + p * aps]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

#define TILE_CASE(R, NV) \
  case (R) * 8 + (NV): tile(R, NV, a + m * ars, ars, aps, b + 2 * n, ldb, pairs, c + m * ldc + n, ldc, load); break;

// C (M x N) = (load ? C : 0) + A B: A's pairs at a[r * ars + p * aps] (32-bit words), B's pair row p
// at b + p * ldb (bf16 elements, N pairs), N a multiple of 16, C float32 with row stride ldc.
static void gemm(int64_t M, int64_t N, int64_t pairs, const uint32_t *a, int64_t ars, int64_t aps,
                 const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int load) {
  for (int64_t n = 0; n < N; n += 64) {
    const int nv = N - n >= 64 ? 4 : (int)((N - n) / 16);
    for (int64_t m = 0; m < M; m += 4) {
      const int rows = M - m >= 4 ? 4 : (int)(M - m);
      switch (rows * 8 + nv) {
        TILE_CASE(4, 4) TILE_CASE(4, 3) TILE_CASE(4, 2) TILE_CASE(4, 1)
        TILE_CASE(3, 4) TILE_CASE(3, 3) TILE_CASE(3, 2) TILE_CASE(3, 1)
        TILE_CASE(2, 4) TILE_CASE(2, 3) TILE_CASE(2, 2) TILE_CASE(2, 1)
        TILE_CASE(1, 4) TILE_CASE(1, 3) TILE_CASE(1, 2) TILE_CASE(1, 1)
      }
    }
  }
}


#if HAVE_AMX
// C (M x N) = (load ? C : 0) + A B by AMX tiles: A (M x 2 pairs bf16) row-major at lda elements, B
// `pairs` rows of N bf16 pairs at ldb elements, C float32 at row stride ldc; M and N multiples of 32,
// pairs of 16. The calling thread's tiles configured by `amx_configure(8)`: a 32 x 32 block of C in
// tiles 0-3, A's two 16-row slices in 4-5, B's two 16-column slices in 6-7.
static void amx_gemm(int64_t M, int64_t N, int64_t pairs, const uint16_t *a, int64_t lda, const uint16_t *b,
                     int64_t ldb, float *c, int64_t ldc, int load) {
  const int64_t cs = ldc * 4, as = lda * 2, bs = ldb * 2;
  for (int64_t m = 0; m < M; m += 32)
    for (int64_t n = 0; n < N; n += 32) {
      float *c0 = c + m * ldc + n, *c1 = c0 + 16 * ldc;
      if (load) {
        _tile_loadd(0, c0, cs);
        _tile_loadd(1, c0 + 16, cs);
        _tile_loadd(2, c1, cs);
        _tile_loadd(3, c1 + 16, cs);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t p = 0; p < pairs; p += 16) {
        const uint16_t *a0 = a + m * lda + 2 * p, *b0 = b + p * ldb + 2 * n;
        _tile_loadd(4, a0, as);
        _tile_loadd(5, a0 + 16 * lda, as);
        _tile_loadd(6, b0, bs);
        _tile_loadd(7, b0 + 32, bs);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c0, cs);
      _tile_stored(1, c0 + 16, cs);
      _tile_stored(2, c1, cs);
      _tile_stored(3, c1 + 16, cs);
    }
}
#endif

// ------------------------------------------------------------------------------------ packing

// 32-bit words w0..w0 + 15 (bf16 pairs) of rows t0..t0 + 15 of x (rows at `stride`, zeros from row T
// on), transposed: r[w] holds word w0 + w of the 16 rows.
static inline void words_transposed(const uint16_t *x, int64_t stride, int64_t T, int64_t t0, int64_t w0, __m512 r[16]) {
  for (int i = 0; i < 16; ++i)
    r[i] = t0 + i < T ? _mm512_loadu_ps((const float *)(x + (t0 + i) * stride) + w0) : _mm512_setzero_ps();
  transpose16(r);
}

// x (T, D) rows at `stride` into pairs over d: out[d / 2][t][2], T padded with zeros to `Tp`: a
// transpose of 32-bit pairs, 16 x 16 at a time where D is a multiple of 32.
static void pack_over_d(const uint16_t *x, int64_t stride, int64_t T, int64_t Tp, int64_t D, uint16_t *out) {
  if (D % 32 == 0) {
    for (int64_t t0 = 0; t0 < Tp; t0 += 16)
      for (int64_t w0 = 0; w0 < D / 2; w0 += 16) {
        __m512 r[16];
        words_transposed(x, stride, T, t0, w0, r);
        for (int w = 0; w < 16; ++w) _mm512_storeu_ps((float *)out + (w0 + w) * Tp + t0, r[w]);
      }
    return;
  }
  for (int64_t t = 0; t < Tp; ++t)
    for (int64_t d = 0; d < D; d += 2) {
      uint32_t pair = 0;
      if (t < T) memcpy(&pair, x + t * stride + d, 4);
      memcpy(out + (d / 2 * Tp + t) * 2, &pair, 4);
    }
}

// Rows r0, r1 of n bf16 each (n a multiple of 32) interleaved: out[j][2] = (r0[j], r1[j]).
static inline void interleave(const uint16_t *r0, const uint16_t *r1, int64_t n, uint16_t *out) {
  static const uint16_t low_index[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                         8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_loadu_si512((const void *)low_index);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t j = 0; j < n; j += 32) {
    const __m512i a = _mm512_loadu_si512((const void *)(r0 + j)), b = _mm512_loadu_si512((const void *)(r1 + j));
    _mm512_storeu_si512((void *)(out + 2 * j), _mm512_permutex2var_epi16(a, low, b));
    _mm512_storeu_si512((void *)(out + 2 * j + 32), _mm512_permutex2var_epi16(a, high, b));
  }
}

// x (T, D) rows at `stride` into pairs over t: out[t / 2][d][2], T padded with zeros to `Tp`.
static void pack_over_t(const uint16_t *x, int64_t stride, int64_t T, int64_t Tp, int64_t D, uint16_t *out,
                        uint16_t *zeros) {
  for (int64_t t = 0; t < Tp; t += 2) {
    const uint16_t *r0 = t < T ? x + t * stride : zeros, *r1 = t + 1 < T ? x + (t + 1) * stride : zeros;
    if (D % 32 == 0) {
      interleave(r0, r1, D, out + t * D);
    } else {
      for (int64_t d = 0; d < D; ++d) out[t * D + 2 * d] = r0[d], out[t * D + 2 * d + 1] = r1[d];
    }
  }
}

// x (T, D) rows at `stride` as rows of D, T padded with zero rows to Tp.
static void pack_rows(const uint16_t *x, int64_t stride, int64_t T, int64_t Tp, int64_t D, uint16_t *out) {
  for (int64_t t = 0; t < Tp; ++t) {
    if (t < T) memcpy(out + t * D, x + t * stride, (size_t)D * 2);
    else memset(out + t * D, 0, (size_t)D * 2);
  }
}

// x (T, D) rows at `stride` transposed: out[d][t], rows of Tp, T padded with zeros.
// Where D is a multiple of 32: 16 rows x 16 pairs transposed as 32-bit words, each word column's
// pairs (d, d + 1) then split into rows d and d + 1.
static void pack_transposed(const uint16_t *x, int64_t stride, int64_t T, int64_t Tp, int64_t D, uint16_t *out) {
  if (D % 32 == 0 && Tp % 16 == 0) {
    static const uint16_t split_index[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                             1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    const __m512i split = _mm512_loadu_si512((const void *)split_index);
    for (int64_t t0 = 0; t0 < Tp; t0 += 16)
      for (int64_t w0 = 0; w0 < D / 2; w0 += 16) {
        __m512 r[16];
        words_transposed(x, stride, T, t0, w0, r);
        for (int w = 0; w < 16; ++w) {
          const __m512i halves = _mm512_permutexvar_epi16(split, _mm512_castps_si512(r[w]));
          _mm256_storeu_si256((__m256i *)(out + 2 * (w0 + w) * Tp + t0), _mm512_castsi512_si256(halves));
          _mm256_storeu_si256((__m256i *)(out + (2 * (w0 + w) + 1) * Tp + t0), _mm512_extracti64x4_epi64(halves, 1));
        }
      }
    return;
  }
  for (int64_t t = 0; t < Tp; ++t)
    for (int64_t d = 0; d < D; ++d) out[d * Tp + t] = t < T ? x[t * stride + d] : 0;
}

// The packed keys and values of (b, kv), slot `which`: forward 0 = K over d, 1 = V over t (the AMX
// forward 0 = K rows, 1 = V transposed);
// backward 0 = K over d, 1 = V over d, 2 = K over t; the AMX backward 0 = K rows, 1 = V rows,
// 2 = K transposed (D x padded T).
static uint16_t *packed_at(const FlashArgs *a, int which, int64_t b, int64_t kv) {
  const int64_t size = padded(a->T) * a->D;
  const int64_t heads = a->B * a->K;
  return a->packed + ((int64_t)which * heads + b * a->K + kv) * size;
}

static void pack_keys_values(const FlashArgs *a, int backward, uint16_t *zeros) {
  const int64_t Tp = padded(a->T), D = a->D;
#pragma omp for schedule(static) collapse(2)
  for (int64_t b = 0; b < a->B; ++b)
    for (int64_t kv = 0; kv < a->K; ++kv) {
      const uint16_t *k = a->k + b * a->k_stride[0] + kv * a->k_stride[1];
      const uint16_t *v = a->v + b * a->v_stride[0] + kv * a->v_stride[1];
      if (!backward && a->amx) {
        pack_rows(k, a->k_stride[2], a->T, Tp, D, packed_at(a, 0, b, kv));  // S^T = K Q^T
        pack_transposed(v, a->v_stride[2], a->T, Tp, D, packed_at(a, 1, b, kv));  // O^T += V^T P^T
      } else if (!backward) {
        pack_over_d(k, a->k_stride[2], a->T, Tp, D, packed_at(a, 0, b, kv));  // S = Q K^T
        pack_over_t(v, a->v_stride[2], a->T, Tp, D, packed_at(a, 1, b, kv), zeros);  // O += P V
      } else if (a->amx) {
        pack_rows(k, a->k_stride[2], a->T, Tp, D, packed_at(a, 0, b, kv));  // S^T = K Q^T
        pack_rows(v, a->v_stride[2], a->T, Tp, D, packed_at(a, 1, b, kv));  // dP^T = V dO^T
        pack_transposed(k, a->k_stride[2], a->T, Tp, D, packed_at(a, 2, b, kv));  // dQ^T += K^T dS^T
      } else {
        pack_over_d(k, a->k_stride[2], a->T, Tp, D, packed_at(a, 0, b, kv));  // S = Q K^T
        pack_over_d(v, a->v_stride[2], a->T, Tp, D, packed_at(a, 1, b, kv));  // dP = dO V^T
        pack_over_t(k, a->k_stride[2], a->T, Tp, D, packed_at(a, 2, b, kv), zeros);  // dQ += dS K
      }
    }
}

// ------------------------------------------------------------------------------------ scores

// S (rows x 64, row stride TILE) scaled, with ALiBi, causal mask (-inf above the diagonal and past T).
static inline void finish_scores(float *s, int64_t rows, int64_t i0, int64_t j0, int64_t T, float scale,
                                 float slope, const float *pos) {
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const __m512 pi = _mm512_set1_ps(slope != 0.0f ? pos[i] : 0.0f);
    for (int64_t c = 0; c < TILE; c += 16) {
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + r * TILE + c), _mm512_set1_ps(scale));
      const int64_t j = j0 + c;
      if (slope != 0.0f) {
        __m512 pj;
        if (j + 16 <= T) {
          pj = _mm512_loadu_ps(pos + j);
        } else {
          const __mmask16 in = j >= T ? 0 : (__mmask16)((1u << (T - j)) - 1);
          pj = _mm512_maskz_loadu_ps(in, pos + j);
        }
        const __m512 distance = _mm512_abs_ps(_mm512_sub_ps(pi, pj));
        x = _mm512_fnmadd_ps(_mm512_set1_ps(slope), distance, x);
      }
      if (j + 15 > i || j + 16 > T) {  // columns past the diagonal or past T
        const __m512 column = _mm512_add_ps(_mm512_set1_ps((float)j), lanes);
        const __mmask16 out = _mm512_cmp_ps_mask(column, _mm512_set1_ps((float)(i < T - 1 ? i : T - 1)), _CMP_GT_OQ);
        x = _mm512_mask_mov_ps(x, out, minus_inf);
      }
      _mm512_storeu_ps(s + r * TILE + c, x);
    }
  }
}

#if HAVE_AMX
// The 32 bf16 of _mm512_cvtne2ps_pbh(r1, r0) (row r0's 16, then row r1's) reordered as pairs
// (r0[c], r1[c]): two rows interleaved, as the products read P^T and dS^T.
static const uint16_t PAIR_INDEX[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// Scores transposed, S^T (TILE keys from j0 x TILE queries from i0), finished from the products
// K Q^T: scaled, with ALiBi, and -inf where the query is before the key or past T. `QueryTile`
// holds what is the same down a tile's key rows; `finished_scores` gives 16 queries of one key row.
typedef struct {
  __m512 positions[TILE / 16];  // the queries' positions (ALiBi), 0 past T
  int64_t i0, T;
  float scale, slope;
} QueryTile;

static inline QueryTile query_tile(int64_t i0, int64_t T, float scale, float slope, const float *pos) {
  QueryTile q = {.i0 = i0, .T = T, .scale = scale, .slope = slope};
  for (int g = 0; g < TILE / 16; ++g) {
    const int64_t i = i0 + 16 * g;
    const __mmask16 in = i >= T ? 0 : i + 16 <= T ? (__mmask16)0xFFFF : (__mmask16)((1u << (T - i)) - 1);
    q.positions[g] = slope != 0.0f ? _mm512_maskz_loadu_ps(in, pos + i) : _mm512_setzero_ps();
  }
  return q;
}

// Key j's position for finished_scores (0 without ALiBi).
static inline __m512 key_position(const QueryTile *q, int64_t j, const float *pos) {
  return _mm512_set1_ps(q->slope != 0.0f && j < q->T ? pos[j] : 0.0f);
}

// Queries 16 g.. of key j's row, from their products `raw`; pj the key's position (key_position).
static inline __m512 finished_scores(const QueryTile *q, int g, int64_t j, __m512 pj, __m512 raw) {
  const int64_t i = q->i0 + 16 * g;
  __m512 x = _mm512_mul_ps(raw, _mm512_set1_ps(q->scale));
  if (q->slope != 0.0f)
    x = _mm512_fnmadd_ps(_mm512_set1_ps(q->slope), _mm512_abs_ps(_mm512_sub_ps(q->positions[g], pj)), x);
  if (i < j || i + 16 > q->T) {  // queries before the key or past T
    const __m512 column = _mm512_add_ps(_mm512_set1_ps((float)i),
                                        _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __mmask16 out = _mm512_cmp_ps_mask(column, _mm512_set1_ps((float)j), _CMP_LT_OQ) |
                          _mm512_cmp_ps_mask(column, _mm512_set1_ps((float)(q->T - 1)), _CMP_GT_OQ);
    x = _mm512_mask_mov_ps(x, out, _mm512_set1_ps(-INFINITY));
  }
  return x;
}
#endif

// ------------------------------------------------------------------------------------ forward

typedef struct {
  float *s, *o, *m, *l;
  uint16_t *p, *q;  // the AMX path: P^T as interleaved row pairs in p, the tile's queries packed over d in q
} ForwardScratch;

static void forward_tile(const FlashArgs *a, int64_t b, int64_t h, int64_t i0, const ForwardScratch *w) {
  const int64_t T = a->T, D = a->D, Tp = padded(T), rows = T - i0 < TILE ? T - i0 : TILE;
  const int64_t kv = h / (a->H / a->K);
  const uint16_t *q = a->q + b * a->q_stride[0] + h * a->q_stride[1] + i0 * a->q_stride[2];
  const uint16_t *kd = packed_at(a, 0, b, kv), *vt = packed_at(a, 1, b, kv);
  const float slope = a->slopes ? a->slopes[h] : 0.0f;
  const float *pos = a->positions + b * a->positions_stride;
  for (int64_t r = 0; r < rows; ++r) w->m[r] = -INFINITY, w->l[r] = 0.0f;
  memset(w->o, 0, (size_t)(TILE * D) * sizeof(float));
  const int64_t last = (i0 + rows - 1) / TILE;
  for (int64_t kb = 0; kb <= last; ++kb) {
    const int64_t j0 = kb * TILE;
    gemm(rows, TILE, D / 2, (const uint32_t *)q, a->q_stride[2] / 2, 1, kd + j0 * 2, Tp * 2, w->s, TILE, 0);
    finish_scores(w->s, rows, i0, j0, T, a->scale, slope, pos);
    for (int64_t r = 0; r < rows; ++r) {
      float *s = w->s + r * TILE;
      __m512 top = _mm512_set1_ps(w->m[r]);
      for (int64_t c = 0; c < TILE; c += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + c));
      const float m = _mm512_reduce_max_ps(top);  // column j0 <= i is always allowed
      const float alpha = w->m[r] == -INFINITY ? 0.0f : expf(w->m[r] - m);  // (m is -inf only for -inf inputs)
      __m512 sum = _mm512_setzero_ps();
      __mmask16 nan = 0;  // exp512 and the vector max drop NaN: a NaN score makes the row's sum NaN
      for (int64_t c = 0; c < TILE; c += 32) {
        const __m512 x0 = _mm512_loadu_ps(s + c), x1 = _mm512_loadu_ps(s + c + 16);
        nan |= _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q);
        const __m512 e0 = exp512(_mm512_sub_ps(x0, _mm512_set1_ps(m)));
        const __m512 e1 = exp512(_mm512_sub_ps(x1, _mm512_set1_ps(m)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        _mm512_storeu_si512((void *)(w->p + r * TILE + c), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
      w->l[r] = nan ? NAN : w->l[r] * alpha + _mm512_reduce_add_ps(sum);  // NaN stays: out and lse NaN
      w->m[r] = m;
      if (alpha != 1.0f) {
        float *o = w->o + r * D;
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), _mm512_set1_ps(alpha)));
      }
    }
    gemm(rows, D, TILE / 2, (const uint32_t *)w->p, TILE / 2, 1, vt + j0 * D, 2 * D, w->o, D, 1);
  }
  uint16_t *out = a->out + b * a->out_stride[0] + h * a->out_stride[1] + i0 * a->out_stride[2];
  float *lse = a->lse + (b * a->H + h) * T + i0;
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inverse = _mm512_set1_ps(1.0f / w->l[r]);
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256((__m256i *)(out + r * a->out_stride[2] + d),
                          round_bf16(_mm512_mul_ps(_mm512_loadu_ps(w->o + r * D + d), inverse)));
    lse[r] = w->m[r] + logf(w->l[r]);
  }
}

#if HAVE_AMX
// forward_tile by AMX tiles, transposed as the backward is: S^T = K Q^T (keys x queries), so each
// vector holds 16 queries and the online softmax's maxima, sums and rescalings are vector operations
// down the key rows (no reduction across a vector, no scalar exp), and O^T (D x queries) += V^T P^T.
// The row maxima, exponentials and sums are the same float32 operations as forward_tile's, in
// another order of summation.
static void forward_tile_amx(const FlashArgs *a, int64_t b, int64_t h, int64_t i0, const ForwardScratch *w) {
  const int64_t T = a->T, D = a->D, Tp = padded(T), rows = T - i0 < TILE ? T - i0 : TILE;
  const int64_t kv = h / (a->H / a->K);
  const uint16_t *kr = packed_at(a, 0, b, kv), *vt = packed_at(a, 1, b, kv);
  const float slope = a->slopes ? a->slopes[h] : 0.0f;
  const float *pos = a->positions + b * a->positions_stride;
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY), zero = _mm512_setzero_ps();
  const __m512i pairs = _mm512_loadu_si512((const void *)PAIR_INDEX);
  pack_over_d(a->q + b * a->q_stride[0] + h * a->q_stride[1] + i0 * a->q_stride[2], a->q_stride[2], rows, TILE, D, w->q);
  for (int64_t c = 0; c < TILE; c += 16) _mm512_storeu_ps(w->m + c, minus_inf), _mm512_storeu_ps(w->l + c, zero);
  memset(w->o, 0, (size_t)(TILE * D) * sizeof(float));
  __mmask16 nan[TILE / 16] = {0};  // exp512 and the vector max drop NaN: a NaN score makes the query's sum NaN
  const int64_t last = (i0 + rows - 1) / TILE;
  const QueryTile queries = query_tile(i0, T, a->scale, slope, pos);
  // the keys by blocks of two tiles (one where one is left): one softmax update, rescale of O and
  // O product (over 128 keys) a block
  for (int64_t kb = 0, n; kb <= last; kb += n) {
    n = kb < last ? 2 : 1;
    const int64_t j0 = kb * TILE, keys = n * TILE;
    amx_gemm(keys, TILE, D / 2, kr + j0 * D, D, w->q, 2 * TILE, w->s, TILE, 0);
    // the scores finished in place and, per group of 16 queries g, the new maxima (four independent
    // chains, down the key rows)
    __m512 top[TILE / 16], shift[TILE / 16], alpha[TILE / 16], sum[TILE / 16];
    for (int g = 0; g < TILE / 16; ++g) top[g] = _mm512_loadu_ps(w->m + 16 * g);
    for (int64_t r = 0; r < keys; ++r) {
      const __m512 pj = key_position(&queries, j0 + r, pos);
      for (int g = 0; g < TILE / 16; ++g) {
        float *s = w->s + r * TILE + 16 * g;
        const __m512 x = finished_scores(&queries, g, j0 + r, pj, _mm512_loadu_ps(s));
        _mm512_storeu_ps(s, x);
        nan[g] = _kor_mask16(nan[g], _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q));
        top[g] = _mm512_max_ps(x, top[g]);  // a NaN x keeps top
      }
    }
    __mmask16 rescale = 0;
    for (int g = 0; g < TILE / 16; ++g) {
      // queries with no key yet (all -inf: past T, or -inf scores) shift by 0: their exps are 0
      shift[g] = _mm512_mask_mov_ps(top[g], _mm512_cmp_ps_mask(top[g], minus_inf, _CMP_EQ_OQ), zero);
      alpha[g] = exp512(_mm512_sub_ps(_mm512_loadu_ps(w->m + 16 * g), shift[g]));  // 0 where m was -inf
      rescale |= _mm512_cmp_ps_mask(alpha[g], _mm512_set1_ps(1.0f), _CMP_NEQ_UQ);
      sum[g] = zero;
    }
    // P^T written as the product reads it: rows r and r + 1 interleaved, (r / 2, query, 2)
    for (int64_t r = 0; r < keys; r += 2)
      for (int g = 0; g < TILE / 16; ++g) {
        const __m512 e0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(w->s + r * TILE + 16 * g), shift[g]));
        const __m512 e1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(w->s + (r + 1) * TILE + 16 * g), shift[g]));
        sum[g] = _mm512_add_ps(sum[g], _mm512_add_ps(e0, e1));
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);  // row r's 16, then row r + 1's
        _mm512_storeu_si512((void *)(w->p + r * TILE + 32 * g), _mm512_permutexvar_epi16(pairs, both));
      }
    for (int g = 0; g < TILE / 16; ++g) {
      _mm512_storeu_ps(w->l + 16 * g, _mm512_fmadd_ps(_mm512_loadu_ps(w->l + 16 * g), alpha[g], sum[g]));
      _mm512_storeu_ps(w->m + 16 * g, top[g]);
    }
    if (rescale && kb > 0)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t g = 0; g < TILE / 16; ++g) {
          float *o = w->o + d * TILE + 16 * g;
          _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha[g]));
        }
    amx_gemm(D, TILE, keys / 2, vt + j0, Tp, w->p, 2 * TILE, w->o, TILE, 1);  // O^T += V^T P^T
  }
  uint16_t *out = a->out + b * a->out_stride[0] + h * a->out_stride[1] + i0 * a->out_stride[2];
  float *lse = a->lse + (b * a->H + h) * T + i0;
  for (int64_t g = 0; g < TILE / 16 && 16 * g < rows; ++g) {
    const int64_t c = 16 * g;
    const __m512 l = _mm512_mask_mov_ps(_mm512_loadu_ps(w->l + c), nan[g], _mm512_set1_ps(NAN));
    const __m512 inverse = _mm512_div_ps(_mm512_set1_ps(1.0f), l);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {  // O^T / l back to rows, 16 x 16 at a time
      __m512 r[16];
      for (int d = 0; d < 16; ++d) r[d] = _mm512_mul_ps(_mm512_loadu_ps(w->o + (d0 + d) * TILE + c), inverse);
      transpose16(r);
      for (int i = 0; i < 16 && c + i < rows; ++i)
        _mm256_storeu_si256((__m256i *)(out + (c + i) * a->out_stride[2] + d0), round_bf16(r[i]));
    }
    float lv[16], mv[16];
    _mm512_storeu_ps(lv, l);
    _mm512_storeu_ps(mv, _mm512_loadu_ps(w->m + c));
    for (int i = 0; i < 16 && c + i < rows; ++i) lse[c + i] = mv[i] + logf(lv[i]);
  }
}
#endif

static _Thread_local void *forward_buffer;
static _Thread_local size_t forward_capacity;

// The caller's arguments with `amx` kept only where this build has the AMX path and D fits it.
static FlashArgs checked(const FlashArgs *a) {
  FlashArgs args = *a;
  args.amx = HAVE_AMX && a->amx && a->D % 32 == 0;
  return args;
}

int andromeda_flash_forward(const FlashArgs *caller) {
  const FlashArgs args = checked(caller), *a = &args;
  const int64_t D = a->D, tiles = padded(a->T) / TILE;
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    uint16_t zeros[256] = {0};
    pack_keys_values(a, 0, zeros);
    // floats: s (2 TILE^2: the AMX path's blocks of two key tiles), o (TILE D), m, l (TILE each);
    // bf16: p (2 TILE^2), q (TILE D)
    const size_t floats = (size_t)(2 * TILE * TILE + TILE * D + 2 * TILE);
    float *base = (float *)thread_buffer(&forward_buffer, &forward_capacity, floats * 4 + (2 * TILE * TILE + TILE * D) * 2 + 64);
    ForwardScratch w = {0};
    if (base) w = (ForwardScratch){base, base + 2 * TILE * TILE, base + 2 * TILE * TILE + TILE * D,
                                   base + 2 * TILE * TILE + TILE * D + TILE, (uint16_t *)(base + floats),
                                   (uint16_t *)(base + floats) + 2 * TILE * TILE};
    else failed = 1;
#if HAVE_AMX
    if (a->amx) amx_configure(8);
#endif
    // the longest tiles (most key tiles) first: dynamic scheduling balances the rest
#pragma omp for schedule(dynamic, 1) collapse(3)
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t b = 0; b < a->B; ++b)
        for (int64_t h = 0; h < a->H; ++h)
          if (base) {
#if HAVE_AMX
            if (a->amx) {
              forward_tile_amx(a, b, h, (tiles - 1 - t) * TILE, &w);
              continue;
            }
#endif
            forward_tile(a, b, h, (tiles - 1 - t) * TILE, &w);
          }
#if HAVE_AMX
    if (a->amx) _tile_release();
#endif
  }
  return failed ? 2 : 0;
}

// ------------------------------------------------------------------------------------ backward

typedef struct {
  uint16_t *qt, *dot;  // this head's queries and output gradient packed over t: (Tp / 2, D, 2)
  uint16_t *qd, *dod;  // AMX: the same packed over d, (D / 2, Tp, 2)
  float *dq, *delta, *lse, *s, *dp;  // AMX: dq transposed (D x Tp); delta and lse padded with zeros
  uint16_t *p, *pv, *ds, *dsv;  // P and dS as rows (TILE x TILE) and as interleaved row pairs (AMX: P^T, dS^T)
  float *dk, *dv;  // without partials: the task's key/value head's dK and dV, (Tp, D) each
  // AMX: P^T and dS^T of one key tile against a segment of up to SEGMENT query tiles, rows of
  // SEGMENT TILE (the dV and dK products' A), and dS^T as interleaved key pairs for a band of `band`
  // key tiles against every query tile (the dQ product's B: query tile qb's block at
  // dsq + qb * band * TILE^2, its key tiles stacked)
  uint16_t *pk, *dsk, *dsq;
  int64_t band;
} BackwardScratch;

// P = exp(S - lse) for `rows` valid rows (the rest 0; all NaN where the forward's row was), into
// w->s in float32, and as bf16 rows and pairs.
static void probabilities(BackwardScratch *w, int64_t rows, const float *lse) {
  for (int64_t r = 0; r < TILE; ++r) {
    float *s = w->s + r * TILE;
    for (int64_t c = 0; c < TILE; c += 32) {
      __m512 e0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps();
      if (r < rows && isnan(lse[r])) {  // NaN on the columns the row reads (masked ones stay 0)
        const __m512 x0 = _mm512_loadu_ps(s + c), x1 = _mm512_loadu_ps(s + c + 16), none = _mm512_set1_ps(-INFINITY);
        e0 = _mm512_mask_mov_ps(e0, _mm512_cmp_ps_mask(x0, none, _CMP_NEQ_UQ), _mm512_set1_ps(NAN));
        e1 = _mm512_mask_mov_ps(e1, _mm512_cmp_ps_mask(x1, none, _CMP_NEQ_UQ), _mm512_set1_ps(NAN));
      } else if (r < rows) {
        const __m512 shift = _mm512_set1_ps(lse[r]);
        e0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + c), shift));
        e1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + c + 16), shift));
      }
      _mm512_storeu_ps(s + c, e0);
      _mm512_storeu_ps(s + c + 16, e1);
      _mm512_storeu_si512((void *)(w->p + r * TILE + c), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
  }
  for (int64_t r = 0; r < TILE; r += 2) interleave(w->p + r * TILE, w->p + (r + 1) * TILE, TILE, w->pv + r * TILE);
}

// dS = scale P (dP - delta) for valid rows (the rest 0), as bf16 rows and pairs.
static void score_gradients(BackwardScratch *w, int64_t rows, const float *delta, float scale) {
  for (int64_t r = 0; r < TILE; ++r) {
    for (int64_t c = 0; c < TILE; c += 32) {
      __m512 g0 = _mm512_setzero_ps(), g1 = _mm512_setzero_ps();
      if (r < rows) {
        const __m512 d = _mm512_set1_ps(delta[r]), sc = _mm512_set1_ps(scale);
        g0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(w->s + r * TILE + c), sc),
                           _mm512_sub_ps(_mm512_loadu_ps(w->dp + r * TILE + c), d));
        g1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(w->s + r * TILE + c + 16), sc),
                           _mm512_sub_ps(_mm512_loadu_ps(w->dp + r * TILE + c + 16), d));
      }
      _mm512_storeu_si512((void *)(w->ds + r * TILE + c), (__m512i)_mm512_cvtne2ps_pbh(g1, g0));
    }
  }
  for (int64_t r = 0; r < TILE; r += 2) interleave(w->ds + r * TILE, w->ds + (r + 1) * TILE, TILE, w->dsv + r * TILE);
}

// The head's log-sum-exp from the forward and delta_i = dO_i . O_i, into w->lse and w->delta.
static void row_statistics(const FlashArgs *a, int64_t b, int64_t h, BackwardScratch *w) {
  const int64_t T = a->T, D = a->D;
  const uint16_t *dout = a->dout + b * a->dout_stride[0] + h * a->dout_stride[1];
  const uint16_t *out = a->out + b * a->out_stride[0] + h * a->out_stride[1];
  memcpy(w->lse, a->lse + (b * a->H + h) * T, (size_t)T * sizeof(float));
  for (int64_t i = 0; i < T; ++i) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(dout + i * a->dout_stride[2] + d)));
      const __m512i y = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(out + i * a->out_stride[2] + d)));
      sum = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(y, 16)), sum);
    }
    w->delta[i] = _mm512_reduce_add_ps(sum);
  }
}

// What both backwards read and write for query head h of batch row b.
typedef struct {
  const uint16_t *q, *dout;  // the head's queries and output gradient
  const uint16_t *packed[3];  // its key/value head's packings (`packed_at`)
  float slope;
  const float *pos;
  float *dk, *dv;  // where its dK and dV add up, (Tp, D) float32 each
} HeadView;

// The head's view, with its queries and output gradient packed over t, its row statistics, and its
// dK, dV sums: its own partials, zeroed, or (without partials) the task's, which the caller zeroed.
static HeadView backward_prologue(const FlashArgs *a, int64_t b, int64_t h, BackwardScratch *w, uint16_t *zeros) {
  const int64_t T = a->T, D = a->D, Tp = padded(T), kv = h / (a->H / a->K);
  HeadView v = {a->q + b * a->q_stride[0] + h * a->q_stride[1], a->dout + b * a->dout_stride[0] + h * a->dout_stride[1],
                {packed_at(a, 0, b, kv), packed_at(a, 1, b, kv), packed_at(a, 2, b, kv)},
                a->slopes ? a->slopes[h] : 0.0f, a->positions + b * a->positions_stride, w->dk, w->dv};
  if (a->partials) {
    v.dk = a->partials + (b * a->H + h) * Tp * D, v.dv = a->partials + ((a->B + b) * a->H + h) * Tp * D;
    memset(v.dk, 0, (size_t)(Tp * D) * sizeof(float));
    memset(v.dv, 0, (size_t)(Tp * D) * sizeof(float));
  }
  pack_over_t(v.q, a->q_stride[2], T, Tp, D, w->qt, zeros);
  pack_over_t(v.dout, a->dout_stride[2], T, Tp, D, w->dot, zeros);
  row_statistics(a, b, h, w);
  memset(w->lse + T, 0, (size_t)(Tp - T) * sizeof(float));  // padding rows (AMX reads whole tiles)
  memset(w->delta + T, 0, (size_t)(Tp - T) * sizeof(float));
  if (!a->amx) memset(w->dq, 0, (size_t)(Tp * D) * sizeof(float));  // the AMX path's first dQ products store
  return v;
}

static void backward_head(const FlashArgs *a, int64_t b, int64_t h, BackwardScratch *w, uint16_t *zeros) {
  const int64_t T = a->T, D = a->D, Tp = padded(T), tiles = Tp / TILE;
  const HeadView v = backward_prologue(a, b, h, w, zeros);
  const uint16_t *q = v.q, *dout = v.dout, *kd = v.packed[0], *vd = v.packed[1], *kt = v.packed[2];
  const float slope = v.slope, *pos = v.pos;
  float *dk = v.dk, *dv = v.dv;
  for (int64_t kb = 0; kb < tiles; ++kb) {
    const int64_t j0 = kb * TILE;
    for (int64_t qb = kb; qb < tiles; ++qb) {
      const int64_t i0 = qb * TILE, rows = T - i0 < TILE ? T - i0 : TILE;
      const uint16_t *qi = q + i0 * a->q_stride[2], *doi = dout + i0 * a->dout_stride[2];
      gemm(rows, TILE, D / 2, (const uint32_t *)qi, a->q_stride[2] / 2, 1, kd + j0 * 2, Tp * 2, w->s, TILE, 0);
      finish_scores(w->s, rows, i0, j0, T, a->scale, slope, pos);
      probabilities(w, rows, w->lse + i0);
      // dV (keys x D) += P^T dO: A = P^T read from the row pairs, B = dO over t
      gemm(TILE, D, TILE / 2, (const uint32_t *)w->pv, 1, TILE, w->dot + i0 * D, 2 * D, dv + j0 * D, D, 1);
      gemm(rows, TILE, D / 2, (const uint32_t *)doi, a->dout_stride[2] / 2, 1, vd + j0 * 2, Tp * 2, w->dp, TILE, 0);
      score_gradients(w, rows, w->delta + i0, a->scale);
      gemm(rows, D, TILE / 2, (const uint32_t *)w->ds, TILE / 2, 1, kt + j0 * D, 2 * D, w->dq + i0 * D, D, 1);
      gemm(TILE, D, TILE / 2, (const uint32_t *)w->dsv, 1, TILE, w->qt + i0 * D, 2 * D, dk + j0 * D, D, 1);
    }
  }
  uint16_t *dq = a->dq + b * a->dq_stride[0] + h * a->dq_stride[1];
  for (int64_t i = 0; i < T; ++i)
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256((__m256i *)(dq + i * a->dq_stride[2] + d), round_bf16(_mm512_loadu_ps(w->dq + i * D + d)));
}

#if HAVE_AMX
// P^T = exp(S^T - lse) by column from the products K Q^T in w->s, finished in the same pass
// (`finished_scores`; NaN on the entries a NaN row of the forward reads), in w->s in float32 and as
// bf16 rows at p (row stride ldp).
static void probabilities_transposed(BackwardScratch *w, const QueryTile *queries, int64_t j0, const float *pos,
                                     const float *lse, uint16_t *p, int64_t ldp) {
  const __m512 none = _mm512_set1_ps(-INFINITY), nan = _mm512_set1_ps(NAN);
  __m512 l[TILE / 16];
  __mmask16 unset[TILE / 16];  // the queries whose lse is NaN (the forward's row was)
  for (int g = 0; g < TILE / 16; ++g) {
    l[g] = _mm512_loadu_ps(lse + 16 * g);
    unset[g] = _mm512_cmp_ps_mask(l[g], l[g], _CMP_UNORD_Q);
  }
  for (int64_t r = 0; r < TILE; ++r) {
    const __m512 pj = key_position(queries, j0 + r, pos);
    float *s = w->s + r * TILE;
    __m512 e[TILE / 16];
    for (int g = 0; g < TILE / 16; ++g) {
      const __m512 x = finished_scores(queries, g, j0 + r, pj, _mm512_loadu_ps(s + 16 * g));
      e[g] = exp512(_mm512_sub_ps(x, l[g]));
      if (unset[g]) e[g] = _mm512_mask_mov_ps(e[g], unset[g] & _mm512_cmp_ps_mask(x, none, _CMP_NEQ_UQ), nan);
      _mm512_storeu_ps(s + 16 * g, e[g]);
    }
    for (int g = 0; g < TILE / 16; g += 2)
      _mm512_storeu_si512((void *)(p + r * ldp + 16 * g), (__m512i)_mm512_cvtne2ps_pbh(e[g + 1], e[g]));
  }
}

// dS^T = scale P^T (dP^T - delta) by column, as bf16 rows at ds (row stride ldds) and interleaved row
// pairs at dsv (TILE / 2 rows of TILE pairs).
static void score_gradients_transposed(BackwardScratch *w, const float *delta, float scale, uint16_t *ds,
                                       int64_t ldds, uint16_t *dsv) {
  const __m512i pairs = _mm512_loadu_si512((const void *)PAIR_INDEX);
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 d[TILE / 16];
  for (int g = 0; g < TILE / 16; ++g) d[g] = _mm512_loadu_ps(delta + 16 * g);
  for (int64_t r = 0; r < TILE; r += 2) {  // rows r and r + 1: each as a row, and interleaved
    __m512 g0[TILE / 16], g1[TILE / 16];
    for (int g = 0; g < TILE / 16; ++g) {
      const float *p = w->s + r * TILE + 16 * g, *dp = w->dp + r * TILE + 16 * g;
      g0[g] = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(p), sc), _mm512_sub_ps(_mm512_loadu_ps(dp), d[g]));
      g1[g] = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(p + TILE), sc), _mm512_sub_ps(_mm512_loadu_ps(dp + TILE), d[g]));
      _mm512_storeu_si512((void *)(dsv + r * TILE + 32 * g),
                          _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(g1[g], g0[g])));
    }
    for (int g = 0; g < TILE / 16; g += 2) {
      _mm512_storeu_si512((void *)(ds + r * ldds + 16 * g), (__m512i)_mm512_cvtne2ps_pbh(g0[g + 1], g0[g]));
      _mm512_storeu_si512((void *)(ds + (r + 1) * ldds + 16 * g), (__m512i)_mm512_cvtne2ps_pbh(g1[g + 1], g1[g]));
    }
  }
}

// backward_head by AMX tiles, transposed (the file's header): each product's A a row-major matrix.
// The three products that add up over tiles run deep: a key tile's P^T and dS^T against a segment of
// up to SEGMENT query tiles are kept, then dV += P^T dO and dK += dS^T Q are one product each over
// the segment's queries; dS^T is kept for a band of key tiles, then dQ^T += K^T dS^T is one product
// per query tile over the band's keys. The float32 sums stay in the tiles' registers across the
// products' depth instead of going to memory every 64 keys or queries, in the same order (the same
// bits as a product per tile pair).
static void backward_head_amx(const FlashArgs *a, int64_t b, int64_t h, BackwardScratch *w, uint16_t *zeros) {
  const int64_t T = a->T, D = a->D, Tp = padded(T), tiles = Tp / TILE, band = w->band, ldp = SEGMENT * TILE;
  const HeadView v = backward_prologue(a, b, h, w, zeros);
  const uint16_t *kr = v.packed[0], *vr = v.packed[1], *kt = v.packed[2];
  float *dk = v.dk, *dv = v.dv;
  pack_over_d(v.q, a->q_stride[2], T, Tp, D, w->qd);
  pack_over_d(v.dout, a->dout_stride[2], T, Tp, D, w->dod);
  for (int64_t kb0 = 0; kb0 < tiles; kb0 += band) {
    const int64_t kb1 = kb0 + band < tiles ? kb0 + band : tiles;
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const int64_t j0 = kb * TILE;
      for (int64_t qs = kb; qs < tiles; qs += SEGMENT) {  // a segment of query tiles from qs
        const int64_t qe = qs + SEGMENT < tiles ? qs + SEGMENT : tiles;
        for (int64_t qb = qs; qb < qe; ++qb) {
          const int64_t i0 = qb * TILE, column = (qb - qs) * TILE;
          amx_gemm(TILE, TILE, D / 2, kr + j0 * D, D, w->qd + 2 * i0, 2 * Tp, w->s, TILE, 0);  // S^T = K Q^T
          const QueryTile queries = query_tile(i0, T, a->scale, v.slope, v.pos);
          probabilities_transposed(w, &queries, j0, v.pos, w->lse + i0, w->pk + column, ldp);
          amx_gemm(TILE, TILE, D / 2, vr + j0 * D, D, w->dod + 2 * i0, 2 * Tp, w->dp, TILE, 0);  // dP^T = V dO^T
          score_gradients_transposed(w, w->delta + i0, a->scale, w->dsk + column, ldp,
                                     w->dsq + (qb * band + kb - kb0) * TILE * TILE);
        }
        const int64_t pairs = (qe - qs) * TILE / 2, t0 = qs * TILE;
        amx_gemm(TILE, D, pairs, w->pk, ldp, w->dot + t0 * D, 2 * D, dv + j0 * D, D, 1);  // dV += P^T dO
        amx_gemm(TILE, D, pairs, w->dsk, ldp, w->qt + t0 * D, 2 * D, dk + j0 * D, D, 1);  // dK += dS^T Q
      }
    }
    for (int64_t qb = kb0; qb < tiles; ++qb) {  // dQ^T += K^T dS^T over the band's keys up to the query tile
      const int64_t keys = ((qb < kb1 ? qb + 1 : kb1) - kb0) * TILE;
      amx_gemm(D, TILE, keys / 2, kt + kb0 * TILE, Tp, w->dsq + qb * band * TILE * TILE, 2 * TILE, w->dq + qb * TILE,
               Tp, kb0 > 0);
    }
  }
  uint16_t *dq = a->dq + b * a->dq_stride[0] + h * a->dq_stride[1];
  for (int64_t i0 = 0; i0 < T; i0 += 16)  // dQ^T back to rows, 16 x 16 at a time
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512 r[16];
      for (int d = 0; d < 16; ++d) r[d] = _mm512_loadu_ps(w->dq + (d0 + d) * Tp + i0);
      transpose16(r);
      for (int i = 0; i < 16 && i0 + i < T; ++i)
        _mm256_storeu_si256((__m256i *)(dq + (i0 + i) * a->dq_stride[2] + d0), round_bf16(r[i]));
    }
}
#endif

static _Thread_local void *backward_buffer;
static _Thread_local size_t backward_capacity;

// One query head's backward, by AMX tiles where granted.
static void backward_one(const FlashArgs *a, int64_t b, int64_t h, BackwardScratch *w, uint16_t *zeros) {
#if HAVE_AMX
  if (a->amx) {
    backward_head_amx(a, b, h, w, zeros);
    return;
  }
#endif
  backward_head(a, b, h, w, zeros);
}

// dK or dV of key/value head kv of batch row b from float32 rows (Tp, D) (`rows(t)`), in bf16.
static void store_kv_gradient(const FlashArgs *a, int which, int64_t b, int64_t kv, int64_t t, const float *row) {
  uint16_t *target = which == 0 ? a->dk + b * a->dk_stride[0] + kv * a->dk_stride[1] + t * a->dk_stride[2]
                                : a->dv + b * a->dv_stride[0] + kv * a->dv_stride[1] + t * a->dv_stride[2];
  for (int64_t d = 0; d < a->D; d += 16) _mm256_storeu_si256((__m256i *)(target + d), round_bf16(_mm512_loadu_ps(row + d)));
}

int andromeda_flash_backward(const FlashArgs *caller) {
  const FlashArgs args = checked(caller), *a = &args;
  const int64_t T = a->T, D = a->D, Tp = padded(T), G = a->H / a->K;
  const int grouped = a->partials == NULL;  // a task per key/value head, its group's dK, dV summed in place
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    uint16_t zeros[256] = {0};
    pack_keys_values(a, 1, zeros);
    // floats: dq (Tp D), delta, lse (Tp each), s, dp (TILE^2 each), grouped: dk, dv (Tp D each); bf16: qt,
    // dot (and for AMX qd, dod; Tp D each), 4 x TILE^2
    const size_t floats = (size_t)((grouped ? 3 : 1) * Tp * D + 2 * Tp + 2 * TILE * TILE);
    // AMX: pk, dsk (TILE x SEGMENT TILE each) and dsq (Tp / TILE x band x TILE^2; the caller's band
    // taken within 1 and the key tiles)
    const int64_t tiles = Tp / TILE;
    const int64_t band = !a->amx ? 0 : a->band < 1 ? 1 : a->band > tiles && tiles > 0 ? tiles : a->band;
    const size_t halves = (size_t)((a->amx ? 4 : 2) * Tp * D + 4 * TILE * TILE) +
                          (size_t)(a->amx ? 2 * TILE * SEGMENT * TILE + Tp * band * TILE : 0);
    float *base = (float *)thread_buffer(&backward_buffer, &backward_capacity, floats * 4 + halves * 2 + 64);
    BackwardScratch w = {0};
    if (base) {
      w.dq = base, w.delta = base + Tp * D, w.lse = w.delta + Tp, w.s = w.lse + Tp, w.dp = w.s + TILE * TILE;
      if (grouped) w.dk = w.dp + TILE * TILE, w.dv = w.dk + Tp * D;
      uint16_t *half = (uint16_t *)(base + floats);
      w.qt = half, w.dot = half + Tp * D, w.p = half + 2 * Tp * D;
      w.pv = w.p + TILE * TILE, w.ds = w.pv + TILE * TILE, w.dsv = w.ds + TILE * TILE;
      if (a->amx) {
        w.qd = w.dsv + TILE * TILE, w.dod = w.qd + Tp * D;
        w.pk = w.dod + Tp * D, w.dsk = w.pk + TILE * SEGMENT * TILE, w.dsq = w.dsk + TILE * SEGMENT * TILE;
        w.band = band;
      }
    } else {
      failed = 1;
    }
#if HAVE_AMX
    if (a->amx) amx_configure(8);
#endif
    if (grouped) {
      // each key/value head's dK and dV summed over its group's query heads in the thread's scratch
      // (in L2 at the 2.5 B's shapes), then stored: no per-head partials, no pass summing them
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (int64_t b = 0; b < a->B; ++b)
        for (int64_t kv = 0; kv < a->K; ++kv) {
          if (!base) continue;
          memset(w.dk, 0, (size_t)(2 * Tp * D) * sizeof(float));
          for (int64_t g = 0; g < G; ++g) backward_one(a, b, kv * G + g, &w, zeros);
          for (int64_t t = 0; t < T; ++t) {
            store_kv_gradient(a, 0, b, kv, t, w.dk + t * D);
            store_kv_gradient(a, 1, b, kv, t, w.dv + t * D);
          }
        }
    } else {
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (int64_t b = 0; b < a->B; ++b)
        for (int64_t h = 0; h < a->H; ++h)
          if (base) backward_one(a, b, h, &w, zeros);
    }
#if HAVE_AMX
    if (a->amx) _tile_release();
#endif
    if (!grouped) {
      // each key/value head's gradients: the sum of its group's partials, in bf16
#pragma omp for schedule(static) collapse(3)
      for (int64_t b = 0; b < a->B; ++b)
        for (int64_t kv = 0; kv < a->K; ++kv)
          for (int64_t t = 0; t < T; ++t)
            for (int which = 0; which < 2; ++which) {
              float sum[256];
              for (int64_t d = 0; d < D; d += 16) {
                __m512 total = _mm512_setzero_ps();
                for (int64_t g = 0; g < G; ++g) {
                  const int64_t h = kv * G + g;
                  total = _mm512_add_ps(total, _mm512_loadu_ps(a->partials + (((which * a->B + b) * a->H + h) * Tp + t) * D + d));
                }
                _mm512_storeu_ps(sum + d, total);
              }
              store_kv_gradient(a, which, b, kv, t, sum);
            }
    }
  }
  return failed ? 2 : 0;
}

// ------------------------------------------------------------------------------------ prologue
// The heads attention reads, from the fused projection's output: QK-norm, its learned scales and
// the rotary xPos rotation in one pass forward and one backward (model.attention's l2_normalize,
// the scales and positions.apply_rotary take a dozen passes each way over float32 copies).
// qkv (B, T, H + 2K, D) bf16 contiguous; a query or key head x (D channels) becomes
//   u = bf16(x / bf16(max(|x|, eps))),  y = u * scale (float32),  z = bf16(rotate(y))
// rotating the first R channels in adjacent pairs (even + i odd) by the position's table (cos, sin);
// values are copied. Outputs q (B, T, H, D), k and v (B, T, K, D), contiguous.
// Backward: dy = the rotation's transpose of dz, dscale += dy u (summed over b, t), du = dy scale,
// dx = (du - x^ (x^ . du)) / |x| with x^ = x / |x| (du / eps where |x| < eps), all in float32.

typedef struct {
  int64_t B, T, H, K, D, R;  // R: rotated channels per head, a multiple of 16, at most D
  const uint16_t *qkv;
  const float *q_scale, *k_scale;  // (H, D), (K, D)
  const float *q_cos, *q_sin, *k_cos, *k_sin;  // (B or 1, T, R / 2)
  int64_t table_stride;  // between batch rows of the tables: 0 when shared
  float eps;
  uint16_t *q, *k, *v;  // forward's outputs
  const uint16_t *dq, *dk, *dv;  // backward's inputs at their (b, h, t) strides
  int64_t dq_stride[3], dk_stride[3], dv_stride[3];
  uint16_t *dqkv;  // backward's output, qkv's layout
  float *dscale;  // (H + K, D): the scales' gradients, added to (the caller zeroes it)
} PrologueArgs;

static inline __m512 load_bf16(const uint16_t *x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

static inline __m512 widen(__m256i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// The 8 pairs' table entries from c, each twice: (c0, c0, c1, c1, ...).
static inline __m512 pairs_of(const float *c) {
  const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  return _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_loadu_ps(c)));
}

// (e, o) pairs times (cos + i sin): e cos - o sin, e sin + o cos; sign -1 rotates back.
static inline __m512 rotate(__m512 y, const float *cos, const float *sin, float sign) {
  const __m512 even_negative = _mm512_set_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
  const __m512 s = _mm512_mul_ps(_mm512_mul_ps(pairs_of(sin), even_negative), _mm512_set1_ps(sign));
  return _mm512_fmadd_ps(y, pairs_of(cos), _mm512_mul_ps(_mm512_permute_ps(y, 0xB1), s));
}

// |x| of one head, clamped to eps from below (NaN stays NaN, as torch's clamp_min).
static inline float head_norm(const uint16_t *x, int64_t D, float eps) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    const __m512 v = load_bf16(x + c);
    sum = _mm512_fmadd_ps(v, v, sum);
  }
  const float norm = sqrtf(_mm512_reduce_add_ps(sum));
  return norm < eps ? eps : norm;
}

static void prologue_head(const PrologueArgs *a, const uint16_t *x, const float *scale, const float *cos,
                          const float *sin, uint16_t *out) {
  const float norm = head_norm(x, a->D, a->eps);
  const __m512 divisor = widen(round_bf16(_mm512_set1_ps(norm)));  // l2_normalize divides by bf16(norm)
  for (int64_t c = 0; c < a->D; c += 16) {
    const __m512 u = widen(round_bf16(_mm512_div_ps(load_bf16(x + c), divisor)));
    __m512 y = _mm512_mul_ps(u, _mm512_loadu_ps(scale + c));
    if (c < a->R) y = rotate(y, cos + c / 2, sin + c / 2, 1.0f);
    _mm256_storeu_si256((__m256i *)(out + c), round_bf16(y));
  }
}

void andromeda_prologue_forward(const PrologueArgs *a) {
  const int64_t H = a->H, K = a->K, D = a->D, heads = H + 2 * K, half = a->R / 2;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < a->B * a->T; ++row) {
    const int64_t b = row / a->T, t = row % a->T;
    const uint16_t *x = a->qkv + row * heads * D;
    const int64_t table = b * a->table_stride + t * half;
    for (int64_t h = 0; h < H; ++h)
      prologue_head(a, x + h * D, a->q_scale + h * D, a->q_cos + table, a->q_sin + table, a->q + (row * H + h) * D);
    for (int64_t h = 0; h < K; ++h)
      prologue_head(a, x + (H + h) * D, a->k_scale + h * D, a->k_cos + table, a->k_sin + table,
                    a->k + (row * K + h) * D);
    memcpy(a->v + row * K * D, x + (H + K) * D, (size_t)(K * D) * 2);
  }
}

static void prologue_head_backward(const PrologueArgs *a, const uint16_t *x, const float *scale, const float *cos,
                                   const float *sin, const uint16_t *dz, uint16_t *dx, float *dscale) {
  const int64_t D = a->D;
  const float length = head_norm(x, D, 0.0f), norm = length < a->eps ? a->eps : length;
  const __m512 divisor = widen(round_bf16(_mm512_set1_ps(norm))), inverse = _mm512_set1_ps(1.0f / norm);
  float du[256];
  __m512 dot = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    const __m512 xv = load_bf16(x + c);
    __m512 dy = load_bf16(dz + c);
    if (c < a->R) dy = rotate(dy, cos + c / 2, sin + c / 2, -1.0f);
    const __m512 u = widen(round_bf16(_mm512_div_ps(xv, divisor)));
    _mm512_storeu_ps(dscale + c, _mm512_fmadd_ps(dy, u, _mm512_loadu_ps(dscale + c)));
    const __m512 g = _mm512_mul_ps(dy, _mm512_loadu_ps(scale + c));
    _mm512_storeu_ps(du + c, g);
    dot = _mm512_fmadd_ps(g, _mm512_mul_ps(xv, inverse), dot);
  }
  // below eps the forward divided by the constant eps: no projection
  const __m512 along = _mm512_set1_ps(length < a->eps ? 0.0f : _mm512_reduce_add_ps(dot));
  for (int64_t c = 0; c < D; c += 16) {
    const __m512 xhat = _mm512_mul_ps(load_bf16(x + c), inverse);
    const __m512 g = _mm512_fnmadd_ps(xhat, along, _mm512_loadu_ps(du + c));
    _mm256_storeu_si256((__m256i *)(dx + c), round_bf16(_mm512_mul_ps(g, inverse)));
  }
}

// The scales' gradients: each thread sums its rows into its own slice of `partials` (threads x
// (H + K) x D), then the slices are added in thread order, so a run's sums do not depend on which
// thread finishes first. 2 where `partials` could not be allocated.
int andromeda_prologue_backward(const PrologueArgs *a) {
  const int64_t H = a->H, K = a->K, D = a->D, heads = H + 2 * K, half = a->R / 2, n = (H + K) * D;
  Partials partials = partials_open(n);
  if (!partials.rows) return 2;
#pragma omp parallel
  {
    float *dscale = partial_row(&partials);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < a->B * a->T; ++row) {
      const int64_t b = row / a->T, t = row % a->T;
      const uint16_t *x = a->qkv + row * heads * D;
      uint16_t *dx = a->dqkv + row * heads * D;
      const int64_t table = b * a->table_stride + t * half;
      for (int64_t h = 0; h < H; ++h)
        prologue_head_backward(a, x + h * D, a->q_scale + h * D, a->q_cos + table, a->q_sin + table,
                               a->dq + b * a->dq_stride[0] + h * a->dq_stride[1] + t * a->dq_stride[2],
                               dx + h * D, dscale + h * D);
      for (int64_t h = 0; h < K; ++h)
        prologue_head_backward(a, x + (H + h) * D, a->k_scale + h * D, a->k_cos + table, a->k_sin + table,
                               a->dk + b * a->dk_stride[0] + h * a->dk_stride[1] + t * a->dk_stride[2],
                               dx + (H + h) * D, dscale + (H + h) * D);
      for (int64_t h = 0; h < K; ++h)
        memcpy(dx + (H + K + h) * D, a->dv + b * a->dv_stride[0] + h * a->dv_stride[1] + t * a->dv_stride[2],
               (size_t)D * 2);
    }
  }
  partials_add(&partials, a->dscale);
  return 0;
}
