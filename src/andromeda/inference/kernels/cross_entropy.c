// The elementwise part of the training loss over bf16 logits, in place (`train.loss_kernel`).
//
// For each row r of logits (n rows of V, row stride ld, bf16) with target t = targets[r]:
//   losses[r] = logsumexp(logits[r]) - logits[r, t]                    (0 for t = -100: an ignored row)
// and, where row_weight is given, the row is overwritten by d loss / d logits, rounded to bf16:
//   logits[r, j] = (softmax(logits[r])[j] - [j == t]) * row_weight[r]
// ATen does the same in seven passes over a float32 copy (convert, max, subtract, exp, sum, scale,
// convert back); here a row (100 KB for a 50k vocabulary, so it stays in L2) is read three times:
// its maximum, then e^(x - max) into a float32 scratch row with their sum, then the scaled
// gradient back over the logits. Rows are split over PyTorch's OpenMP threads.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "avx512_math.h"
#include "scratch.h"

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

static inline float bf16_to_float(uint16_t h) {
  union { uint32_t u; float f; } v = {(uint32_t)h << 16};
  return v.f;
}

static inline uint16_t float_to_bf16(float x) {
  union { float f; uint32_t u; } v = {x};
  return (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
}

static inline __mmask16 tail(int64_t left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

// The row's maximum, or NaN where the row holds a NaN (max_ps would drop it, and exp512 maps it to
// 0): the loss is then NaN, as PyTorch's is, and a diverged run's non-finite check fires.
static float row_max(const uint16_t *x, int64_t V) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 m = tail(V - j);
    const __m512 v = load_bf16(x + j, m);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    best = _mm512_mask_max_ps(best, m, best, v);
  }
  return nan ? NAN : _mm512_reduce_max_ps(best);
}

// sum_j e^(x_j - top); the terms into `e` where it is given.
static float row_exp_sum(const uint16_t *x, int64_t V, float top, float *e) {
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 m = tail(V - j);
    const __m512 v = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(load_bf16(x + j, m), shift)));
    if (e) _mm512_mask_storeu_ps(e + j, m, v);
    sum = _mm512_add_ps(sum, v);
  }
  return _mm512_reduce_add_ps(sum);
}

static void row_gradient(uint16_t *x, int64_t V, const float *e, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 m = tail(V - j);
    _mm256_mask_storeu_epi16(x + j, m, to_bf16(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, e + j), s)));
  }
}

#define IGNORE_INDEX (-100)

// Returns 0, or 1 when a target is neither in [0, V) nor IGNORE_INDEX (nothing written), 2 when out
// of memory.
int andromeda_softmax_cross_entropy(uint16_t *logits, int64_t n, int64_t V, int64_t ld, const int64_t *targets,
                                    const float *row_weight, float *losses) {
  for (int64_t r = 0; r < n; ++r)
    if (targets[r] >= V || (targets[r] < 0 && targets[r] != IGNORE_INDEX)) return 1;
  int status = 0;
#pragma omp parallel
  {
    static _Thread_local void *scratch = 0;
    static _Thread_local size_t scratch_bytes = 0;
    float *e = row_weight ? thread_buffer(&scratch, &scratch_bytes, sizeof(float) * (size_t)(V + 16)) : 0;
    if (row_weight && !e) {
#pragma omp atomic write
      status = 2;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      if (row_weight && !e) continue;
      uint16_t *x = logits + r * ld;
      const int64_t t = targets[r];
      const float top = row_max(x, V);
      const float sum = row_exp_sum(x, V, top, e);
      const float picked = t >= 0 ? bf16_to_float(x[t]) : 0.0f;
      losses[r] = t >= 0 ? top + logf(sum) - picked : 0.0f;
      if (!row_weight) continue;
      const float w = row_weight[r];
      row_gradient(x, V, e, w / sum);
      if (t >= 0) x[t] = float_to_bf16(e[t] * (w / sum) - w);
    }
  }
  return status;
}
