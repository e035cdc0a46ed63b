// Products of a few rows x (M, K) float32 with int4 and int8 weights W (N, K), with AVX-512 VNNI;
// and both weights read back dequantized, the slabs of a prefill's many rows (`andromeda_int4_dequantize`,
// `andromeda_int8_dequantize`). Built with -ffp-contract=off: a product then a sum stay two roundings.
//
// Built and loaded by andromeda/inference/native.py; the arithmetic is documented there, next to
// its PyTorch reference (`int4_rows_reference`), which the tests hold this file to.
//
// Both weights are in row tiles (`native.to_row_tiles`): the rows go in tiles of ROWS = 4 (int4) or
// INT8_ROWS = 8 (the rows past N, up to a whole tile, hold zeros), and a tile's bytes are its
// 64-byte blocks in input order, each as its rows' 64 bytes in row order: one tile is one stream that the kernel reads
// front to back (on Sapphire Rapids 5-7% faster at two threads than 4 rows read side by side,
// each from its own place; on an AMD EPYC Zen 4 up to 1.3x faster than 8-16 rows side by side).
// int4 ("blocks of 128"): each 64-byte block holds 128 weights of a row, the low nibble of byte j
// weight j of the block and the high nibble weight 64 + j. Codes q are
// 0..15, weight = (q - 8) * scale + zero per group of `group` inputs (128 or 256), and the kernel
// reads per row its G scales, then its G zeros ((N, 2, G), float32 or, with `scales_bf16`, bfloat16:
// a bf16 model's own scales, half the bytes, read exactly).
//
// Per row m the activations are quantized to int8 with one scale a = max|x| / 127; the integer
// dot products of each group with the codes q (VNNI: unsigned 4-bit codes times signed 8-bit
// activations, summed in int32 exactly) are scaled by the group's scale; the centring (8 times the
// group's activation codes, C) and the zeros (times the exact float sums of the group's
// activations, X) come in once a tile, 16 groups at a time:
//   y[m, n] = a * sum_g scale[n, g] * sum_{k in g} xq[m, k] q[n, k]
//             + sum_g scale[n, g] (-8 a C[m, g]) + zero[n, g] X[m, g].
//
// Both kernels take x and write y in float32 or, with `bf16`, in bfloat16 (read exactly; written
// rounded to nearest even, as torch's conversion), and add a float32 `bias` (N) when it is not
// NULL: y = x @ W.T + bias in the activations' dtype, with no pass of PyTorch ops around the call.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 128

// The activations as float32 rows: x itself, or a new copy of bf16 x (NULL if out of memory).
static const float *float_rows(const void *x, int64_t count, int bf16, float **copy) {
  *copy = NULL;
  if (!bf16) return (const float *)x;
  float *out = (float *)aligned_alloc(64, (size_t)(count * 4 + 64));
  if (!out) return NULL;
  const uint16_t *in = (const uint16_t *)x;
  for (int64_t i = 0; i < count; i += 16) {  // count is a multiple of 64
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(in + i)));
    _mm512_store_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
  return *copy = out;
}

// One output: plus the bias, stored as float32 or as bfloat16 rounded to nearest even.
static inline void store(void *y, int bf16, int64_t i, float value, const float *bias, int64_t n) {
  if (bias) value += bias[n];
  if (!bf16) {
    ((float *)y)[i] = value;
    return;
  }
  union { float f; uint32_t u; } bits = {value};
  const uint32_t u = bits.u;
  ((uint16_t *)y)[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u  // NaN, as torch writes it
                                                      : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// xq (M, K) int8, a (M), sums (M, G) and codes (M, G): each row's quantized activations, its
// scale, and per group the float sum of its activations and the integer sum of their codes.
// K is a multiple of 64, so every loop runs on whole 16-float vectors.
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t group, int8_t *xq, float *a,
                          float *sums, int32_t *codes) {
  const int64_t G = K / group;
  for (int64_t m = 0; m < M; ++m) {
    const float *row = x + m * K;
    __m512 peak = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
    const float top = _mm512_reduce_max_ps(peak);
    const float scale = top > 0.0f ? top / 127.0f : 1.0f;
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    a[m] = scale;
    for (int64_t g = 0; g < G; ++g) {
      __m512 s = _mm512_setzero_ps();
      __m512i c = _mm512_setzero_si512();
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        const __m512 v = _mm512_loadu_ps(row + k);
        const __m512i rounded = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, inverse),
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(xq + m * K + k), _mm512_cvtsepi32_epi8(rounded));
        s = _mm512_add_ps(s, v);
        c = _mm512_add_epi32(c, rounded);
      }
      sums[m * G + g] = _mm512_reduce_add_ps(s);
      codes[m * G + g] = _mm512_reduce_add_epi32(c);
    }
  }
}

