// Fused attention for one query row per head, grouped (a decoding step): the CPU implementation of
// the op `andromeda::decode_sdpa` (schema and PyTorch fallback in andromeda/inference/native.py,
// C++ entry in ops.cpp). For each row b and key/value head h, its G query heads g read that head's
// S keys and values:
//   s[g, j] = scale * q[g] . k[j] + mask[g, j]
//   out[g]  = sum_j softmax_j(s[g]) v[j]
// which is F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) on q (B, K, G, D),
// k and v (B, K, S, D) and an additive mask broadcast to (B, K, G, S). Sums are float32; the output
// is rounded to bf16 to nearest even, as torch rounds.
//
// Why not ATen's SDPA: for one query row its CPU flash kernel spends tens of microseconds a call
// packing blocks and splitting work whatever the number of keys, where a decode step at a short
// context has little to compute; a compiled step's cache is read whole (its capacity), most of it
// masked; and at long contexts it reads the keys and values at about half the memory bandwidth. Here
// a column whose mask is the lowest finite value (or -inf) for every query head weighs exactly 0
// next to any readable key (exp underflows), so it is skipped: its value is never read, nor its key
// on the FMA path (the AMX path loads the keys of a 16-column block with a readable column whole,
// and sets the others' scores to -inf, so NaN there never counts). A task with a query head that
// may read no column (a padding row) reads all of them, as SDPA does (every score then rounds to
// the same value and the row averages its values); a head whose columns are all -inf gets 0, as
// SDPA gives it.
//
// Two paths, one task per (b, h) in parallel on PyTorch's OpenMP runtime:
// - bf16 with AMX tiles (Sapphire Rapids on; `amx` set by the caller once Linux granted them) and a
//   head size that is a multiple of 32: `attend_amx`, any number of keys, a task split into column
//   ranges where there are fewer tasks than threads. Both products are tile products; the weights
//   are rounded to bf16 for the second, as ATen's flash kernel rounds them.
// - otherwise (float32, CPUs without AMX): first a pass over the mask counts each task's readable
//   columns, and a call where one task would read more than `limit` declines (status 3: the caller
//   runs SDPA) having read only its mask. Then `attend`: scores with the G <= 16 query heads in the
//   lanes of one vector (the queries transposed once, the keys broadcast channel by channel, KEYS
//   keys at a time); an exact float32 softmax; the weighted values with 16 channels in the lanes, as
//   many query heads and channel chunks a pass as fill the registers.
#define _DEFAULT_SOURCE  // syscall (amx.h) under -std=c11
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx512_math.h"
#include "scratch.h"

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
  int64_t limit;        // most columns a task reads on the FMA path: more, and the call declines (status 3)
  int64_t amx;          // AMX tiles granted: bf16 calls with D a multiple of 32 take `attend_amx`
  void *out;            // (B, K, G, D), contiguous
} SdpaArgs;

static _Thread_local void *task_room;   // a thread's scratch inside the parallel regions
static _Thread_local size_t task_room_bytes;

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
      const __mmask16 row = _mm512_mask_cmp_ps_mask(first_lanes(S - j), load16(mask + g * a->m_g * width, j, first_lanes(S - j), bf16),
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
      const __m512 m = load16(mask + g * a->m_g * width, j, first_lanes(S - j), bf16);
      _mm512_mask_storeu_ps(row + j, first_lanes(S - j), m);
      best = _mm512_mask_max_ps(best, first_lanes(S - j), best, m);
    }
    if (_mm512_reduce_max_ps(best) <= lowest) any_row_empty = 1;
  }
  if (any_row_empty) {
    for (int64_t j = 0; j < S; ++j) columns[n++] = (int32_t)j;
  } else {
    for (int64_t j = 0; j < S; j += 16) {
      __mmask16 live = 0;
      for (int64_t g = 0; g < G; ++g)
        live |= _mm512_mask_cmp_ps_mask(first_lanes(S - j), _mm512_loadu_ps(masks + g * S + j),
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
      lanes[i] = first_lanes(D - d - 16 * i);
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
        _mm512_storeu_ps(rows[g] + d, _mm512_mul_ps(load16(q, g * a->q_g + d, first_lanes(D - d), bf16),
                                                     _mm512_set1_ps(a->scale)));
    for (int64_t d = 0; d < D; ++d) {
      float lane[HEADS] = {0};
      for (int64_t g = 0; g < G; ++g) lane[g] = rows[g][d];
      qt[d] = _mm512_loadu_ps(lane);
    }
  }
  const __m512i mask_index = _mm512_mullo_epi32(_mm512_set1_epi32((int)S), _mm512_setr_epi32(
      0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 heads = first_lanes(G);

  // Scores of the readable columns, KEYS at a time (the keys as floats in `keys` first).
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t c = 0; c < n; c += KEYS) {
    const int count = n - c < KEYS ? (int)(n - c) : KEYS;
    for (int i = 0; i < count; ++i)
      for (int64_t d = 0; d < D; d += 16)
        _mm512_mask_storeu_ps(keys + i * D + d, first_lanes(D - d), load16(k, columns[c + i] * a->k_s + d, first_lanes(D - d), bf16));
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

  // Softmax: the weights in place of the scores (0 in the lanes past G), and their sums. A head
  // whose every score is -inf (its columns all masked with -inf) gets weights 0 and the output 0,
  // as SDPA gives it.
  top = _mm512_mask_mov_ps(top, _mm512_cmp_ps_mask(top, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), _mm512_setzero_ps());
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; ++c) {
    const __m512 p = _mm512_maskz_mov_ps(heads, exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + c * HEADS), top)));
    _mm512_storeu_ps(scores + c * HEADS, p);
    sum = _mm512_add_ps(sum, p);
  }
  float inverse[HEADS];
  _mm512_storeu_ps(inverse, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_GT_OQ),
                                                _mm512_set1_ps(1.0f), sum));

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

