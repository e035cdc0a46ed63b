// Fused attention for one query row per head, grouped (a decoding step): the CPU implementation of
// the op `andromeda::decode_sdpa` (schema and PyTorch fallback in andromeda/inference/native.py,
// C++ entry in ops.cpp). For each row b and key/value head h, its G query heads g read that head's
// S keys and values:
//   s[g, j] = scale * q[g] . k[j] + mask[g, j]
//   out[g]  = sum_j softmax_j(s[g]) v[j]
// which is F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) on q (B, K, G, D),
// k and v (B, K, S, D) and an additive mask broadcast to (B, K, G, S). Arithmetic is float32 (bf16
// inputs are exact in it; the output is rounded to bf16 to nearest even, as torch rounds).
//
// Why not ATen's SDPA: for one query row its CPU flash kernel spends tens of microseconds a call
// packing blocks and splitting work whatever the number of keys, where a decode step at a short
// context has little to compute; and a compiled step's cache is read whole (its capacity), most of
// it masked. Here a column whose mask is the lowest finite value (or -inf) for every query head is
// never read: next to any readable key it weighs exactly 0 (exp underflows), so skipping it changes
// nothing. A task with a query head that may read no column (a padding row) reads all of them, as
// SDPA does (every score then rounds to the same value and the row averages its values).
//
// Layout of the work: first a pass over the mask counts each task's readable columns, and a call
// where one task would read more than `limit` declines (status 3: the caller runs SDPA) having read
// only its mask. Then one task per (b, h), in parallel on PyTorch's OpenMP runtime: scores with the
// G <= 16 query heads in the lanes of one vector (the queries transposed once, the keys broadcast
// channel by channel, KEYS keys at a time); an exact softmax over them; the weighted values with
// 16 channels in the lanes, as many query heads and channel chunks a pass as fill the registers.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx512_math.h"

#define HEADS 16   // query heads per key/value head at most: one vector's lanes
#define MAX_DIM 256
#define KEYS 8     // keys scored together: one load of the queries serves KEYS independent products

typedef struct {
  int64_t B, K, G, S, D;
  const void *q;        // (B, K, G, D), channels contiguous, at the element strides below
  int64_t q_b, q_h, q_g;
  const void *k, *v;    // (B, K, S, D), channels contiguous
  int64_t k_b, k_h, k_s, v_b, v_h, v_s;
  const void *mask;     // (B, K, G, S) broadcast (a stride of 0), columns contiguous
  int64_t m_b, m_h, m_g;
  int64_t bf16;         // q, k, v, mask and out in bfloat16 (else float32)
  float scale;
  int64_t limit;        // most columns a task reads: more, and the call declines (status 3)
  void *out;            // (B, K, G, D), contiguous
} SdpaArgs;

// 16 values from p + i on as floats (bf16 or float32), the lanes past `mask` 0.
static inline __m512 load16(const void *p, int64_t i, __mmask16 mask, int bf16) {
  if (!bf16) return _mm512_maskz_loadu_ps(mask, (const float *)p + i);
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// 16 floats stored to p + i as float32 or bf16 (to nearest even, NaN kept), the lanes in `mask`.
static inline void store16(void *p, int64_t i, __m512 x, __mmask16 mask, int bf16) {
  if (!bf16) {
    _mm512_mask_storeu_ps((float *)p + i, mask, x);
    return;
  }
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16((uint16_t *)p + i, mask, _mm512_cvtepi32_epi16(rounded));
}

static inline __mmask16 first(int64_t count) {
  return count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? (__mmask16)0 : (__mmask16)((1u << count) - 1);
}

// The number of columns task (b, h) reads (every column where one of its query heads may read
// none), counted up to just past `limit`: a mask pass with no writes, so a call that declines costs
// one read of its mask.
static int64_t count_readable(const SdpaArgs *a, int64_t b, int64_t h, int64_t limit) {
  const int64_t G = a->G, S = a->S;
  const int bf16 = (int)a->bf16;
  const size_t width = bf16 ? 2 : 4;
  const char *mask = (const char *)a->mask + (b * a->m_b + h * a->m_h) * width;
  const __m512 lowest = _mm512_set1_ps(bf16 ? -3.38953139e38f : -3.40282347e38f);
  uint32_t rows_reading = 0;  // bit g: query head g may read some column so far
  int64_t n = 0;
  for (int64_t j = 0; j < S; j += 16) {
    __mmask16 live = 0;
    for (int64_t g = 0; g < G; ++g) {
      const __mmask16 row = _mm512_mask_cmp_ps_mask(first(S - j), load16(mask + g * a->m_g * width, j, first(S - j), bf16),
                                                    lowest, _CMP_GT_OQ);
      live |= row;
      if (row) rows_reading |= 1u << g;
    }
    n += __builtin_popcount(live);
    if (n > limit) return n;
  }
  return rows_reading == (G >= 32 ? 0xFFFFFFFFu : (1u << G) - 1) ? n : S;
}

// Task (b, h), first part: its mask as float32 rows in `masks` (G * S) and the columns it reads in
// `columns` (S); returns their number.
static int64_t readable(const SdpaArgs *a, int64_t b, int64_t h, float *masks, int32_t *columns) {
  const int64_t G = a->G, S = a->S;
  const int bf16 = (int)a->bf16;
  const size_t width = bf16 ? 2 : 4;
  const char *mask = (const char *)a->mask + (b * a->m_b + h * a->m_h) * width;
  const float lowest = bf16 ? -3.38953139e38f : -3.40282347e38f;  // the dtype's lowest finite value

  // The mask as float32 rows, and which columns some query head may read.
  int any_row_empty = 0;
  int64_t n = 0;
  for (int64_t g = 0; g < G; ++g) {
    float *row = masks + g * S;
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < S; j += 16) {
      const __m512 m = load16(mask + g * a->m_g * width, j, first(S - j), bf16);
      _mm512_mask_storeu_ps(row + j, first(S - j), m);
      best = _mm512_mask_max_ps(best, first(S - j), best, m);
    }
    if (_mm512_reduce_max_ps(best) <= lowest) any_row_empty = 1;
  }
  if (any_row_empty) {
    for (int64_t j = 0; j < S; ++j) columns[n++] = (int32_t)j;
  } else {
    for (int64_t j = 0; j < S; j += 16) {
      __mmask16 live = 0;
      for (int64_t g = 0; g < G; ++g)
        live |= _mm512_mask_cmp_ps_mask(first(S - j), _mm512_loadu_ps(masks + g * S + j),
                                            _mm512_set1_ps(lowest), _CMP_GT_OQ);
      for (int i = 0; i < 16; ++i)
        if (live >> i & 1) columns[n++] = (int32_t)(j + i);
    }
  }
  return n;
}