// The activations of both kernels: `quantize_rows`'s outputs in buffers of their own.
typedef struct {
  int8_t *xq;
  float *a, *sums;
  int32_t *codes;
} Activations;

static void release(Activations *q) { free(q->xq); free(q->a); free(q->sums); free(q->codes); }

// x (M, K) float32 or bf16, quantized per row with sums per group; 0, or 2 out of memory.
static int quantize_input(const void *x_in, int64_t M, int64_t K, int64_t group, int bf16, Activations *q) {
  const int64_t G = K / group;
  float *copy;
  const float *x = float_rows(x_in, M * K, bf16, &copy);
  q->xq = (int8_t *)aligned_alloc(64, (size_t)(M * K + 64));
  q->a = (float *)malloc(sizeof(float) * M);
  q->sums = (float *)malloc(sizeof(float) * M * G);
  q->codes = (int32_t *)malloc(sizeof(int32_t) * M * G);
  if (!x || !q->xq || !q->a || !q->sums || !q->codes) { free(copy); release(q); return 2; }
  quantize_rows(x, M, K, group, q->xq, q->a, q->sums, q->codes);
  free(copy);
  return 0;
}

// Element i of float32 or (`bf16`) bfloat16 values at p: a bfloat16 is the top half of its float32.
static inline float scalar_at(const void *p, int64_t i, int bf16) {
  if (!bf16) return ((const float *)p)[i];
  union { uint32_t u; float f; } bits = {(uint32_t)((const uint16_t *)p)[i] << 16};
  return bits.f;
}

// Elements i.. of the `lanes` of 16 (others 0), as `scalar_at`.
static inline __m512 vector_at(const void *p, int64_t i, __mmask16 lanes, int bf16) {
  if (!bf16) return _mm512_maskz_loadu_ps(lanes, (const float *)p + i);
  const __m256i half = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)p + i);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

#define ROWS 4  // rows of a tile (both layouts): independent dependency chains, shared activation loads
// Rows of an int8 tile, and activation rows whose sums stay in registers (2 x 8 of 32; more take
// passes). Measured on an AMD EPYC (Zen 4, 2 threads), 2.5 B layer shapes, int8 read GB/s at 1 / 4
// / 16 activation rows: tiles of 8 x 2 rows 40.6 / 24.3 / 12.6, of 16 x 1 41.6 / 22.8 / 9.6, of 4 x 4
// 36.9 / 20.4 / 12.2; 16 plain rows side by side (this kernel before) 31.1 / 19.6 / 8.7.
#define INT8_ROWS 8
#define INT8_M 2
#define INT4_PREFETCH 4096  // how far ahead (bytes) the int4 tile's stream is prefetched (T2: into the outer caches)

_Static_assert(ROWS == 4, "the int4 kernel sums its tiles' four rows with hsum4");
#define INT4_M 3  // activation rows an int4 tile's codes are unpacked for at a time
#define INT4_GROUPS 64  // groups whose scales a tile turns into float32 at a time (a buffer on the stack)

