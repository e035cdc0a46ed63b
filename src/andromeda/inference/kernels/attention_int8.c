// Decode attention over an int8 KV cache: one query position per row, the keys and values read as
// stored (int8, one scale per token and key/value head) and dequantized in registers.
//
// Built and loaded by andromeda/inference/kv_attention.py; the arithmetic is documented there, next
// to its PyTorch reference (`decode_attention_reference`), which the tests hold this file to.
//
// Per row b and key/value head h, for its G query heads g and each key column j the row may read
// (valid, at a position p_j <= i, inside the sliding window if any):
//   s[g, j] = scale * kscale_j * sum_d q[g, d] f_d(p_j) kq_j[d] - slope_g (i - p_j)
//   out[g]  = sum_j softmax_j(s[g]) vscale_j vq_j
// in float32, except that a bf16 model with 9 to 16 query heads per kv head and a head size that
// is a multiple of 32 takes both products from AMX tiles: the scores' by TDPBF16PS (queries, and
// keys times factors, rounded to bf16 as its dequantize-then-SDPA path rounds them, summed in
// float32; vdpbf16ps runs at a quarter of an FMA's rate on Sapphire Rapids), the weighted values'
// by TDPBUSD (`values_amx`: the weights as 16-bit codes in two u8 tiles, the int8 values as they
// are stored, summed in int32). f_d(p) = zeta_d^-((p - center) / base)
// = exp(rate_d (p - center)) is the xPos factor of rotary channel d (1 past the rotary channels):
// for a block of keys at consecutive positions p0 + j it is f_d(p0) exp(rate_d j), so f_d(p0) goes
// into the queries once per block and the keys are multiplied by one table of exp(rate_d j); a
// block with a gap (a ring buffer's wrap, padding) gets every key's factors exactly. Readable keys
// lie at most `reach` past the center (the cache keeps every query within it), where no factor
// reaches max_factor: no cap is applied.
//
// Work: each (row, kv head) is split into column ranges (flash-decoding, Dao et al. 2023), each
// keeping a running max, sum and weighted values per head, combined by one pass. A row that may read
// no key averages all S columns' values, as the additive-bias path does. A range goes in blocks of
// 48 to 63 readable columns (112 to 127 on the AMX path): scores (`score_tiles` up to 8 heads per
// kv head, then a softmax over 16 keys a vector, `softmax_rows`; `scores_lanes` above, or
// `scores_amx`, then a softmax over 16 heads a vector), weighted values (`value_tiles`, or
// `values_amx`). The factors' table exp(rate_d j) comes with the arguments (made once per shape).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx512_math.h"
#include "scratch.h"

#define BLOCK 48         // keys per softmax block, at least (up to BLOCK + 15: columns come 16 at a time)
#define AMX_BLOCK 112    // the same on the AMX path, where a block's weighted values cost 16 tile stores
#define MAX_BLOCK 128    // AMX_BLOCK + 16: two tiles of weight codes (64 keys each)
#define LAZY 8.0f        // a head's running max is raised only when a block beats it by this much
#define TILE 16          // (key, head) dot products reduced together: one vector of sums
#define LANES_FROM 8     // more query heads per kv head than this: scores with the heads in lanes
#define LANE_KEYS 4      // keys per step of the heads-in-lanes scores
#define MIN_SPLIT 1024   // columns per range at least, when ranges are split for threads
#define MAX_HEADS 256
#define MAX_DIM 1024
#define AHEAD 64         // columns the keys and values are prefetched ahead

typedef struct {
  int64_t rows, kv_heads, groups, dim, padded_dim, rotary_dim, columns, read;
  const void *q;              // (rows, kv_heads * groups, dim) at the strides below, bf16 or float32
  int64_t q_row_stride, q_head_stride;
  int64_t bf16_io;            // q and out in bfloat16 (else float32)
  float scale;                // the logit scale
  const int8_t *k, *v;        // one layer: (slots, kv_heads, columns, dim)
  const void *k_scale, *v_scale;  // (slots, kv_heads, columns): bfloat16 or float32
  int64_t bf16_scales;
  int64_t amx;                // scores by AMX tiles in bfloat16 (bf16 models, G <= 16, dim % 32 == 0)
  const int64_t *slots;       // (rows,)
  const int64_t *positions;   // (slots, columns)
  const uint8_t *valid;       // (slots, columns)
  const int64_t *q_pos;       // (rows,)
  const float *centers;       // (rows,) xPos centers
  const double *rates;        // (rotary_dim rounded up to 16,) ln(1 / zeta_d) / base (0 past rotary_dim),
                              // or NULL without xPos
  const float *powers;        // (powers_rows, rotary_dim rounded up to 16): exp(rate_d j) for j < powers_rows
  int64_t powers_rows;        // at least MAX_BLOCK (kv_attention.xpos_powers)
  const float *slopes;        // (kv_heads * groups,) ALiBi slopes, or NULL
  int64_t window, sinks;      // window <= 0: none
  void *out;                  // (rows, kv_heads, groups, dim), contiguous, bf16 or float32
} Args;

// Lane i = the sum of the 16 lanes of v[i].
static inline __m512 transpose_sum(const __m512 *v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  // b[i], 128-bit lane L: the sums over lane L of v[4i .. 4i + 3].
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x88), _mm512_shuffle_f32x4(c, d, 0xDD));
}

// The first `count` of 16 lanes (none for count <= 0).
static inline __mmask16 lanes(int64_t count) {
  return count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? (__mmask16)0 : (__mmask16)((1u << count) - 1);
}

// Channels [c, c + 16) of query head `head` of row b as floats, 0 past the head size.
static inline __m512 load_query(const Args *a, int64_t b, int64_t head, int64_t c) {
  const int64_t at = b * a->q_row_stride + head * a->q_head_stride + c;
  const __mmask16 mask = lanes(a->dim - c);
  if (!a->bf16_io) return _mm512_maskz_loadu_ps(mask, (const float *)a->q + at);
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)a->q + at));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

// float32 lanes rounded to bfloat16 (to nearest even, as torch's .to(bfloat16)), in the low 16
// bits of each 32-bit lane; NaN stays NaN.
static inline __m512i bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))),
                                            16);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7FC0));
}

static inline __m512 load_int8(const int8_t *p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

static inline float read_scale(const void *base, int bf16, int64_t index) {  // float32 or bfloat16
  if (!bf16) return ((const float *)base)[index];
  return _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128((int)((const uint16_t *)base)[index] << 16)));
}