// out[g, d] = inverse[g] * sum_c p[c, g] v[columns[c], d] for the G query heads of a task: `chunks`
// chunks of 16 channels a pass over the columns, one accumulator per (chunk, head) for `heads` >= G
// heads (constants once inlined, so the accumulators stay in registers and each weight, broadcast
// once, serves every chunk).
static inline __attribute__((always_inline)) void weighted_values(const SdpaArgs *a, const char *v,
                                                                  const int32_t *columns, int64_t n,
                                                                  const float *scores, const float *inverse,
                                                                  char *out, const int heads, const int chunks) {
  const int64_t D = a->D, G = a->G;
  const int bf16 = (int)a->bf16;
  for (int64_t d = 0; d < D; d += 16 * chunks) {
    __mmask16 lanes[4];
    __m512 acc[4][HEADS];
#pragma GCC unroll 4
    for (int i = 0; i < chunks; ++i) {
      lanes[i] = first(D - d - 16 * i);
#pragma GCC unroll 16
      for (int g = 0; g < heads; ++g) acc[i][g] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < n; ++c) {
      __m512 value[4];
#pragma GCC unroll 4
      for (int i = 0; i < chunks; ++i) value[i] = load16(v, columns[c] * a->v_s + d + 16 * i, lanes[i], bf16);
      const float *p = scores + c * HEADS;
#pragma GCC unroll 16
      for (int g = 0; g < heads; ++g) {
        const __m512 weight = _mm512_set1_ps(p[g]);
#pragma GCC unroll 4
        for (int i = 0; i < chunks; ++i) acc[i][g] = _mm512_fmadd_ps(weight, value[i], acc[i][g]);
      }
    }
    float sums[4][HEADS][16];  // the accumulators leave registers once (a loop over G would keep them in memory)
#pragma GCC unroll 4
    for (int i = 0; i < chunks; ++i)
#pragma GCC unroll 16
      for (int g = 0; g < heads; ++g) _mm512_storeu_ps(sums[i][g], _mm512_mul_ps(acc[i][g], _mm512_set1_ps(inverse[g])));
    for (int i = 0; i < chunks; ++i)
      for (int64_t g = 0; g < G; ++g) store16(out, g * D + d + 16 * i, _mm512_loadu_ps(sums[i][g]), lanes[i], bf16);
  }
}