// Sums of four vectors' lanes: (sum a, sum b, sum c, sum d).
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
  const __m256 ab = _mm256_hadd_ps(HALVES(a), HALVES(b)), cd = _mm256_hadd_ps(HALVES(c), HALVES(d));
#undef HALVES
  const __m256 all = _mm256_hadd_ps(ab, cd);  // a, b, c, d in each 128-bit half
  return _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
}

// What every tile of one int4 product reads besides its own weights.
typedef struct {
  int64_t K, N, G, blocks_per_group, row_bytes;
  int bf16, scales_bf16;
  const int8_t *xq;                        // (M, K) activation codes
  const float *a, *sums, *centring, *bias;  // (M), (M, G) float sums, (M, G) -8 a C, (N) or NULL
  const void *scale_zero;
  void *y;
} Int4Product;

// Activation rows m0..m0 + mp - 1 (mp = 1..INT4_M: they share the tile's unpacked codes)
// against the tile of rows n0.. (`rows` of them real) whose stream starts at `w`.
static inline __attribute__((always_inline)) void int4_tile(const int mp, const Int4Product *p, const int64_t m0,
                                                            const uint8_t *w, const int64_t n0, const int64_t rows) {
  const int64_t K = p->K, G = p->G;
  const char *scale[ROWS], *zero[ROWS];
  for (int64_t r = 0; r < ROWS; ++r) {  // a short last tile's padding rows take its last row's scales
    const int64_t n = n0 + (r < rows ? r : rows - 1);
    scale[r] = (const char *)p->scale_zero + n * p->row_bytes;
    zero[r] = scale[r] + p->row_bytes / 2;
  }
  __m512 acc[INT4_M][ROWS], rest[INT4_M][ROWS];  // the groups' scaled products; the centring and zeros
  for (int i = 0; i < mp; ++i)
    for (int64_t r = 0; r < ROWS; ++r) acc[i][r] = rest[i][r] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += INT4_GROUPS) {
    const int64_t count = G - g0 < INT4_GROUPS ? G - g0 : INT4_GROUPS;
    float scales[ROWS][INT4_GROUPS] __attribute__((aligned(64)));
    for (int64_t g = 0; g < count; g += 16) {
      const __mmask16 lanes = count - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - g)) - 1);
      for (int64_t r = 0; r < ROWS; ++r) {
        const __m512 s = vector_at(scale[r], g0 + g, lanes, p->scales_bf16);
        const __m512 z = vector_at(zero[r], g0 + g, lanes, p->scales_bf16);
        _mm512_store_ps(scales[r] + g, s);
        for (int i = 0; i < mp; ++i) {
          const int64_t at = (m0 + i) * G + g0 + g;
          rest[i][r] = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(lanes, p->centring + at), rest[i][r]);
          rest[i][r] = _mm512_fmadd_ps(z, _mm512_maskz_loadu_ps(lanes, p->sums + at), rest[i][r]);
        }
      }
    }
    for (int64_t g = 0; g < count; ++g) {
      __m512i dot[INT4_M][ROWS];
      for (int i = 0; i < mp; ++i)
        for (int64_t r = 0; r < ROWS; ++r) dot[i][r] = _mm512_setzero_si512();
      for (int64_t b = 0; b < p->blocks_per_group; ++b) {
        const int64_t k0 = ((g0 + g) * p->blocks_per_group + b) * BLOCK;
        __m512i x_low[INT4_M], x_high[INT4_M];
        for (int i = 0; i < mp; ++i) {
          x_low[i] = _mm512_loadu_si512((const void *)(p->xq + (m0 + i) * K + k0));
          x_high[i] = _mm512_loadu_si512((const void *)(p->xq + (m0 + i) * K + k0 + 64));
        }
        const uint8_t *block = w + (k0 / 2) * ROWS;
        for (int64_t r = 0; r < ROWS; ++r) {
          _mm_prefetch((const char *)(block + r * 64 + INT4_PREFETCH), _MM_HINT_T2);
          const __m512i packed = _mm512_loadu_si512((const void *)(block + r * 64)), nibble = _mm512_set1_epi8(0x0F);
          const __m512i low = _mm512_and_si512(packed, nibble);
          const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
          for (int i = 0; i < mp; ++i) {
            dot[i][r] = _mm512_dpbusd_epi32(dot[i][r], low, x_low[i]);
            dot[i][r] = _mm512_dpbusd_epi32(dot[i][r], high, x_high[i]);
          }
        }
      }
      for (int64_t r = 0; r < ROWS; ++r) {
        const __m512 s = _mm512_set1_ps(scales[r][g]);
        for (int i = 0; i < mp; ++i) acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][r]), s, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < mp; ++i) {
    const __m512 activation_scale = _mm512_set1_ps(p->a[m0 + i]);
    float out[ROWS];
    _mm_storeu_ps(out, hsum4(_mm512_fmadd_ps(acc[i][0], activation_scale, rest[i][0]),
                             _mm512_fmadd_ps(acc[i][1], activation_scale, rest[i][1]),
                             _mm512_fmadd_ps(acc[i][2], activation_scale, rest[i][2]),
                             _mm512_fmadd_ps(acc[i][3], activation_scale, rest[i][3])));
    for (int64_t r = 0; r < rows; ++r) store(p->y, p->bf16, (m0 + i) * p->N + n0 + r, out[r], p->bias, n0 + r);
  }
}