// What one range of columns of one (row, kv head) gathers, block by block.
typedef struct {
  const Args *a;
  int64_t b, h, slot, query;
  // The queries in three layouts, each as given (plain) and times the factors of the block's first
  // position (scaled), and this block's: chunk-major (padded_dim / 16, groups, 16), so that a tile's
  // FMAs address them at constant offsets; heads in lanes (padded_dim, groups rounded up to 16);
  // AMX B tiles (padded_dim / 32, 16 channel pairs, 16 heads) of bf16 pairs.
  const float *q, *plain, *qt, *plain_t;
  float *scaled, *scaled_t;
  const uint32_t *qb, *plain_b;
  uint32_t *scaled_b;
  const float *powers;     // (MAX_BLOCK, rotary_padded): exp(rate_d j)
  uint16_t *kb;            // AMX: the block's keys in bf16 (MAX_BLOCK, dim)
  int8_t *vb;              // AMX: the block's values as B tiles (`value_tiles_amx`), 1 KiB each
  uint32_t *wa;            // AMX: the block's weights as an A tile (16 heads, 64 keys' u8 codes)
  int32_t *ct;             // AMX: product tiles (16 heads, 16 channels) stored, 2 x 2
  const int8_t *keys, *values;
  int64_t scale_base;      // index of column 0 in the scale tensors
  float center;
  int64_t rotary_padded;
  int64_t end;             // the range's last column + 1
} Range;

// The factors of position p into `out` (rotary_padded floats; 1 past the rotary channels): the
// exponent in float64, its exp in float32.
static void exact_factors(const Range *r, int64_t p, float *out) {
  const __m512d distance = _mm512_set1_pd((double)p - (double)r->center);
  for (int64_t d = 0; d < r->rotary_padded; d += 16) {
    const __m256 low = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_loadu_pd(r->a->rates + d), distance));
    const __m256 high = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_loadu_pd(r->a->rates + d + 8), distance));
    _mm512_store_ps(out + d, exp512(_mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1)));
  }
}

static const int8_t zeros[MAX_DIM + 64];  // a key that is all 0: pads a tile

// Dot products of GT <= 8 heads with JT keys at a time, a head to a row: scores[g * MAX_BLOCK + j]
// (the softmax then takes 16 keys a vector, `softmax_rows`). Each store writes 16 lanes, JT of them
// this tile's, the rest overwritten by the next tile's (or past the block's keys).
// Chunks of 16 channels: the rotary ones (times the factors), the others, and a partial last one.
#define SCORE_TILE(NAME, GT, JT)                                                                             \
  static void NAME(const Range *r, int64_t g0, const int64_t *cols, const float *factors, int64_t n,         \
                   float *scores) {                                                                          \
    const int64_t D = r->a->dim, G = r->a->groups, Rp = r->rotary_padded, full = D / 16 * 16;                \
    const __mmask16 tail = lanes(D - full);                                                                  \
    for (int64_t j0 = 0; j0 < n; j0 += JT) {                                                                 \
      const int8_t *key[JT];                                                                                 \
      const float *factor[JT];                                                                               \
      for (int jj = 0; jj < JT; ++jj) {                                                                      \
        key[jj] = j0 + jj < n ? r->keys + cols[j0 + jj] * D : zeros;                                         \
        factor[jj] = factors + (j0 + jj < n ? j0 + jj : 0) * Rp;                                             \
      }                                                                                                      \
      __m512 acc[TILE];                                                                                      \
      for (int i = 0; i < TILE; ++i) acc[i] = _mm512_setzero_ps();                                          \
      const float *q = r->q + g0 * 16;                                                                       \
      int64_t c = 0;                                                                                         \
      for (; c < Rp && c < full; c += 16, q += G * 16)                                                       \
        for (int jj = 0; jj < JT; ++jj) {                                                                    \
          const __m512 kc = _mm512_mul_ps(load_int8(key[jj] + c, 0xFFFF), _mm512_load_ps(factor[jj] + c));   \
          for (int g = 0; g < GT; ++g)                                                                       \
            acc[jj * GT + g] = _mm512_fmadd_ps(_mm512_load_ps(q + g * 16), kc, acc[jj * GT + g]);            \
        }                                                                                                    \
      for (; c < full; c += 16, q += G * 16)                                                                 \
        for (int jj = 0; jj < JT; ++jj) {                                                                    \
          const __m512 kc = load_int8(key[jj] + c, 0xFFFF);                                                  \
          for (int g = 0; g < GT; ++g)                                                                       \
            acc[jj * GT + g] = _mm512_fmadd_ps(_mm512_load_ps(q + g * 16), kc, acc[jj * GT + g]);            \
        }                                                                                                    \
      if (tail)                                                                                              \
        for (int jj = 0; jj < JT; ++jj) {                                                                    \
          __m512 kc = load_int8(key[jj] + c, tail);                                                          \
          if (c < Rp) kc = _mm512_mul_ps(kc, _mm512_load_ps(factor[jj] + c));                                \
          for (int g = 0; g < GT; ++g)                                                                       \
            acc[jj * GT + g] = _mm512_fmadd_ps(_mm512_load_ps(q + g * 16), kc, acc[jj * GT + g]);            \
        }                                                                                                    \
      const __m512 sums = transpose_sum(acc); /* lane jj GT + g: key j0 + jj, head g */                     \
      const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);           \
      for (int g = 0; g < GT; ++g) {                                                                         \
        const __m512i from = _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(GT)), _mm512_set1_epi32(g)); \
        _mm512_storeu_ps(scores + (g0 + g) * MAX_BLOCK + j0, _mm512_permutexvar_ps(from, sums));              \
      }                                                                                                      \
    }                                                                                                        \
  }

// acc[g0 + g] += sum_j weight(j, g0 + g) * values_j, for GT heads: weights[j * stride + g] with
// the heads in lanes (G > 8), weights[g * MAX_BLOCK + j] a head to a row (G <= 8, `softmax_rows`).
#define VALUE_TILE(GT)                                                                                       \
  static void values_##GT(const Range *r, int64_t g0, const int64_t *cols, const float *weights, int64_t n,  \
                          float *acc) {                                                                      \
    const int64_t D = r->a->dim, Dp = r->a->padded_dim, rows = r->a->groups <= LANES_FROM;                   \
    const int64_t stride = rows ? 1 : (r->a->groups + 15) / 16 * 16, head = rows ? MAX_BLOCK : 1;            \
    const int8_t *values = r->values;                                                                        \
    for (int64_t c = 0; c < Dp; c += 16) {                                                                   \
      const __mmask16 mask = lanes(D - c);                                                                   \
      float *out = acc + g0 * Dp + c;                                                                        \
      const float *w = weights + g0 * head;                                                                  \
      __m512 sum[GT];                                                                                        \
      for (int g = 0; g < GT; ++g) sum[g] = _mm512_load_ps(out + g * Dp);                                    \
      for (int64_t j = 0; j < n; ++j) {                                                                      \
        const __m512 vc = load_int8(values + cols[j] * D + c, mask);                                         \
        for (int g = 0; g < GT; ++g) sum[g] = _mm512_fmadd_ps(_mm512_set1_ps(w[j * stride + g * head]), vc, sum[g]); \
      }                                                                                                      \
      for (int g = 0; g < GT; ++g) _mm512_store_ps(out + g * Dp, sum[g]);                                    \
    }                                                                                                        \
  }