// Task (b, h), second part: the attention of its G query heads over the n columns `readable` chose.
// Scratch: scores n * HEADS floats, keys KEYS * D.
static void attend(const SdpaArgs *a, int64_t b, int64_t h, const float *masks, const int32_t *columns,
                   int64_t n, float *scores, float *keys) {
  const int64_t G = a->G, S = a->S, D = a->D;
  const int bf16 = (int)a->bf16;
  const size_t width = bf16 ? 2 : 4;
  const char *q = (const char *)a->q + (b * a->q_b + h * a->q_h) * width;
  const char *k = (const char *)a->k + (b * a->k_b + h * a->k_h) * width;
  const char *v = (const char *)a->v + (b * a->v_b + h * a->v_h) * width;

  // Queries transposed and scaled: qt[d] holds channel d of the G heads (lanes past G are 0).
  __m512 qt[MAX_DIM];
  {
    float rows[HEADS][MAX_DIM];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(rows[g] + d, _mm512_mul_ps(load16(q, g * a->q_g + d, first(D - d), bf16),
                                                     _mm512_set1_ps(a->scale)));
    for (int64_t d = 0; d < D; ++d) {
      float lane[HEADS] = {0};
      for (int64_t g = 0; g < G; ++g) lane[g] = rows[g][d];
      qt[d] = _mm512_loadu_ps(lane);
    }
  }
  const __m512i mask_index = _mm512_mullo_epi32(_mm512_set1_epi32((int)S), _mm512_setr_epi32(
      0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 heads = first(G);

  // Scores of the readable columns, KEYS at a time (the keys as floats in `keys` first).
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t c = 0; c < n; c += KEYS) {
    const int count = n - c < KEYS ? (int)(n - c) : KEYS;
    for (int i = 0; i < count; ++i)
      for (int64_t d = 0; d < D; d += 16)
        _mm512_mask_storeu_ps(keys + i * D + d, first(D - d), load16(k, columns[c + i] * a->k_s + d, first(D - d), bf16));
    __m512 acc[KEYS];
    for (int i = 0; i < KEYS; ++i) acc[i] = _mm512_setzero_ps();
    if (count == KEYS) {
      for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 8
        for (int i = 0; i < KEYS; ++i) acc[i] = _mm512_fmadd_ps(qt[d], _mm512_set1_ps(keys[i * D + d]), acc[i]);
    } else {
      for (int64_t d = 0; d < D; ++d)
        for (int i = 0; i < count; ++i) acc[i] = _mm512_fmadd_ps(qt[d], _mm512_set1_ps(keys[i * D + d]), acc[i]);
    }
    for (int i = 0; i < count; ++i) {
      const __m512 m = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), heads,
                                                _mm512_add_epi32(mask_index, _mm512_set1_epi32(columns[c + i])),
                                                masks, 4);
      const __m512 s = _mm512_add_ps(acc[i], m);
      _mm512_storeu_ps(scores + (c + i) * HEADS, s);
      top = _mm512_max_ps(top, s);
    }
  }

  // Softmax: the weights in place of the scores (0 in the lanes past G), and their sums.
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; ++c) {
    const __m512 p = _mm512_maskz_mov_ps(heads, exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + c * HEADS), top)));
    _mm512_storeu_ps(scores + c * HEADS, p);
    sum = _mm512_add_ps(sum, p);
  }
  float inverse[HEADS];
  _mm512_storeu_ps(inverse, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));

  // Weighted values (`weighted_values`), with as many query heads and 16-channel chunks as fill
  // the registers for this G.
  char *out = (char *)a->out + ((b * a->K + h) * G * D) * width;
  if (G <= 4)
    weighted_values(a, v, columns, n, scores, inverse, out, 4, 4);
  else if (G <= 8)
    weighted_values(a, v, columns, n, scores, inverse, out, 8, 3);
  else if (G <= 12)
    weighted_values(a, v, columns, n, scores, inverse, out, 12, 2);
  else
    weighted_values(a, v, columns, n, scores, inverse, out, 16, 1);
}

// 0 on success; 1 for arguments the kernel does not take (G > 16, D > MAX_DIM (256), S < 1); 2 out
// of memory; 3 declined: some task would read more than `limit` columns (nothing is computed).
int andromeda_decode_sdpa(const SdpaArgs *a) {
  if (a->G < 1 || a->G > HEADS || a->D < 1 || a->D > MAX_DIM || a->S < 1) return 1;
  const int64_t tasks = a->B * a->K, S = a->S;
  int64_t most = 0;
  for (int64_t t = 0; t < tasks && most <= a->limit; ++t) {
    const int64_t n = count_readable(a, t / a->K, t % a->K, a->limit);
    most = n > most ? n : most;
  }
  if (most > a->limit) return 3;
  // Per thread: masks (G * S floats, rounded up to whole vectors), columns (S ints), scores
  // (most * HEADS floats) and keys (KEYS * D floats).
  const int64_t mask_floats = (a->G * S + 15) / 16 * 16, column_floats = (S + 15) / 16 * 16;
  const size_t bytes = (size_t)(mask_floats + column_floats + most * HEADS + KEYS * a->D) * 4;
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    float *scratch = (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      if (!scratch) {
        failed = 1;
        continue;
      }
      float *masks = scratch, *keys = masks + mask_floats + column_floats, *scores = keys + KEYS * a->D;
      int32_t *columns = (int32_t *)(masks + mask_floats);
      const int64_t n = readable(a, t / a->K, t % a->K, masks, columns);
      attend(a, t / a->K, t % a->K, masks, columns, n, scores, keys);
    }
    free(scratch);
  }
  return failed ? 2 : 0;
}