#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
// bf16 by AMX tiles (`attend_amx`), at any context: the products q.k and p.v as TDPBF16PS tile
// products, so that a long context's attention is bound by reading its keys and values, not by
// FMAs (and a short one costs no more than the FMA path).
// A task's columns go in chunks of CHUNK with a running max per head (flash attention): each
// 16-column block's scores come from one tile (16 keys x 16 heads, the keys loaded straight from
// the cache as the A tile, the queries a B tile of channel pairs), transposed to heads in rows, the
// mask added; then the chunk's weights exp(s - max), rounded to bf16 as ATen's flash kernel rounds
// them, are the A tile of the values' product, whose B tiles pair consecutive keys' channels. A
// (b, h) task is split into ranges of at least MIN_RANGE columns where there are fewer tasks than
// threads (flash-decoding, Dao et al. 2023), combined by one pass.
#include "amx.h"

#define CHUNK 256       // columns per softmax chunk (a multiple of 32)
#define MIN_RANGE 1024  // columns per range at least, where a task is split across threads
#define MAX_SPLITS 64   // ranges per task at most
#define AHEAD 32        // columns the keys and values are prefetched ahead (a multiple of 32)

int andromeda_decode_sdpa_amx(void) { return amx_request(); }

// One thread's scratch for `attend_amx`.
typedef struct {
  float *scores;    // (HEADS, CHUNK): a chunk's scores, heads in rows
  uint16_t *p;      // (HEADS, CHUNK) bf16: its weights; rows past G are 0
  uint32_t *qb;     // (D / 32, 16, 16): the queries as B tiles (channel pairs x heads, bf16 pairs)
  uint32_t *vb;     // (4, 16, 16): a block's values as B tiles (key pairs x channels, bf16 pairs)
  float *tile;      // (16, 16): a block's scores, keys in rows
  uint16_t *keys;   // (16, D): the keys of a block that ends past the range, zero-padded
  uint16_t live[CHUNK / 16];  // per block of 16 columns: the columns it reads
} AmxScratch;