#if defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512BF16__)
#include "amx.h"

int andromeda_amx_ready(void) { return amx_request(); }

// Tiles: for the scores 0 (16 keys x 16 heads, float32), 1 and 6 (keys, 16 x 32 channels, bf16),
// 2 to 5 (queries, 16 channel pairs x 16 heads, bf16 pairs: all four held through a block's
// groups where D <= 128); for the values 3 and 0 (weights' high and low codes, 16 heads x 64
// keys, u8), 1 and 2 (values, 16 groups of 4 keys x 16 channels, int8), 4 to 7 (products, 16
// heads x 16 channels, int32).
static void configure_tiles(void) { amx_configure(8); }

// B tiles of the queries (transposed, `qt`: (padded_dim, 16) floats) for channels [from, to).
static void query_tiles(const float *qt, int64_t from, int64_t to, const float *factors, uint32_t *out) {
  for (int64_t d = from; d < to; d += 2) {
    const __m512 even = _mm512_mul_ps(_mm512_load_ps(qt + d * 16), _mm512_set1_ps(factors ? factors[d] : 1.0f));
    const __m512 odd = _mm512_mul_ps(_mm512_load_ps(qt + d * 16 + 16), _mm512_set1_ps(factors ? factors[d + 1] : 1.0f));
    _mm512_store_si512(out + (d / 32 * 16 + d % 32 / 2) * 16,
                       _mm512_or_si512(bf16_bits(even), _mm512_slli_epi32(bf16_bits(odd), 16)));
  }
}

// One group's 16 keys (bf16 rows of D <= 128 channels at `keys`) against the query tiles 2 to 5,
// into tile 0; the key tiles alternate between 1 and 6, so that a load need not wait for the
// product before it.
static void group_scores(const uint16_t *keys, int64_t D) {
  _tile_zero(0);
  _tile_loadd(1, keys, D * 2);
  if (D > 32) _tile_loadd(6, keys + 32, D * 2);
  _tile_dpbf16ps(0, 1, 2);
  if (D > 64) _tile_loadd(1, keys + 64, D * 2);
  if (D > 32) _tile_dpbf16ps(0, 6, 3);
  if (D > 96) _tile_loadd(6, keys + 96, D * 2);
  if (D > 64) _tile_dpbf16ps(0, 1, 4);
  if (D > 96) _tile_dpbf16ps(0, 6, 5);
}

// Scores of n keys (all G <= 16 heads) by AMX: the keys in bf16 (times their factors), rows of
// the A tiles; the queries the B tiles; into scores[j * 16 + g].
static void scores_amx(const Range *r, const int64_t *cols, const float *factors, int64_t n, float *scores) {
  const int64_t D = r->a->dim, Rp = r->rotary_padded, groups = (n + 15) / 16;
  // Group by group: a group's keys converted, then its products issued, so that converting the
  // next group overlaps them (a tile load waits for the stores before it to drain).
  for (int64_t group = 0; group < groups; ++group) {
    for (int64_t j = group * 16; j < group * 16 + 16; ++j) {
      uint16_t *row = r->kb + j * D;
      if (j >= n) {
        memset(row, 0, sizeof(uint16_t) * D);
        continue;
      }
      const int8_t *key = r->keys + cols[j] * D;
      const float *factor = factors + j * Rp;
      for (int64_t c = 0; c < D; c += 32) {
        __m512 low = load_int8(key + c, 0xFFFF), high = load_int8(key + c + 16, 0xFFFF);
        if (c < Rp) low = _mm512_mul_ps(low, _mm512_load_ps(factor + c));
        if (c + 16 < Rp) high = _mm512_mul_ps(high, _mm512_load_ps(factor + c + 16));
        _mm512_storeu_si512(row + c, (__m512i)_mm512_cvtne2ps_pbh(high, low));
      }
    }
    if (D <= 128) {  // the query tiles loaded once a block (the values' tiles take them over after)
      if (group == 0) {
        _tile_loadd(2, r->qb, 64);
        if (D > 32) _tile_loadd(3, r->qb + 256, 64);
        if (D > 64) _tile_loadd(4, r->qb + 512, 64);
        if (D > 96) _tile_loadd(5, r->qb + 768, 64);
      }
      group_scores(r->kb + group * 16 * D, D);
    } else {
      _tile_zero(0);
      for (int64_t c = 0; c < D; c += 32) {
        _tile_loadd(1, r->kb + group * 16 * D + c, D * 2);
        _tile_loadd(2, r->qb + c / 32 * 256, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
    }
    _tile_stored(0, scores + group * 256, 64);
  }
}

// The weighted values by AMX-INT8 (TDPBUSD: u8 weights times int8 values, summed in int32), where
// FMAs would convert every value to float and multiply it once per query head: 12 heads' FMAs were
// the kernel's largest cost. Each head's weights of a block are coded against the block's heaviest
// in 16 bits, c = round(65535 w / w_max) = 256 hi + lo, its high and low bytes in two A tiles
// against the same B tiles; the int32 sums come back as (256 sum_hi + sum_lo) w_max / 65535. One
// byte alone erred by up to 1/510 of the heaviest weight on every key: more than SDPA's bf16
// weights on the dequantized cache (tests hold the codes to the float32 path's result). Blocks of
// up to 128 keys (two tiles of codes into the same sums): 16 tile stores a block, the dearest part.
//
// B tiles of the block's values, written before its scores so that the stores have drained when
// the tiles load: per 64 keys (part), pass of 64 channels (a last one of 32 where D % 64 == 32)
// and i in 0..3, tile (part * passes + pass) * 4 + i holds in row k the 4 keys 64 part + 4k ..
// 64 part + 4k + 3 (zeros past n) of channels 16 L + 4 i + b, L = 0..3 (the 128-bit lanes of the
// byte interleaves), b = 0..3; a channel's 4 keys side by side. Rows past the block's keys keep
// earlier bytes: their weights are 0. The loads of each 4 keys prefetch, into L1, the keys and
// values AHEAD columns on.
static void value_tiles_amx(const Range *r, const int64_t *cols, int64_t n) {
  const int64_t D = r->a->dim, passes = (D + 63) / 64;
  for (int64_t k = 0; k < (n + 3) / 4; ++k) {
    const int8_t *row[4];
    for (int t = 0; t < 4; ++t) row[t] = 4 * k + t < n ? r->values + cols[4 * k + t] * D : zeros;
    if (4 * k + 3 < n && cols[4 * k] + AHEAD + 4 <= r->end)  // (interleaved with the work: 1.04x)
      for (int64_t i = cols[4 * k] + AHEAD; i < cols[4 * k] + AHEAD + 4; ++i)
        for (int64_t d = 0; d < D; d += 64) {
          _mm_prefetch((const char *)(r->keys + i * D + d), _MM_HINT_T0);
          _mm_prefetch((const char *)(r->values + i * D + d), _MM_HINT_T0);
        }
    for (int64_t c = 0; c < D; c += 64) {
      const __mmask64 mask = D - c >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (D - c)) - 1;
      __m512i x[4];
      for (int t = 0; t < 4; ++t) x[t] = _mm512_maskz_loadu_epi8(mask, row[t] + c);
      const __m512i low01 = _mm512_unpacklo_epi8(x[0], x[1]), high01 = _mm512_unpackhi_epi8(x[0], x[1]);
      const __m512i low23 = _mm512_unpacklo_epi8(x[2], x[3]), high23 = _mm512_unpackhi_epi8(x[2], x[3]);
      int8_t *tile = r->vb + ((k / 16 * passes + c / 64) * 4) * 1024 + k % 16 * 64;
      _mm512_store_si512(tile, _mm512_unpacklo_epi16(low01, low23));
      _mm512_store_si512(tile + 1024, _mm512_unpackhi_epi16(low01, low23));
      _mm512_store_si512(tile + 2048, _mm512_unpacklo_epi16(high01, high23));
      _mm512_store_si512(tile + 3072, _mm512_unpackhi_epi16(high01, high23));
    }
  }
}

// The codes of n <= 64 keys' weights (`weights[j * 16 + g]`), times `to_code`, as two A tiles: row
// g of `tiles` head g's high bytes, 256 words on their low bytes.
static void code_tiles(const float *weights, int64_t n, __m512 to_code, uint32_t *tiles) {
  __m512 high[16], low[16];  // row k, lane g: head g's codes of keys 4k .. 4k + 3, one per byte
  for (int64_t k = 0; k < 16; ++k) {
    __m512i h = _mm512_setzero_si512(), l = _mm512_setzero_si512();
    for (int t = 0; t < 4 && 4 * k + t < n; ++t) {
      const __m512i code = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(weights + (4 * k + t) * 16), to_code));
      h = _mm512_or_si512(h, _mm512_slli_epi32(_mm512_srli_epi32(code, 8), 8 * t));
      l = _mm512_or_si512(l, _mm512_slli_epi32(_mm512_and_si512(code, _mm512_set1_epi32(255)), 8 * t));
    }
    high[k] = _mm512_castsi512_ps(h);
    low[k] = _mm512_castsi512_ps(l);
  }
  transpose16(high);
  transpose16(low);
  for (int g = 0; g < 16; ++g) {
    _mm512_store_ps((float *)tiles + g * 16, high[g]);
    _mm512_store_ps((float *)tiles + 256 + g * 16, low[g]);
  }
}

