// Stores one new position per row into one layer of an int8 KV cache: what
// `model.cache.CacheStep.store` does in PyTorch for a decode step, bit for bit, in one call instead
// of about twenty small ops (tens of microseconds a layer). Built and loaded by
// andromeda/inference/kv_attention.py; the tests hold it to the PyTorch path.
//
// Per row b and key/value head h, for keys and values alike: x = the head's D entries in float32
// (keys' first `rotary` channels first times the row's inverse xPos factors, in float32), the scale
// s = max|x| / 127 (rounded to bfloat16, nearest even, for a bf16 cache), and the codes
// q = round(x / max(s, FLT_MIN)) (half to even) within -127..127, written at the row's slot and
// column with s beside them.
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
  int64_t rows, heads, dim, rotary;  // rotary: key channels times the inverse xPos factors (0: none)
  const void *k, *v;                 // (rows, heads, 1, dim) at the strides below (elements)
  int64_t bf16_k, bf16_v;            // k and v in bfloat16 (else float32)
  int64_t k_row_stride, k_head_stride, v_row_stride, v_head_stride;
  const float *factors;              // (rows, rotary) inverse key factors, or NULL
  int8_t *k_out, *v_out;             // one layer's codes: (slots, heads, columns, dim)
  void *k_scale, *v_scale;           // one layer's scales: (slots, heads, columns)
  int64_t bf16_scales, columns;      // scales in bfloat16 (else float32); columns of a slot
  const int64_t *slots, *cols;       // (rows,) each row's slot and column
} StoreArgs;

static float load(const void *p, int64_t i, int64_t bf16) {
  if (!bf16) return ((const float *)p)[i];
  union { uint32_t u; float f; } bits = {(uint32_t)((const uint16_t *)p)[i] << 16};
  return bits.f;
}

// float32 -> bfloat16 bits, nearest even (as torch converts; NaN as torch writes it).
static uint16_t to_bf16(float value) {
  union { float f; uint32_t u; } bits = {value};
  const uint32_t u = bits.u;
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static void store_head(const StoreArgs *a, const void *in, int64_t bf16, const float *factors, int8_t *codes,
                       void *scales, int64_t at) {
  float x[4096];
  float top = 0.0f;
  for (int64_t d = 0; d < a->dim; ++d) {
    x[d] = load(in, d, bf16);
    if (factors && d < a->rotary) x[d] *= factors[d];
    const float magnitude = fabsf(x[d]);
    if (magnitude > top) top = magnitude;
  }
  float scale = top / 127.0f;
  if (a->bf16_scales) {
    const uint16_t half = to_bf16(scale);
    ((uint16_t *)scales)[at] = half;
    union { uint32_t u; float f; } bits = {(uint32_t)half << 16};
    scale = bits.f;
  } else {
    ((float *)scales)[at] = scale;
  }
  const float divisor = scale > FLT_MIN ? scale : FLT_MIN;
  for (int64_t d = 0; d < a->dim; ++d) {
    float q = nearbyintf(x[d] / divisor);
    q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
    codes[at * a->dim + d] = (int8_t)q;
  }
}

// 0 on success; 1 for a head size past the kernel's buffer.
int andromeda_int8_kv_store(const StoreArgs *a) {
  if (a->dim < 1 || a->dim > 4096 || a->rotary > a->dim) return 1;
  const int64_t k_size = a->bf16_k ? 2 : 4, v_size = a->bf16_v ? 2 : 4;
  for (int64_t b = 0; b < a->rows; ++b)
    for (int64_t h = 0; h < a->heads; ++h) {
      const int64_t at = (a->slots[b] * a->heads + h) * a->columns + a->cols[b];  // (slot, head, column)
      const char *k = (const char *)a->k + (b * a->k_row_stride + h * a->k_head_stride) * k_size;
      const char *v = (const char *)a->v + (b * a->v_row_stride + h * a->v_head_stride) * v_size;
      store_head(a, k, a->bf16_k, a->factors ? a->factors + b * a->rotary : NULL, a->k_out, a->k_scale, at);
      store_head(a, v, a->bf16_v, NULL, a->v_out, a->v_scale, at);
    }
  return 0;
}