// Task (b, h), columns [c0, c1): its heads' max score m, sum of weights l and weighted values acc
// (HEADS, D) relative to m. every: read every column (a query head that may read none: as SDPA, it
// then averages all values), else the columns some head may read.
static void attend_amx(const SdpaArgs *a, int64_t b, int64_t h, int64_t c0, int64_t c1, int every,
                       AmxScratch *s, float *m, float *l, float *acc) {
  const int64_t G = a->G, D = a->D;
  const uint16_t *q = (const uint16_t *)a->q + b * a->q_b + h * a->q_h;
  const uint16_t *k = (const uint16_t *)a->k + b * a->k_b + h * a->k_h;
  const uint16_t *v = (const uint16_t *)a->v + b * a->v_b + h * a->v_h;
  const uint16_t *mask = (const uint16_t *)a->mask + b * a->m_b + h * a->m_h;
  const __m512 lowest = _mm512_set1_ps(-3.38953139e38f), minus_inf = _mm512_set1_ps(-INFINITY);
  // Channel pairs (2i, 2i + 1) of query head g at (i / 16, i % 16, g) of the B tiles.
  memset(s->qb, 0, (size_t)D / 32 * 1024);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D / 2; ++i)
      s->qb[(i / 16 * 16 + i % 16) * 16 + g] = (uint32_t)q[g * a->q_g + 2 * i] | (uint32_t)q[g * a->q_g + 2 * i + 1] << 16;
  memset(s->p + G * CHUNK, 0, sizeof(uint16_t) * (HEADS - G) * CHUNK);  // weights of absent heads: 0
  memset(acc, 0, sizeof(float) * HEADS * D);
  for (int g = 0; g < HEADS; ++g) m[g] = -INFINITY, l[g] = 0.0f;
  // Channel pairs of two keys' 32 channels: (x, y) -> x0 y0 x1 y1 ... for channels 0-15, then 16-31.
  static const uint16_t pairs[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                     8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i pair_low = _mm512_loadu_si512(pairs);
  const __m512i pair_high = _mm512_add_epi16(pair_low, _mm512_set1_epi16(16));

  for (int64_t j0 = c0; j0 < c1; j0 += CHUNK) {
    const int64_t n = c1 - j0 < CHUNK ? c1 - j0 : CHUNK, padded = (n + 31) / 32 * 32;
    __m512 top[HEADS];
    for (int g = 0; g < HEADS; ++g) top[g] = minus_inf;
    // Scores, 16 columns a block.
    for (int64_t jb = 0; jb < padded; jb += 16) {
      const int64_t j = j0 + jb;
      const __mmask16 cols = first_lanes(n - jb);
      __m512 rows[HEADS];
      __mmask16 live = every ? cols : 0;
      for (int64_t g = 0; g < G; ++g) {
        rows[g] = load16(mask + g * a->m_g, j, cols, 1);
        live |= _mm512_mask_cmp_ps_mask(cols, rows[g], lowest, _CMP_GT_OQ);
      }
      s->live[jb / 16] = live;
      if (!live) {
        for (int64_t g = 0; g < G; ++g) _mm512_storeu_ps(s->scores + g * CHUNK + jb, minus_inf);
        continue;
      }
      // The keys AHEAD columns on into L1: a tile load waits for memory, where a prefetch overlaps
      // it (1.14x at 8k columns on one core of a Xeon with AMX).
      for (int64_t i = j + AHEAD; i < j + AHEAD + 16 && i < c1; ++i)
        for (int64_t c = 0; c < D; c += 32) _mm_prefetch((const char *)(k + i * a->k_s + c), _MM_HINT_T0);
      const uint16_t *key = k + j * a->k_s;
      int64_t stride = a->k_s * 2;
      if (cols != 0xFFFF) {  // the range's last block: its keys copied, zeros past them
        memset(s->keys, 0, sizeof(uint16_t) * 16 * D);
        for (int i = 0; i < 16; ++i)
          if (cols >> i & 1) memcpy(s->keys + i * D, key + i * a->k_s, sizeof(uint16_t) * D);
        key = s->keys, stride = D * 2;
      }
      _tile_zero(0);
      for (int64_t c = 0; c < D; c += 32) {
        _tile_loadd(4, key + c, stride);
        _tile_loadd(5, s->qb + c / 32 * 256, 64);
        _tile_dpbf16ps(0, 4, 5);
      }
      _tile_stored(0, s->tile, 64);
      __m512 dots[16];
      for (int i = 0; i < 16; ++i) dots[i] = _mm512_load_ps(s->tile + 16 * i);
      transpose16(dots);  // dots[g]: head g's 16 columns
      for (int64_t g = 0; g < G; ++g) {
        const __m512 score = _mm512_mask_fmadd_ps(dots[g], live, _mm512_set1_ps(a->scale), rows[g]);
        const __m512 kept = _mm512_mask_mov_ps(minus_inf, live, score);  // unread columns: weight 0
        _mm512_storeu_ps(s->scores + g * CHUNK + jb, kept);
        top[g] = _mm512_max_ps(top[g], kept);
      }
    }
    // Weights in bf16 relative to the heads' running max; the sums and values rescaled when it rises.
    for (int64_t g = 0; g < G; ++g) {
      const float before = m[g], high = _mm512_reduce_max_ps(top[g]);
      const float now = high > before ? high : before, base = now == -INFINITY ? 0.0f : now;
      if (now > before && before != -INFINITY) {
        const float factor = expf(before - base);
        l[g] *= factor;
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(acc + g * D + d, _mm512_mul_ps(_mm512_loadu_ps(acc + g * D + d), _mm512_set1_ps(factor)));
      }
      m[g] = now;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t jb = 0; jb < padded; jb += 16) {
        if (!s->live[jb / 16]) {  // weights 0 (a compiled step's unwritten capacity: most of its blocks)
          _mm256_storeu_si256((__m256i *)(s->p + g * CHUNK + jb), _mm256_setzero_si256());
          continue;
        }
        const __mmask16 cols = first_lanes(n - jb);
        const __m512 e = _mm512_maskz_mov_ps(
            cols, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(cols, s->scores + g * CHUNK + jb), _mm512_set1_ps(base))));
        const __m256i weight = (__m256i)_mm512_cvtneps_pbh(e);
        _mm256_storeu_si256((__m256i *)(s->p + g * CHUNK + jb), weight);
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(weight), 16)));
      }
      l[g] += _mm512_reduce_add_ps(sum);
    }
    // Weighted values: tiles 0-3 hold 16 heads x 64 channels of acc a pass; per 32 columns, the
    // weights (16 heads x 32 columns) times the values' B tiles (16 column pairs x 16 channels).
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int tiles = D - d0 >= 64 ? 4 : 2;
      float *at = acc + d0;  // tile numbers are immediates: no loops over them
      _tile_loadd(0, at, D * 4);
      _tile_loadd(1, at + 16, D * 4);
      if (tiles == 4) {
        _tile_loadd(2, at + 32, D * 4);
        _tile_loadd(3, at + 48, D * 4);
      }
      for (int64_t jb = 0; jb < padded; jb += 32) {
        const uint32_t live = (uint32_t)s->live[jb / 16] | (uint32_t)s->live[jb / 16 + 1] << 16;
        if (!live) continue;
        for (int r = 0; r < 16; ++r) {
          const uint16_t *x = v + (j0 + jb + 2 * r) * a->v_s + d0, *y = x + a->v_s;
          if (jb + AHEAD + 2 * r + 1 < n)  // as the keys: AHEAD columns on, this pass's 128 bytes a row
            for (int e = 0; e < 64; e += 32) {
              _mm_prefetch((const char *)(x + AHEAD * a->v_s + e), _MM_HINT_T0);
              _mm_prefetch((const char *)(y + AHEAD * a->v_s + e), _MM_HINT_T0);
            }
          const __mmask32 keep_x = live >> (2 * r) & 1 ? 0xFFFFFFFFu : 0, keep_y = live >> (2 * r + 1) & 1 ? 0xFFFFFFFFu : 0;
          for (int half = 0; half < tiles / 2; ++half) {
            const __m512i xs = _mm512_maskz_loadu_epi16(keep_x, x + 32 * half), ys = _mm512_maskz_loadu_epi16(keep_y, y + 32 * half);
            _mm512_store_si512(s->vb + (2 * half) * 256 + r * 16, _mm512_permutex2var_epi16(xs, pair_low, ys));
            _mm512_store_si512(s->vb + (2 * half + 1) * 256 + r * 16, _mm512_permutex2var_epi16(xs, pair_high, ys));
          }
        }
        _tile_loadd(4, s->p + jb, CHUNK * 2);
        _tile_loadd(5, s->vb, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, s->vb + 256, 64);
        _tile_dpbf16ps(1, 4, 6);
        if (tiles == 4) {
          _tile_loadd(5, s->vb + 512, 64);
          _tile_dpbf16ps(2, 4, 5);
          _tile_loadd(6, s->vb + 768, 64);
          _tile_dpbf16ps(3, 4, 6);
        }
      }
      _tile_stored(0, at, D * 4);
      _tile_stored(1, at + 16, D * 4);
      if (tiles == 4) {
        _tile_stored(2, at + 32, D * 4);
        _tile_stored(3, at + 48, D * 4);
      }
    }
  }
}

