// Products of a few rows x (M, K) with a bf16 weight W (N, K) read as it is stored, with AVX-512
// BF16: y = x @ W.T (+ bias), for decoding, where each step reads every weight once and the
// product is bound by memory bandwidth.
//
// Built into the ops library by andromeda/inference/native.py (`andromeda::bf16_rows`); the tests
// hold it to F.linear. The weight streams row by row, ROWS rows side by side, each 64-byte load of
// 32 weights multiplied with the matching 32 activations by one vdpbf16ps (pairs of bf16 products
// summed into 16 float32 lanes), the lanes summed once a row. x is rounded to bf16 first (exact
// for bf16 x); sums are float32, as oneDNN's bf16 products; y is written in x's dtype (bf16 rounded
// to nearest even).
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

// Weight rows read side by side: independent sums, the activations loaded once for all. On an AMD
// EPYC (Zen 4, 2 threads) 8 rows read 43-47 GB/s where 4 read 38-41 (the machine's float32-sum
// probe: ~62); a software prefetch ahead of each row's stream made it slower (35).
#define ROWS 8
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

// R weight rows (of `w`) against `m` activation rows at `x` (bf16, K each, K a multiple of 32).
static inline __attribute__((always_inline)) void rows_dot(const int R, const int m, const uint16_t *const *w,
                                                           const uint16_t *x, int64_t K, float out[MAX_M][ROWS]) {
  __m512 acc[MAX_M][ROWS];
  for (int i = 0; i < m; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[ROWS];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512((const void *)(w[r] + k));
    for (int i = 0; i < m; ++i) {
      const __m512i xv = _mm512_loadu_si512((const void *)(x + i * K + k));
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }
  for (int i = 0; i < m; ++i)
    for (int r = 0; r < R; ++r) out[i][r] = _mm512_reduce_add_ps(acc[i][r]);
}

// y (M, N) = x (M, K) @ W.T + bias: x bf16 (`x_bf16`) or float32, W (N, K) bf16 contiguous, bias
// float32 (N) or NULL, y bf16 (`y_bf16`) or float32. 0; 1 for K not a multiple of 32 or no rows; 2
// out of memory; 3 where this CPU lacks AVX-512 BF16 or the file was compiled without it.
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
  const int64_t tiles = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t n0 = tile * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
    const uint16_t *w[ROWS];
    for (int64_t r = 0; r < ROWS; ++r) w[r] = weight + (n0 + (r < rows ? r : rows - 1)) * K;
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
      const int m = M - m0 < MAX_M ? (int)(M - m0) : MAX_M;
      float out[MAX_M][ROWS];
      if (m == 1) rows_dot(ROWS, 1, w, x + m0 * K, K, out);  // constant trip counts: sums in registers
      else rows_dot(ROWS, 2, w, x + m0 * K, K, out);
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