// The A tiles of the block's weights (`weights[j * 16 + g]`, 16 heads in lanes), per 64 keys
// (part): row g of tile 2 part holds head g's high codes of keys 64 part .. 64 part + 63 (0 past
// n), tile 2 part + 1 their low codes, 256 words each from r->wa; unit[g] is what a high code of 1
// weighs. `top` holds each head's heaviest weight; a head whose weights are all 0 (or under
// 1e-30) gets codes 0.
static void weight_tiles_amx(const Range *r, const float *weights, int64_t n, __m512 top, float *unit) {
  // A head whose heaviest weight is under 1e-30 of the running max (65535 / top would overflow
  // past 1.9e-34) adds nothing a float could hold: codes 0.
  const __mmask16 some = _mm512_cmp_ps_mask(top, _mm512_set1_ps(1e-30f), _CMP_GT_OQ);
  const __m512 to_code = _mm512_maskz_div_ps(some, _mm512_set1_ps(65535.0f), top);
  _mm512_storeu_ps(unit, _mm512_mul_ps(top, _mm512_set1_ps(256.0f / 65535.0f)));
  for (int64_t part = 0; part * 64 < n; ++part)
    code_tiles(weights + part * 64 * 16, n - part * 64, to_code, r->wa + part * 512);
}
// acc[g] += the A tiles' codes times the B tiles' values, in `value_tiles_amx`'s channel order
// (`natural_order` undoes it once a range is done): pass p's tile i's lane n at
// acc[g * Dp + 64 p + i * width / 4 + n]. A channel tile at a time, its high and low codes' sums
// in two product tiles, over both parts of the block; stored, then added while the next channel
// tile's products run.
static void flush_sums(const Range *r, const int32_t *sums, const float *unit, float *out, int64_t lanes_used) {
  const int64_t Dp = r->a->padded_dim;
  const __mmask16 mask = lanes(lanes_used);
  for (int64_t g = 0; g < r->a->groups; ++g) {
    const __m512i both = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sums + g * 16), 8),
                                          _mm512_load_si512(sums + 256 + g * 16));  // high codes' sums, low codes'
    _mm512_mask_storeu_ps(out + g * Dp, mask, _mm512_fmadd_ps(_mm512_cvtepi32_ps(both), _mm512_set1_ps(unit[g] * (1.0f / 256.0f)),
                                                              _mm512_maskz_loadu_ps(mask, out + g * Dp)));
  }
}
static void values_amx(const Range *r, int64_t n, const float *unit, float *acc) {
  const int64_t D = r->a->dim, passes = (D + 63) / 64, tiles = passes * 4;
  _tile_loadd(3, r->wa, 64);
  _tile_loadd(0, r->wa + 256, 64);
  if (n > 64) {
    _tile_loadd(6, r->wa + 512, 64);
    _tile_loadd(7, r->wa + 768, 64);
  }
  float *previous = NULL;
  int64_t previous_lanes = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t c = t / 4 * 64, quarter = (D - c < 64 ? D - c : 64) / 4;
    int32_t *sums = r->ct + t % 2 * 512;
    _tile_zero(4);
    _tile_zero(5);
    _tile_loadd(1, r->vb + t * 1024, 64);
    _tile_dpbusd(4, 3, 1);
    _tile_dpbusd(5, 0, 1);
    if (n > 64) {
      _tile_loadd(2, r->vb + (tiles + t) * 1024, 64);
      _tile_dpbusd(4, 6, 2);
      _tile_dpbusd(5, 7, 2);
    }
    if (previous) flush_sums(r, r->ct + (t + 1) % 2 * 512, unit, previous, previous_lanes);
    _tile_stored(4, sums, 64);
    _tile_stored(5, sums + 256, 64);
    previous = acc + c + t % 4 * quarter, previous_lanes = quarter;
  }
  flush_sums(r, r->ct + (tiles + 1) % 2 * 512, unit, previous, previous_lanes);
}