// The work per 64 bytes of weights is kept small (an AND, a shift and two VNNI products a block
// and activation row, the unpacking shared by up to three rows; a conversion and an FMA with a broadcast
// from memory a group; the rest once a tile). On Sapphire/Emerald Rapids at two threads this
// reads 2-3% faster at one activation row than the form with the centring and the scales'
// conversions in every group, and at 3, 5 and 8 rows 1.42x, 1.64x and 1.69x faster (the 2.5 B's 128
// matrices, paired runs).
int andromeda_int4_rows(const void *x_in, int64_t M, int64_t K, int bf16, const uint8_t *weight,
                        const void *scale_zero, int scales_bf16, int64_t N, int64_t group, const float *bias,
                        void *y) {
  if (group <= 0 || K % BLOCK || group % BLOCK || K % group || M < 1) return 1;
  const int64_t G = K / group;
  Activations q;
  if (quantize_input(x_in, M, K, group, bf16, &q)) return 2;
  float *centring = (float *)malloc(sizeof(float) * M * G);  // -8 a C per row and group
  if (!centring) { release(&q); return 2; }
  for (int64_t i = 0; i < M * G; ++i) centring[i] = -8.0f * q.a[i / G] * (float)q.codes[i];
  const Int4Product p = {K, N, G, group / BLOCK, 2 * G * (scales_bf16 ? 2 : 4), bf16, scales_bf16,
                         q.xq, q.a, q.sums, centring, bias, scale_zero, y};
  const int64_t tiles = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t n0 = tile * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
    const uint8_t *w = weight + n0 * (K / 2);  // the tile's stream: row r of block kb at (kb * ROWS + r) * 64
    int64_t m = 0;
    // Constant row counts (sums in registers): threes, but four as two pairs (faster than 3 + 1)
    for (; M - m >= 3 && M - m != 4; m += 3) int4_tile(3, &p, m, w, n0, rows);
    for (; M - m >= 2; m += 2) int4_tile(2, &p, m, w, n0, rows);
    if (m < M) int4_tile(1, &p, m, w, n0, rows);
  }
  free(centring);
  release(&q);
  return 0;
}