// Whether every query head of task (b, h) may read some column (a scan that stops once all do:
// in decoding, at the first block).
static int every_head_reads(const SdpaArgs *a, int64_t b, int64_t h) {
  const uint16_t *mask = (const uint16_t *)a->mask + b * a->m_b + h * a->m_h;
  const uint32_t all = (1u << a->G) - 1;
  uint32_t reading = 0;
  for (int64_t j = 0; j < a->S && reading != all; j += 16)
    for (int64_t g = 0; g < a->G; ++g)
      if (_mm512_mask_cmp_ps_mask(first_lanes(a->S - j), load16(mask + g * a->m_g, j, first_lanes(a->S - j), 1),
                                  _mm512_set1_ps(-3.38953139e38f), _CMP_GT_OQ))
        reading |= 1u << g;
  return reading == all;
}

static _Thread_local void *call_room;   // the calling thread's state for the whole call (decode_amx)
static _Thread_local size_t call_room_bytes;

// The whole call by `attend_amx`: tasks split into ranges for idle threads, then combined.
static int decode_amx(const SdpaArgs *a) {
  const int64_t tasks = a->B * a->K, S = a->S, D = a->D, G = a->G;
  const int64_t threads = omp_get_max_threads();
  int64_t splits = tasks < threads ? (threads + tasks - 1) / tasks : 1;
  if (splits > S / MIN_RANGE) splits = S / MIN_RANGE > 1 ? S / MIN_RANGE : 1;
  if (splits > MAX_SPLITS) splits = MAX_SPLITS;
  const int64_t span = ((S + splits - 1) / splits + CHUNK - 1) / CHUNK * CHUNK;
  splits = (S + span - 1) / span;
  const int64_t part = 2 * HEADS + HEADS * D;  // floats a range leaves: m, l, acc
  float *parts = (float *)thread_buffer(&call_room, &call_room_bytes, (size_t)(tasks * splits * part) * 4 + tasks);
  if (!parts) return 2;
  uint8_t *every = (uint8_t *)(parts + tasks * splits * part);
  for (int64_t t = 0; t < tasks; ++t) every[t] = !every_head_reads(a, t / a->K, t % a->K);
  const size_t scratch_bytes = (size_t)HEADS * CHUNK * 6 + (size_t)D / 32 * 1024 + 4096 + 1024 + (size_t)32 * D;
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    char *room = (char *)thread_buffer(&task_room, &task_room_bytes, scratch_bytes);
    AmxScratch s;
    if (room) {
      s.scores = (float *)room;
      s.p = (uint16_t *)(room + HEADS * CHUNK * 4);
      s.qb = (uint32_t *)(room + HEADS * CHUNK * 6);
      s.vb = (uint32_t *)((char *)s.qb + D / 32 * 1024);
      s.tile = (float *)((char *)s.vb + 4096);
      s.keys = (uint16_t *)((char *)s.tile + 1024);
      amx_configure(7);
    }
#pragma omp for schedule(static)
    for (int64_t w = 0; w < tasks * splits; ++w) {
      if (!room) {
        failed = 1;
        continue;
      }
      const int64_t t = w / splits, from = w % splits * span, to = from + span < S ? from + span : S;
      float *out = parts + w * part;
      attend_amx(a, t / a->K, t % a->K, from, to, every[t], &s, out, out + HEADS, out + 2 * HEADS);
    }
    if (room) _tile_release();
    // Each task's ranges combined: weights exp(m_r - max) on their sums and values.
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      char *out = (char *)a->out + t * G * D * 2;
      for (int64_t g = 0; g < G; ++g) {
        float top = -INFINITY;
        for (int64_t r = 0; r < splits; ++r) top = fmaxf(top, parts[(t * splits + r) * part + g]);
        float weights[MAX_SPLITS], total = 0.0f;
        for (int64_t r = 0; r < splits; ++r) {
          const float mr = parts[(t * splits + r) * part + g];
          weights[r] = mr == -INFINITY ? 0.0f : expf(mr - top);
          total += weights[r] * parts[(t * splits + r) * part + HEADS + g];
        }
        // A head whose every score is -inf weighs nothing: 0, as SDPA gives it.
        const __m512 inverse = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
        for (int64_t d = 0; d < D; d += 16) {
          __m512 sum = _mm512_setzero_ps();
          for (int64_t r = 0; r < splits; ++r)
            sum = _mm512_fmadd_ps(_mm512_set1_ps(weights[r]),
                                  _mm512_loadu_ps(parts + (t * splits + r) * part + 2 * HEADS + g * D + d), sum);
          store16(out, g * D + d, _mm512_mul_ps(sum, inverse), 0xFFFF, 1);
        }
      }
    }
  }
  return failed ? 2 : 0;
}
#else  // built without the AMX flags: never asked for (andromeda_decode_sdpa_amx is 0)
int andromeda_decode_sdpa_amx(void) { return 0; }
#define decode_amx(a) 3
#endif

// 0 on success; 1 for arguments the kernel does not take (an empty batch, G > 16, D > MAX_DIM (256),
// S < 1); 2 out
// of memory; 3 declined (FMA path): some task would read more than `limit` columns (nothing is
// computed).
int andromeda_decode_sdpa(const SdpaArgs *a) {
  if (a->B < 1 || a->K < 1 || a->G < 1 || a->G > HEADS || a->D < 1 || a->D > MAX_DIM || a->S < 1) return 1;
  if (a->amx && a->bf16 && a->D % 32 == 0) return decode_amx(a);
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
    float *scratch = (float *)thread_buffer(&task_room, &task_room_bytes, bytes);
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
  }
  return failed ? 2 : 0;
}