// acc (G, Dp) from `values_amx`'s channel order back to the channels'.
static void natural_order(const Args *a, float *acc) {
  const int64_t D = a->dim, Dp = a->padded_dim;
  for (int64_t g = 0; g < a->groups; ++g) {
    float *row = acc + g * Dp;
    int64_t c = 0;
    for (; c + 64 <= D; c += 64) {  // a 4 x 4 transpose of 128-bit blocks
      const __m512 v0 = _mm512_load_ps(row + c), v1 = _mm512_load_ps(row + c + 16);
      const __m512 v2 = _mm512_load_ps(row + c + 32), v3 = _mm512_load_ps(row + c + 48);
      const __m512 t0 = _mm512_shuffle_f32x4(v0, v1, 0x44), t1 = _mm512_shuffle_f32x4(v0, v1, 0xEE);
      const __m512 t2 = _mm512_shuffle_f32x4(v2, v3, 0x44), t3 = _mm512_shuffle_f32x4(v2, v3, 0xEE);
      _mm512_store_ps(row + c, _mm512_shuffle_f32x4(t0, t2, 0x88));
      _mm512_store_ps(row + c + 16, _mm512_shuffle_f32x4(t0, t2, 0xDD));
      _mm512_store_ps(row + c + 32, _mm512_shuffle_f32x4(t1, t3, 0x88));
      _mm512_store_ps(row + c + 48, _mm512_shuffle_f32x4(t1, t3, 0xDD));
    }
    if (c < D) {  // a last pass of 32 channels: tile i's lanes 4 L + b at c + 8 i + 4 L + b
      float part[32];
      for (int i = 0; i < 4; ++i)
        for (int n = 0; n < 8; ++n) part[16 * (n / 4) + 4 * i + n % 4] = row[c + 8 * i + n];
      memcpy(row + c, part, sizeof part);
    }
  }
}
#else  // built without the AMX flags: never asked for (andromeda_amx_ready is 0)
int andromeda_amx_ready(void) { return 0; }
#define configure_tiles() ((void)0)
#define query_tiles(...) ((void)0)
#define scores_amx(...) ((void)0)
#define value_tiles_amx(...) ((void)0)
#define weight_tiles_amx(...) ((void)0)
#define values_amx(r, n, unit, acc) ((void)(unit))
#define natural_order(...) ((void)0)
#define _tile_release() ((void)0)
#endif

#define TILES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16)
// Scores for G <= LANES_FROM heads, TILE / G keys at a time (more heads: `scores_lanes`).
#define SCORE_TILES(GT) SCORE_TILE(scores_##GT, GT, TILE / GT)
SCORE_TILES(1) SCORE_TILES(2) SCORE_TILES(3) SCORE_TILES(4) SCORE_TILES(5) SCORE_TILES(6) SCORE_TILES(7) SCORE_TILES(8)
TILES(VALUE_TILE)

typedef void (*Tile)(const Range *, int64_t, const int64_t *, const float *, int64_t, float *);
static const Tile score_tiles[LANES_FROM + 1] = {NULL,      scores_1, scores_2, scores_3, scores_4,
                                                  scores_5, scores_6, scores_7, scores_8};

// Scores with the heads in lanes, for G > LANES_FROM: per channel d, the queries of 16 heads times
// each key's channel d (broadcast), so no sums across lanes are needed (a tile's transpose_sum
// costs about as much as its products, on the one port that shuffles). Keys are converted to
// float once, into `keys` (LANE_KEYS, padded_dim); LANE_KEYS keys share each query load.
static void scores_lanes(const Range *r, const int64_t *cols, const float *factors, int64_t n, float *scores) {
  const int64_t D = r->a->dim, Dp = r->a->padded_dim, G = r->a->groups, Rp = r->rotary_padded;
  const int64_t stride = (G + 15) / 16 * 16;
  float keys[LANE_KEYS][MAX_DIM] __attribute__((aligned(64)));
  for (int64_t j0 = 0; j0 < n; j0 += LANE_KEYS) {
    for (int jj = 0; jj < LANE_KEYS; ++jj) {
      const int8_t *key = j0 + jj < n ? r->keys + cols[j0 + jj] * D : zeros;
      const float *factor = factors + (j0 + jj < n ? j0 + jj : 0) * Rp;
      for (int64_t c = 0; c < Dp; c += 16) {
        const __m512 kc = load_int8(key + c, lanes(D - c));
        _mm512_store_ps(keys[jj] + c, c < Rp ? _mm512_mul_ps(kc, _mm512_load_ps(factor + c)) : kc);
      }
    }
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
      __m512 even[LANE_KEYS], odd[LANE_KEYS];  // two chains per key: FMAs in flight
      for (int jj = 0; jj < LANE_KEYS; ++jj) even[jj] = odd[jj] = _mm512_setzero_ps();
      const float *q = r->qt + g0;
      for (int64_t d = 0; d < Dp; d += 2, q += 2 * stride) {
        const __m512 q0 = _mm512_load_ps(q), q1 = _mm512_load_ps(q + stride);
        for (int jj = 0; jj < LANE_KEYS; ++jj) {
          even[jj] = _mm512_fmadd_ps(q0, _mm512_set1_ps(keys[jj][d]), even[jj]);
          odd[jj] = _mm512_fmadd_ps(q1, _mm512_set1_ps(keys[jj][d + 1]), odd[jj]);
        }
      }
      for (int jj = 0; jj < LANE_KEYS && j0 + jj < n; ++jj)
        _mm512_store_ps(scores + (j0 + jj) * stride + g0, _mm512_add_ps(even[jj], odd[jj]));
    }
  }
}
static const Tile value_tiles[TILE + 1] = {NULL,      values_1,  values_2,  values_3,  values_4,  values_5,
                                            values_6,  values_7,  values_8,  values_9,  values_10, values_11,
                                            values_12, values_13, values_14, values_15, values_16};

// xPos: this block's queries, and its keys' factors (returned): for consecutive positions the
// queries times f(p0) and the shared table exp(rate j), else the queries as given and each key's
// exact factors.
static const float *block_queries(Range *r, const int64_t *cols, int64_t n, int consecutive, float *factors) {
  const Args *a = r->a;
  const int64_t G = a->groups, Rp = r->rotary_padded, stride = (G + 15) / 16 * 16, row = r->slot * a->columns;
  if (!consecutive) {
    for (int64_t j = 0; j < n; ++j) exact_factors(r, a->positions[row + cols[j]], factors + j * Rp);
    r->q = r->plain, r->qt = r->plain_t, r->qb = r->plain_b;
    return factors;
  }
  exact_factors(r, a->positions[row + cols[0]], factors);
  if (a->amx)
    query_tiles(r->plain_t, 0, Rp, factors, r->scaled_b);
  else if (G > LANES_FROM)
    for (int64_t d = 0; d < Rp; ++d)
      for (int64_t g = 0; g < stride; g += 16)
        _mm512_store_ps(r->scaled_t + d * stride + g,
                        _mm512_mul_ps(_mm512_load_ps(r->plain_t + d * stride + g), _mm512_set1_ps(factors[d])));
  else
    for (int64_t c = 0; c < Rp; c += 16)
      for (int64_t g = 0; g < G; ++g)
        _mm512_store_ps(r->scaled + c * G + g * 16,
                        _mm512_mul_ps(_mm512_load_ps(r->plain + c * G + g * 16), _mm512_load_ps(factors + c)));
  r->q = r->scaled, r->qt = r->scaled_t, r->qb = r->scaled_b;
  return r->powers;
}