// One int8 tile (`w`: INT8_ROWS rows of K in the row-tile layout) against `m` rows of shifted activation
// codes at `x`: the integer sums, out[i][r] = sum_k x[i, k] W[r, k].
static inline __attribute__((always_inline)) void int8_tile_dot(const int m, const int8_t *w, const uint8_t *x,
                                                                int64_t K, int32_t out[INT8_M][INT8_ROWS]) {
  __m512i dot[INT8_M][INT8_ROWS];
  for (int i = 0; i < m; ++i)
    for (int r = 0; r < INT8_ROWS; ++r) dot[i][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    __m512i wv[INT8_ROWS];
    for (int r = 0; r < INT8_ROWS; ++r) wv[r] = _mm512_loadu_si512((const void *)(w + k * INT8_ROWS + r * 64));
    for (int i = 0; i < m; ++i) {
      const __m512i xv = _mm512_loadu_si512((const void *)(x + i * K + k));
      for (int r = 0; r < INT8_ROWS; ++r) dot[i][r] = _mm512_dpbusd_epi32(dot[i][r], xv, wv[r]);
    }
  }
  for (int i = 0; i < m; ++i)
    for (int r = 0; r < INT8_ROWS; ++r) out[i][r] = _mm512_reduce_add_epi32(dot[i][r]);
}

// y = x @ W.T (+ bias) for an int8 weight W (N, K) with one scale per row, in the row-tile layout
// (`native.to_row_tiles` with tiles of INT8_ROWS rows, N rounded up with zero rows, a tile's 64-byte
// blocks in input order, each as its rows' 64 bytes one after another), read a tile as one stream.
// VNNI multiplies unsigned by signed bytes, so the activations go in shifted by 128 (codes 1..255)
// and the shift comes back out through each row's weight sum:
//   y[m, n] = a[m] * scale[n] * (sum_k (xq[m, k] + 128) W[n, k] - 128 * wsum[n]).
int andromeda_int8_rows(const void *x_in, int64_t M, int64_t K, int bf16, const int8_t *weight, const float *scale,
                        const int32_t *wsum, int64_t N, const float *bias, void *y) {
  if (K % 64 || M < 1) return 1;
  Activations q;
  if (quantize_input(x_in, M, K, K, bf16, &q)) return 2;
  uint8_t *xu = (uint8_t *)q.xq;
  const float *a = q.a;
  const __m512i shift = _mm512_set1_epi8((char)0x80);
  for (int64_t i = 0; i < M * K; i += 64) {  // xq + 128: flipping the sign bit
    _mm512_storeu_si512((void *)(xu + i), _mm512_xor_si512(_mm512_loadu_si512((const void *)(xu + i)), shift));
  }
  const int64_t tiles = (N + INT8_ROWS - 1) / INT8_ROWS;
#pragma omp parallel for schedule(static)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t n0 = tile * INT8_ROWS;
    const int64_t rows = N - n0 < INT8_ROWS ? N - n0 : INT8_ROWS;
    const int8_t *w = weight + n0 * K;
    for (int64_t m0 = 0; m0 < M; m0 += INT8_M) {
      const int m = M - m0 < INT8_M ? (int)(M - m0) : INT8_M;
      int32_t dots[INT8_M][INT8_ROWS];
      switch (m) {  // constant trip counts: sums in registers
        case 1: int8_tile_dot(1, w, xu + m0 * K, K, dots); break;
        default: int8_tile_dot(2, w, xu + m0 * K, K, dots); break;
      }
      for (int i = 0; i < m; ++i)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = n0 + r;
          const int64_t total = (int64_t)dots[i][r] - 128 * (int64_t)wsum[n];
          store(y, bf16, (m0 + i) * N + n, a[m0 + i] * scale[n] * (float)total, bias, n);
        }
    }
  }
  release(&q);
  return 0;
}

