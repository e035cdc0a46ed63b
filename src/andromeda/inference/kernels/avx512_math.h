// Vector math shared by the kernels (included by every kernel source but vnni.c and bf16_rows.c; the builds'
// cache keys hash every header of this folder with the source, `native.kernel_headers`).
#ifndef ANDROMEDA_AVX512_MATH_H
#define ANDROMEDA_AVX512_MATH_H
#include <immintrin.h>
#include <stdint.h>

// e^x (Cephes' expf polynomial, about 1 ulp); 2^n applied with scalef, so large x give inf. Below
// -86 (and for NaN) the result is 0, not a denormal under 2^-124: a denormal result costs a
// microcode assist (two times slower masked-cache attention calls, where every masked column's
// weight went through one).
static inline __m512 exp512(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-86.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-86.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// The first `count` of 16 lanes (none for count <= 0).
static inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? (__mmask16)0 : (__mmask16)((1u << count) - 1);
}

// 16 values from p + i on as floats (bf16 or float32), the lanes past `mask` 0.
static inline __m512 load16(const void *p, int64_t i, __mmask16 mask, int bf16) {
  if (!bf16) return _mm512_maskz_loadu_ps(mask, (const float *)p + i);
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// float32 -> bf16 as PyTorch converts: to nearest even, NaN as 0x7FC0, denormals kept.
static inline __m256i to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

// 16 floats stored to p + i as float32 or bf16 (`to_bf16`), the lanes in `mask`.
static inline void store16(void *p, int64_t i, __m512 x, __mmask16 mask, int bf16) {
  if (bf16)
    _mm256_mask_storeu_epi16((uint16_t *)p + i, mask, to_bf16(x));
  else
    _mm512_mask_storeu_ps((float *)p + i, mask, x);
}

// Transposes 16 vectors of 16 floats: lane j of r[i] becomes lane i of r[j].
static inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // u[4 * s + c], 128-bit lane L: column 4 L + c of rows 4 s .. 4 s + 3.
  for (int c = 0; c < 4; ++c) {
    const __m512 a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 e = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), f = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(a, e, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(a, e, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(b, f, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(b, f, 0xDD);
  }
}

#endif