// 16 scales from `base` (bfloat16 or float32) as floats.
static inline __m512 load_scales(const void *base, int64_t bf16, int64_t index, __mmask16 mask) {
  if (!bf16) return _mm512_maskz_loadu_ps(mask, (const float *)base + index);
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)base + index);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// The block's columns' key scales (times the logit scale), value scales and distances from the
// query; whether their positions are consecutive. 16 columns a vector where the columns are (a
// readable run: the common case), else one by one.
static int block_columns(const Range *r, const int64_t *cols, int64_t n, float *key_scale, float *value_scale,
                         float *distance) {
  const Args *a = r->a;
  const int64_t row = r->slot * a->columns, first = a->positions[row + cols[0]];
  int consecutive = 1;
  if (cols[n - 1] - cols[0] != n - 1) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t position = a->positions[row + cols[j]];
      consecutive &= position == first + j;
      key_scale[j] = read_scale(a->k_scale, (int)a->bf16_scales, r->scale_base + cols[j]) * a->scale;
      value_scale[j] = read_scale(a->v_scale, (int)a->bf16_scales, r->scale_base + cols[j]);
      distance[j] = (float)(r->query - position);
    }
    return consecutive;
  }
  const __m512i steps = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = lanes(n - j);
    const int64_t at = r->scale_base + cols[0] + j;
    _mm512_store_ps(key_scale + j, _mm512_mul_ps(load_scales(a->k_scale, a->bf16_scales, at, mask), _mm512_set1_ps(a->scale)));
    _mm512_store_ps(value_scale + j, load_scales(a->v_scale, a->bf16_scales, at, mask));
    for (int half = 0; half < 2; ++half) {
      const int64_t from = j + 8 * half;
      const __mmask8 part = (__mmask8)(mask >> (8 * half));
      const __m512i position = _mm512_maskz_loadu_epi64(part, a->positions + row + cols[0] + from);
      const __m512i expected = _mm512_add_epi64(steps, _mm512_set1_epi64(first + from));
      consecutive &= _mm512_mask_cmpneq_epi64_mask(part, position, expected) == 0;
      _mm256_store_ps(distance + from, _mm512_cvtepi64_ps(_mm512_sub_epi64(_mm512_set1_epi64(r->query), position)));
    }
  }
  return consecutive;
}

// acc's row of head g times alpha (a raised running max), unless alpha is 1.
static inline void rescale_head(float *acc, int64_t g, int64_t Dp, float alpha) {
  if (alpha != 1.0f)
    for (int64_t d = 0; d < Dp; d += 16)
      _mm512_store_ps(acc + g * Dp + d, _mm512_mul_ps(_mm512_load_ps(acc + g * Dp + d), _mm512_set1_ps(alpha)));
}

// The running softmax of a block whose scores lie a head to a row (`scores[g * MAX_BLOCK + j]`,
// G <= 8, as `score_tiles` writes them): 16 keys a vector, where heads in lanes would fill at most
// half of each (3 heads of 16 on the demo model: 1.2x its attention). The same arithmetic as
// `attend_block`'s loop, head by head; leaves the weights p vscale_j in place.
static void softmax_rows(const Range *r, int64_t n, const float *key_scale, const float *value_scale,
                         const float *distance, float *m, float *l, float *acc, float *scores) {
  const Args *a = r->a;
  const int64_t G = a->groups, Dp = a->padded_dim;
  for (int64_t g = 0; g < G; ++g) {
    float *s = scores + g * MAX_BLOCK;
    const __m512 slope = _mm512_set1_ps(a->slopes ? a->slopes[r->h * G + g] : 0.0f);
    __m512 highest = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 x = _mm512_fnmadd_ps(slope, _mm512_load_ps(distance + j),
                                        _mm512_mul_ps(_mm512_loadu_ps(s + j), _mm512_load_ps(key_scale + j)));
      _mm512_storeu_ps(s + j, x);
      highest = _mm512_mask_max_ps(highest, lanes(n - j), highest, x);
    }
    // Raised only where the block beats the running max by LAZY (FlashAttention-4's lazy
    // rescaling): elsewhere the weights below are relative to the old max, at most e^LAZY.
    const float before = m[g], block = _mm512_reduce_max_ps(highest);  // -inf before the first block
    const float top = block > before + LAZY ? block : before;
    const float alpha = _mm512_cvtss_f32(exp512(_mm512_set1_ps(before - top)));  // 0 for the first block
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 p = _mm512_maskz_mov_ps(lanes(n - j), exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(top))));
      total = _mm512_add_ps(total, p);
      _mm512_storeu_ps(s + j, _mm512_mul_ps(p, _mm512_load_ps(value_scale + j)));
    }
    l[g] = l[g] * alpha + _mm512_reduce_add_ps(total);
    m[g] = top;
    rescale_head(acc, g, Dp, alpha);
  }
}

