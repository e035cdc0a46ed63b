// LayerNorm without bias from float32 rows to bf16, forward and backward, for bf16 training on the
// CPU (`train.norm_kernel`).
//
// Under autocast a LayerNorm of the float32 residual stream runs in float32 and every consumer then
// converts its output to bf16, and the backward converts the bf16 gradient back: four passes over
// (N, C) around the norm's own two. Here one pass each way:
//   forward, per row of C:  mean, rstd = 1 / sqrt(var + eps) (var the biased variance, as ATen),
//                           y = bf16((x - mean) rstd w), mean and rstd kept for the backward;
//   backward, dy in bf16:   xhat = (x - mean) rstd, g = dy w,
//                           dx = rstd (g - mean(g) - xhat mean(g xhat)) in float32,
//                           dw = sum over rows of dy xhat.
// Rows are split over the OpenMP threads (static schedule); dw's sums go to one row of partials
// per thread, added in thread order at the end (`scratch.h`: the same result for the same thread count).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "avx512_math.h"
#include "scratch.h"

int andromeda_layer_norm_forward(const float *x, const float *w, int64_t rows, int64_t C, float eps, uint16_t *y,
                                 float *mean, float *rstd) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * C;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(first_lanes(C - c), xr + c));
    const float mu = _mm512_reduce_add_ps(sum) / (float)C;
    const __m512 m = _mm512_set1_ps(mu);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 k = first_lanes(C - c);
      const __m512 d = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, xr + c), m);
      squares = _mm512_fmadd_ps(d, d, squares);
    }
    const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)C + eps);
    const __m512 s = _mm512_set1_ps(inv);
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 k = first_lanes(C - c);
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, xr + c), m), s),
                                     _mm512_maskz_loadu_ps(k, w + c));
      _mm256_mask_storeu_epi16(y + r * C + c, k, to_bf16(v));
    }
    mean[r] = mu;
    rstd[r] = inv;
  }
  return 0;
}

int andromeda_layer_norm_backward(const uint16_t *dy, const float *x, const float *w, const float *mean,
                                  const float *rstd, int64_t rows, int64_t C, float *dx, float *dw) {
  Partials partials = partials_open(C);
  if (!partials.rows) return 2;
#pragma omp parallel
  {
    float *dw_thread = partial_row(&partials);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float *xr = x + r * C;
      const uint16_t *dyr = dy + r * C;
      const __m512 m = _mm512_set1_ps(mean[r]), s = _mm512_set1_ps(rstd[r]);
      __m512 sum_g = _mm512_setzero_ps(), sum_gx = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 k = first_lanes(C - c);
        const __m512 xhat = _mm512_maskz_mul_ps(k, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, xr + c), m), s);
        const __m512 d = load16(dyr + c, 0, k, 1);
        const __m512 g = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(k, w + c));
        sum_g = _mm512_add_ps(sum_g, g);
        sum_gx = _mm512_fmadd_ps(g, xhat, sum_gx);
        _mm512_mask_storeu_ps(dw_thread + c, k, _mm512_fmadd_ps(d, xhat, _mm512_maskz_loadu_ps(k, dw_thread + c)));
      }
      const __m512 mean_g = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g) / (float)C);
      const __m512 mean_gx = _mm512_set1_ps(_mm512_reduce_add_ps(sum_gx) / (float)C);
      for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 k = first_lanes(C - c);
        const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, xr + c), m), s);
        const __m512 g = _mm512_mul_ps(load16(dyr + c, 0, k, 1), _mm512_maskz_loadu_ps(k, w + c));
        const __m512 v = _mm512_mul_ps(s, _mm512_sub_ps(_mm512_sub_ps(g, mean_g), _mm512_mul_ps(xhat, mean_gx)));
        _mm512_mask_storeu_ps(dx + r * C + c, k, v);
      }
    }
  }
  partials_add(&partials, dw);
  return 0;
}
