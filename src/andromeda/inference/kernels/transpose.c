// A matrix written as its transpose, converted between float32 and bf16 and optionally scaled, for
// the weight gradients of bf16 training on the CPU (`train.transpose_kernel`):
//   dst (cols x rows, row stride ldd) = src (rows x cols, row stride lds)^T [* scale],
// float32 arithmetic, bf16 rounded to nearest even as PyTorch converts (`avx512_math.h`'s to_bf16).
//
// ATen's strided copy reads a transposed source an element at a time and leaves the memory system to
// guess: at the 2.5 B default's width it wrote the feed-forward's bf16 (2560 x 10240) weight gradient
// into float32 (10240 x 2560) at ~3 GB/s on one thread, a third of a plain conversion's speed. Here
// blocks of BR x BC go through registers 16 x 16 at a time (`transpose16`), and while one block is
// moved the next one's source and destination lines are prefetched (blocks of 32-128 measured the
// same). Bands of BR source rows are split over the OpenMP threads (static schedule).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "avx512_math.h"

#define BR 64
#define BC 64

// One 16 x 16 tile at (r0, c0), the rows and columns past the matrix left out.
static inline void tile(const void *src, int src_bf16, int64_t rows, int64_t cols, int64_t lds, void *dst,
                        int dst_bf16, int64_t ldd, const float *scale, __m512 factor, int64_t r0, int64_t c0) {
  const int64_t width = cols - c0 < 16 ? cols - c0 : 16, height = rows - r0 < 16 ? rows - r0 : 16;
  const __mmask16 across = first_lanes(width), down = first_lanes(height);
  __m512 t[16];
  for (int i = 0; i < 16; ++i) t[i] = i < height ? load16(src, (r0 + i) * lds + c0, across, src_bf16) : _mm512_setzero_ps();
  transpose16(t);
  for (int j = 0; j < width; ++j)
    store16(dst, (c0 + j) * ldd + r0, scale ? _mm512_mul_ps(t[j], factor) : t[j], down, dst_bf16);
}

int andromeda_transpose(const void *src, int src_bf16, int64_t rows, int64_t cols, int64_t lds, void *dst,
                        int dst_bf16, int64_t ldd, const float *scale) {
  const int64_t row_blocks = (rows + BR - 1) / BR;
  const int64_t es = src_bf16 ? 2 : 4, ed = dst_bf16 ? 2 : 4;
  const __m512 factor = _mm512_set1_ps(scale ? *scale : 1.0f);
#pragma omp parallel for schedule(static)
  for (int64_t rb = 0; rb < row_blocks; ++rb) {
    const int64_t r0 = rb * BR, r1 = r0 + BR < rows ? r0 + BR : rows;
    for (int64_t c0 = 0; c0 < cols; c0 += BC) {
      const int64_t c1 = c0 + BC < cols ? c0 + BC : cols;
      // the next block's source lines and destination lines, while this one is moved
      if (c1 < cols) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c1; c < c1 + BC && c < cols; c += 64 / es) _mm_prefetch((const char *)src + (r * lds + c) * es, _MM_HINT_T0);
        for (int64_t c = c1; c < c1 + BC && c < cols; ++c)
          for (int64_t r = r0; r < r1; r += 64 / ed) _mm_prefetch((const char *)dst + (c * ldd + r) * ed, _MM_HINT_ET0);
      }
      for (int64_t r = r0; r < r1; r += 16)
        for (int64_t c = c0; c < c1; c += 16) tile(src, src_bf16, rows, cols, lds, dst, dst_bf16, ldd, scale, factor, r, c);
    }
  }
  return 0;
}