// One block of n readable columns: scores, the running softmax of each head, weighted values.
// State per head g: running max m[g], sum l[g], and acc[g * padded_dim ...]. Past 8 heads per kv
// head (or on the AMX path) the softmax runs on 16 heads a vector, key after key; lanes past G
// hold whatever, and are never read back.
static void attend_block(Range *r, const int64_t *cols, int64_t n, float *m, float *l, float *acc, float *buf,
                         float *factors) {
  const Args *a = r->a;
  const int64_t G = a->groups, Dp = a->padded_dim, stride = (G + 15) / 16 * 16;
  float key_scale[MAX_BLOCK] __attribute__((aligned(64))), value_scale[MAX_BLOCK] __attribute__((aligned(64))),
      distance[MAX_BLOCK] __attribute__((aligned(64)));
  const int consecutive = block_columns(r, cols, n, key_scale, value_scale, distance);
  if (a->amx) value_tiles_amx(r, cols, n);
  const float *key_factors = a->rates ? block_queries(r, cols, n, consecutive, factors) : factors;
  if (a->amx)
    scores_amx(r, cols, key_factors, n, buf);
  else if (G > LANES_FROM)
    scores_lanes(r, cols, key_factors, n, buf);
  else
    score_tiles[G](r, 0, cols, key_factors, n, buf);
  if (!a->amx && G <= LANES_FROM) {  // scores a head to a row
    softmax_rows(r, n, key_scale, value_scale, distance, m, l, acc, buf);
    for (int64_t g0 = 0; g0 < G; g0 += TILE) value_tiles[G - g0 < TILE ? G - g0 : TILE](r, g0, cols, buf, n, acc);
    return;
  }
  __m512 heaviest = _mm512_setzero_ps();  // each head's heaviest weight p vscale (read by AMX, G <= 16)
  for (int64_t g0 = 0; g0 < G; g0 += 16) {
    const __mmask16 heads = lanes(G - g0);
    const __m512 slope = a->slopes ? _mm512_maskz_loadu_ps(heads, a->slopes + r->h * G + g0) : _mm512_setzero_ps();
    const __m512 before = _mm512_maskz_loadu_ps(heads, m + g0);  // -inf before the first block
    __m512 top = before;
    for (int64_t j = 0; j < n; ++j) {
      float *s = buf + j * stride + g0;
      const __m512 x = _mm512_fnmadd_ps(slope, _mm512_set1_ps(distance[j]),
                                        _mm512_mul_ps(_mm512_load_ps(s), _mm512_set1_ps(key_scale[j])));
      _mm512_store_ps(s, x);
      top = _mm512_max_ps(top, x);
    }
    // Raised only where the block beats the running max by LAZY (FlashAttention-4's lazy
    // rescaling): elsewhere the weights below are relative to the old max, at most e^LAZY.
    top = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(top, _mm512_add_ps(before, _mm512_set1_ps(LAZY)), _CMP_GT_OQ),
                               before, top);
    const __m512 alpha = exp512(_mm512_sub_ps(before, top));  // 0 for the first block, else 1 or less
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      float *s = buf + j * stride + g0;
      const __m512 p = exp512(_mm512_sub_ps(_mm512_load_ps(s), top));
      total = _mm512_add_ps(total, p);
      const __m512 w = _mm512_mul_ps(p, _mm512_set1_ps(value_scale[j]));
      _mm512_store_ps(s, w);
      heaviest = _mm512_max_ps(heaviest, w);
    }
    _mm512_mask_storeu_ps(l + g0, heads, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(heads, l + g0), alpha, total));
    _mm512_mask_storeu_ps(m + g0, heads, top);
    float rescale[16];
    _mm512_storeu_ps(rescale, alpha);
    for (int64_t g = g0; g < G && g < g0 + 16; ++g) rescale_head(acc, g, Dp, rescale[g - g0]);
  }
  if (a->amx) {
    float unit[16];
    weight_tiles_amx(r, buf, n, heaviest, unit);
    values_amx(r, n, unit, acc);
    return;
  }
  for (int64_t g0 = 0; g0 < G; g0 += TILE) value_tiles[G - g0 < TILE ? G - g0 : TILE](r, g0, cols, buf, n, acc);
}

// Which of the 16 columns from `column` (those below `end`) the query may read: valid, at a
// position <= query, inside the sliding window if any.
static inline __mmask16 readable(const Args *a, int64_t row, int64_t query, int64_t column, int64_t end) {
  const __mmask16 in_range = lanes(end - column);
  const __mmask16 valid = _mm_mask_test_epi8_mask(in_range, _mm_maskz_loadu_epi8(in_range, a->valid + row + column),
                                                  _mm_set1_epi8(-1));
  const __m512i query_at = _mm512_set1_epi64(query);
  __mmask16 allowed = 0;
  for (int half = 0; half < 2; ++half) {
    const __mmask8 part = (__mmask8)(in_range >> (8 * half));
    const __m512i position = _mm512_maskz_loadu_epi64(part, a->positions + row + column + 8 * half);
    __mmask8 ok = _mm512_mask_cmple_epi64_mask(part, position, query_at);
    if (a->window > 0)
      ok &= _mm512_cmplt_epi64_mask(_mm512_sub_epi64(query_at, position), _mm512_set1_epi64(a->window - a->sinks)) |
            _mm512_cmplt_epi64_mask(position, _mm512_set1_epi64(a->sinks));
    allowed |= (__mmask16)((unsigned)ok << (8 * half));
  }
  return allowed & valid;
}

static inline float *aligned(float *room) { return (float *)(((uintptr_t)room + 63) & ~(uintptr_t)63); }

// Columns [c0, c1) of row b, kv head h, into part: acc (G, padded_dim), m (G), l (G).
static void attend_range(const Args *a, int64_t b, int64_t h, int64_t c0, int64_t c1,
                         float *part) {
  const int64_t G = a->groups, Dp = a->padded_dim, stride = (G + 15) / 16 * 16;
  const int64_t rotary_padded = a->rates ? (a->rotary_dim + 15) / 16 * 16 : 0;
  float *acc = part, *m = part + G * Dp, *l = m + G;
  for (int64_t g = 0; g < G; ++g) m[g] = -INFINITY, l[g] = 0.0f;
  memset(acc, 0, sizeof(float) * G * Dp);
  const int64_t slot = a->slots[b];
  const int64_t base = (slot * a->kv_heads + h) * a->columns;
  // 64-byte aligned scratch: a vector split over two cache lines loads slowly.
  float buf_room[(G + 15) / 16 * 16 * MAX_BLOCK + 16], factors_room[MAX_BLOCK * rotary_padded + 16],
      plain_room[G * Dp + 16], scaled_room[G * Dp + 16], plain_t_room[Dp * stride + 16],
      scaled_t_room[Dp * stride + 16];
  float *buf = aligned(buf_room), *factors = aligned(factors_room), *plain = aligned(plain_room),
        *scaled = aligned(scaled_room), *plain_t = aligned(plain_t_room), *scaled_t = aligned(scaled_t_room);
  memset(plain_t, 0, sizeof(float) * Dp * stride);
  for (int64_t g = 0; g < G; ++g)  // (G, D) -> (Dp / 16, G, 16), zero padded
    for (int64_t c = 0; c < Dp; c += 16) {
      const __m512 chunk = load_query(a, b, h * G + g, c);
      _mm512_store_ps(plain + c * G + g * 16, chunk);
      _mm512_store_ps(scaled + c * G + g * 16, chunk);  // its rotary chunks are rewritten per block
      float channels[16];
      _mm512_storeu_ps(channels, chunk);
      for (int64_t d = 0; d < 16; ++d) plain_t[(c + d) * stride + g] = channels[d];
    }
  memcpy(scaled_t, plain_t, sizeof(float) * Dp * stride);
  uint32_t plain_b_room[a->amx ? Dp * 8 + 16 : 1], scaled_b_room[a->amx ? Dp * 8 + 16 : 1];
  uint16_t kb_room[a->amx ? MAX_BLOCK * Dp + 32 : 1];
  int8_t vb_room[a->amx ? 2 * (Dp + 63) / 64 * 4096 + 64 : 1];  // B tiles: 4 KiB per 64 keys and channels
  uint32_t wa_room[a->amx ? 4 * 256 + 16 : 1];  // the weights' A tiles: high and low codes, 2 x 64 keys
  int32_t ct_room[a->amx ? 4 * 256 + 16 : 1];   // product tiles stored: high and low codes' sums, twice
  uint32_t *plain_b = (uint32_t *)aligned((float *)plain_b_room);
  uint32_t *scaled_b = (uint32_t *)aligned((float *)scaled_b_room);
  if (a->amx) {
    configure_tiles();
    query_tiles(plain_t, 0, Dp, NULL, plain_b);
    memcpy(scaled_b, plain_b, sizeof(uint32_t) * Dp * 8);  // its rotary rows are rewritten per block
  }
  Range r = {a, b, h, slot, a->q_pos[b], plain, plain, plain_t, plain_t, scaled, scaled_t, plain_b, plain_b, scaled_b,
             a->powers, (uint16_t *)aligned((float *)kb_room), (int8_t *)aligned((float *)vb_room),
             (uint32_t *)aligned((float *)wa_room), (int32_t *)aligned((float *)ct_room), a->k + base * a->dim,
             a->v + base * a->dim, base, a->centers[b], rotary_padded, c1};
  int64_t cols[MAX_BLOCK + 8], n = 0;
  const int64_t block = a->amx ? AMX_BLOCK : BLOCK;
  const int64_t row = slot * a->columns;
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t c = c0; c < c1; c += 16) {
    if (!a->amx && c + AHEAD + 16 <= c1)  // keys and values AHEAD columns on, into L1 (1.17x at 8k on two threads;
                                         // the AMX path's `value_tiles_amx` spreads them)
      for (int64_t i = c + AHEAD; i < c + AHEAD + 16; ++i)
        for (int64_t d = 0; d < a->dim; d += 64) {
          _mm_prefetch((const char *)(r.keys + i * a->dim + d), _MM_HINT_T0);
          _mm_prefetch((const char *)(r.values + i * a->dim + d), _MM_HINT_T0);
        }
    const __mmask16 allowed = readable(a, row, r.query, c, c1);
    for (int half = 0; half < 2; ++half) {  // the readable columns' indices, packed
      const __mmask8 part = (__mmask8)(allowed >> (8 * half));
      // compressed in a register, stored whole (a compressing store defeats store forwarding)
      const __m512i columns = _mm512_add_epi64(iota, _mm512_set1_epi64(c + 8 * half));
      _mm512_storeu_si512(cols + n, _mm512_maskz_compress_epi64(part, columns));
      n += __builtin_popcount(part);
    }
    if (n >= block) {
      attend_block(&r, cols, n, m, l, acc, buf, factors);
      n = 0;
    }
  }
  if (n) attend_block(&r, cols, n, m, l, acc, buf, factors);
  if (a->amx) {
    _tile_release();
    natural_order(a, acc);
  }
}

