// Products of a few rows x (M, K) with a bf16 weight W (N, K), with AVX-512 BF16: y = x @ W.T (+ bias),
// for decoding, where each step reads every weight once and the product is bound by memory bandwidth.
//
// Built into the ops library by andromeda/inference/native.py (`andromeda::bf16_rows`); the tests
// hold it to F.linear. The weight is in the row-tile layout (`native.to_row_tiles`): rows in tiles
// of ROWS, a tile's 64-byte blocks (32 weights) in input order, each block as its ROWS rows' 64
// bytes one after another, so the kernel reads a tile as one stream front to back. Each 64-byte
// load is multiplied with the matching 32 activations by one vdpbf16ps (pairs of bf16 products
// summed into 16 float32 lanes), the lanes summed once a row. x is rounded to bf16 first (exact for
// bf16 x); sums are float32, as oneDNN's bf16 products; y is written in x's dtype (bf16 rounded to
// nearest even).
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

// 1 where this file was compiled with AVX-512 BF16 (native.py compiles it without the flag where
// the compiler lacks it) and this CPU has it; elsewhere the kernel refuses every call (status 3,
// which ops.cpp answers with ATen's product), so a model prepared on one machine runs on another.
int andromeda_bf16_rows_built(void) {
#ifdef __AVX512BF16__
  return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
  return 0;
#endif
}

#ifdef __AVX512BF16__

// Rows of a tile. On an AMD EPYC (Zen 4, 2 threads) a tile of 4 rows read as one stream reads at the
// machine's float32-sum probe (56-65 GB/s in its fast minutes), where 8 or 16 plain rows read side
// by side, each its own stream, read 40-54 GB/s: the hardware prefetchers follow one stream a
// thread better than many.
#define ROWS 4
#define MAX_M 2  // activation rows whose sums stay in registers (2 x 8 + 8 + 1 of 32); more take passes

static inline uint16_t to_bf16(float value) {
  union { float f; uint32_t u; } bits = {value};
  const uint32_t u = bits.u;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline void store(void *y, int y_bf16, int64_t i, float value, const float *bias, int64_t n) {
  if (bias) value += bias[n];
  if (y_bf16) ((uint16_t *)y)[i] = to_bf16(value);
  else ((float *)y)[i] = value;
}

// T tiles (at `w`, one after another: T * ROWS rows of K in the row-tile layout) against `m`
// activation rows at `x` (bf16, K each, K a multiple of 32): T * m * ROWS sums in registers.
static inline __attribute__((always_inline)) void tiles_dot(const int T, const int m, const uint16_t *w,
                                                            const uint16_t *x, int64_t K,
                                                            float out[MAX_M][2 * ROWS]) {
  __m512 acc[MAX_M][2 * ROWS];
  for (int i = 0; i < m; ++i)
    for (int r = 0; r < T * ROWS; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[2 * ROWS];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < ROWS; ++r) wv[t * ROWS + r] = _mm512_loadu_si512((const void *)(w + t * ROWS * K + k * ROWS + r * 32));
    for (int i = 0; i < m; ++i) {
      const __m512i xv = _mm512_loadu_si512((const void *)(x + i * K + k));
      for (int r = 0; r < T * ROWS; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }
  for (int i = 0; i < m; ++i)
    for (int r = 0; r < T * ROWS; ++r) out[i][r] = _mm512_reduce_add_ps(acc[i][r]);
}

// y (M, N) = x (M, K) @ W.T + bias: x bf16 (`x_bf16`) or float32, W (N, K) bf16 as row tiles (N
// rounded up to whole tiles, the rows past N zeros), bias float32 (N) or NULL, y bf16 (`y_bf16`) or
// float32. 0; 1 for K not a multiple of 32 or no rows; 2 out of memory; 3 where this CPU lacks
// AVX-512 BF16 or the file was compiled without it.
int andromeda_bf16_rows(const void *x_in, int64_t M, int64_t K, int x_bf16, const uint16_t *weight, int64_t N,
                        const float *bias, void *y, int y_bf16) {
  if (K % 32 || M < 1) return 1;
  if (!__builtin_cpu_supports("avx512bf16")) return 3;
  uint16_t *copy = NULL;
  const uint16_t *x = (const uint16_t *)x_in;
  if (!x_bf16) {
    copy = (uint16_t *)aligned_alloc(64, (size_t)(M * K * 2 + 64));
    if (!copy) return 2;
    const float *xf = (const float *)x_in;
    for (int64_t i = 0; i < M * K; i += 16)
      _mm256_storeu_si256((__m256i *)(copy + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xf + i)));
    x = copy;
  }
  // One activation row streams each tile alone (4 rows: the fastest read at batch 1); more rows take
  // two tiles at a time, 8 weight rows x 2 activation rows a pass (4 rows x 4 was ~20% slower at 4
  // activation rows: the products, not the reads, bound a batch).
  const int T = M == 1 ? 1 : 2, m_step = M == 1 ? 1 : 2;
  const int64_t tiles = (N + ROWS - 1) / ROWS, groups = (tiles + T - 1) / T;
#pragma omp parallel for schedule(static)
  for (int64_t group = 0; group < groups; ++group) {
    const int64_t n0 = group * T * ROWS, rows = N - n0 < T * ROWS ? N - n0 : T * ROWS;
    const uint16_t *w = weight + n0 * K;
    for (int64_t m0 = 0; m0 < M; m0 += m_step) {
      const int m = M - m0 < m_step ? (int)(M - m0) : m_step;
      float out[MAX_M][2 * ROWS];
      // constant trip counts: sums in registers (a last group of one tile reads its tile alone)
      const int pair = T == 2 && rows > ROWS;
      if (!pair && m == 1) tiles_dot(1, 1, w, x + m0 * K, K, out);
      else if (!pair) tiles_dot(1, 2, w, x + m0 * K, K, out);
      else if (m == 1) tiles_dot(2, 1, w, x + m0 * K, K, out);
      else tiles_dot(2, 2, w, x + m0 * K, K, out);
      for (int i = 0; i < m; ++i)
        for (int64_t r = 0; r < rows; ++r) store(y, y_bf16, (m0 + i) * N + n0 + r, out[i][r], bias, n0 + r);
    }
  }
  free(copy);
  return 0;
}
#else
int andromeda_bf16_rows(const void *x_in, int64_t M, int64_t K, int x_bf16, const uint16_t *weight, int64_t N,
                        const float *bias, void *y, int y_bf16) {
  return 3;
}
#endif