// Rows start..end - 1 of an int4 weight in the kernel's layout (`weight`, `scale_zero` as
// `andromeda_int4_rows` takes them; start a multiple of ROWS) dequantized into `out`, (end - start,
// K) row-major: each weight (q - 8) * scale + zero in float32 (a product, then a sum, each rounded:
// as PyTorch computes it), written as float32 or (`bf16_out`) rounded to bfloat16 (nearest even).
// The slabs a prefill's many rows multiply through a bf16 matmul: one pass, at memory speed.
int andromeda_int4_dequantize(const uint8_t *weight, const void *scale_zero, int scales_bf16, int64_t K,
                              int64_t group, int64_t start, int64_t end, int bf16_out, void *out) {
  if (group <= 0 || K % BLOCK || group % BLOCK || K % group || start % ROWS || end < start) return 1;
  const int64_t G = K / group, row_bytes = 2 * G * (scales_bf16 ? 2 : 4);
  const int64_t first = start / ROWS, last = (end + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
  for (int64_t tile = first; tile < last; ++tile) {
    const uint8_t *w = weight + tile * ROWS * (K / 2);
    for (int64_t r = 0; r < ROWS && tile * ROWS + r < end; ++r) {
      const int64_t n = tile * ROWS + r;
      const char *scale = (const char *)scale_zero + n * row_bytes, *zero = scale + row_bytes / 2;
      for (int64_t kb = 0; kb < K / BLOCK; ++kb) {
        const int64_t g = kb * BLOCK / group;
        const __m512 s = _mm512_set1_ps(scalar_at(scale, g, scales_bf16)), z = _mm512_set1_ps(scalar_at(zero, g, scales_bf16));
        const __m512i packed = _mm512_loadu_si512((const void *)(w + (kb * ROWS + r) * 64));
        const __m512i nibble = _mm512_set1_epi8(0x0F);
        uint8_t block[BLOCK] __attribute__((aligned(64)));  // the 128 codes in input order
        _mm512_store_si512((void *)block, _mm512_and_si512(packed, nibble));
        _mm512_store_si512((void *)(block + 64), _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble));
        for (int h = 0; h < 2; ++h)
          for (int part = 0; part < 4; ++part) {  // 16 codes at a time: weights kb * 128 + 64 h + 16 part..
            const __m512i codes = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(block + 64 * h + 16 * part)));
            const __m512 centred = _mm512_cvtepi32_ps(_mm512_sub_epi32(codes, _mm512_set1_epi32(8)));
            const __m512 value = _mm512_add_ps(_mm512_mul_ps(centred, s), z);
            const int64_t at = (n - start) * K + kb * BLOCK + 64 * h + 16 * part;
            if (!bf16_out) {
              _mm512_storeu_ps((float *)out + at, value);
              continue;
            }
            const __m512i bits = _mm512_castps_si512(value);  // round to nearest even (finite values)
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
          }
      }
    }
  }
  return 0;
}

// Rows start..end - 1 of an int8 weight in row tiles of INT8_ROWS (start a multiple of INT8_ROWS)
// into `out`, (end - start, K) row-major, as float32 or (`bf16_out`) bfloat16: exact either way
// (codes of 8 bits). The slabs of a prefill's many rows, in one pass.
int andromeda_int8_dequantize(const int8_t *weight, int64_t K, int64_t start, int64_t end, int bf16_out, void *out) {
  if (K % 64 || start % INT8_ROWS || end < start) return 1;
  const int64_t first = start / INT8_ROWS, last = (end + INT8_ROWS - 1) / INT8_ROWS;
#pragma omp parallel for schedule(static)
  for (int64_t tile = first; tile < last; ++tile) {
    const int8_t *w = weight + tile * INT8_ROWS * K;
    for (int64_t r = 0; r < INT8_ROWS && tile * INT8_ROWS + r < end; ++r) {
      const int64_t row = tile * INT8_ROWS + r - start;
      for (int64_t k = 0; k < K; k += 64) {
        const int8_t *codes = w + k * INT8_ROWS + r * 64;
        for (int part = 0; part < 4; ++part) {
          const __m128i sixteen = _mm_loadu_si128((const __m128i *)(codes + 16 * part));
          const __m512 value = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sixteen));
          const int64_t at = row * K + k + 16 * part;
          if (bf16_out)  // an integer of 8 bits is exact in bf16: its top 16 bits
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + at),
                                _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(value), 16)));
          else
            _mm512_storeu_ps((float *)out + at, value);
        }
      }
    }
  }
  return 0;
}