// A row that may read no key: the mean of all `read` columns' values (every score is the same
// lowest bias on the additive-bias path).
static void average_all(const Args *a, int64_t b, int64_t h, float *out) {
  const int64_t D = a->dim, base = (a->slots[b] * a->kv_heads + h) * a->columns;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  for (int64_t c = 0; c < a->read; ++c) {
    const float scale = read_scale(a->v_scale, (int)a->bf16_scales, base + c) / (float)a->read;
    for (int64_t d = 0; d < D; ++d) out[d] += scale * (float)a->v[(base + c) * D + d];
  }
}

// Floats of one range's state: acc (G, padded_dim), m (G), l (G), in whole 64-byte lines.
static int64_t part_size(const Args *a) { return (a->groups * (a->padded_dim + 2) + 15) / 16 * 16; }

// Ranges `splits` of (b, h) -> out[b, h]: each head's softmax over all of them.
static void combine(const Args *a, int64_t b, int64_t h, int64_t splits, const float *parts) {
  const int64_t G = a->groups, D = a->dim, Dp = a->padded_dim, size = part_size(a), m = G * Dp, l = m + G;
  const float *first = parts + (b * a->kv_heads + h) * splits * size;
  float out[D * G];  // float32, then stored in the output's dtype
  for (int64_t g = 0; g < G; ++g) {
    float highest = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) highest = fmaxf(highest, first[s * size + m + g]);
    if (highest == -INFINITY) {
      average_all(a, b, h, out + g * D);
      continue;
    }
    float total = 0.0f;
    for (int64_t s = 0; s < splits; ++s) total += first[s * size + l + g] * expf(first[s * size + m + g] - highest);
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      const float weight = expf(first[s * size + m + g] - highest) / total;
      const float *acc = first + s * size + g * Dp;
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += weight * acc[d];
    }
  }
  const int64_t at = (b * a->kv_heads + h) * G * D;
  if (!a->bf16_io) {
    memcpy((float *)a->out + at, out, sizeof(float) * G * D);
    return;
  }
  for (int64_t i = 0; i < G * D; i += 16) {
    const __mmask16 mask = lanes(G * D - i);
    _mm256_mask_storeu_epi16((uint16_t *)a->out + at + i, mask,
                             _mm512_cvtepi32_epi16(bf16_bits(_mm512_maskz_loadu_ps(mask, out + i))));
  }
}

static _Thread_local void *parts_room;  // the calling thread's partial sums, kept between calls
static _Thread_local size_t parts_room_bytes;

// Ranges per (row, kv head): enough for every thread to have two, none under MIN_SPLIT columns.
static int64_t split_count(const Args *a) {
  const int64_t threads = omp_get_max_threads(), pairs = a->rows * a->kv_heads;
  const int64_t splits = threads > 1 ? (2 * threads + pairs - 1) / pairs : 1, most = a->read / MIN_SPLIT;
  return splits < most ? splits : most > 1 ? most : 1;
}

// 0 on success; 1 for shapes outside the kernel's limits (the caller keeps its PyTorch path).
int andromeda_int8_decode_attention(const Args *a) {
  if (a->groups < 1 || a->groups > MAX_HEADS || a->dim < 1 || a->dim > MAX_DIM || a->rotary_dim > a->dim ||
      a->padded_dim != (a->dim + 15) / 16 * 16 || a->read < 1 || a->read > a->columns ||
      (a->rates && (!a->powers || a->powers_rows < MAX_BLOCK || (uintptr_t)a->powers % 64)) ||
      (a->amx && (a->groups > 16 || a->dim % 32)))
    return 1;
  const int64_t splits = split_count(a), pairs = a->rows * a->kv_heads;
  const int64_t size = part_size(a);
  float *parts = thread_buffer(&parts_room, &parts_room_bytes, sizeof(float) * (pairs * splits * size + 16));
  if (!parts) return 2;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < pairs * splits; ++item) {
    const int64_t pair = item / splits, s = item % splits;
    attend_range(a, pair / a->kv_heads, pair % a->kv_heads, a->read * s / splits, a->read * (s + 1) / splits,
                 parts + item * size);
  }
  for (int64_t pair = 0; pair < pairs; ++pair) combine(a, pair / a->kv_heads, pair % a->kv_heads, splits, parts);
  return 0;
}
