// The CPU implementations of the custom ops `andromeda::int8_rows`, `andromeda::int4_rows`,
// `andromeda::bf16_rows` and `andromeda::decode_sdpa` (schemas defined in
// andromeda/inference/native.py), in C++ over the kernels of vnni.c, bf16_rows.c and decode_sdpa.c.
//
// Through the dispatcher a C++ kernel costs a few microseconds a call where a Python one costs
// about ten (the ctypes call, the tensors' pointers and shapes read in Python), and a compiled
// decode step makes 129 of these calls at the 2.5 B default. Built by native.py together with
// vnni.c against the installed torch's headers and loaded with torch.ops.load_library; where the
// build fails, native.py registers the same ops in Python instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

extern "C" {
int andromeda_int8_rows(const void *x, int64_t M, int64_t K, int bf16, const int8_t *weight, const float *scale,
                        const int32_t *wsum, int64_t N, const float *bias, void *y);
int andromeda_int4_rows(const void *x, int64_t M, int64_t K, int bf16, const uint8_t *weight,
                        const void *scale_zero, int scales_bf16, int64_t N, int64_t group, const float *bias,
                        void *y);
int andromeda_bf16_rows(const void *x, int64_t M, int64_t K, int x_bf16, const uint16_t *weight, int64_t N,
                        const float *bias, void *y, int y_bf16);

typedef struct {  // decode_sdpa.c's SdpaArgs
  int64_t B, K, G, S, D;
  const void *q;
  int64_t q_b, q_h, q_g;
  const void *k, *v;
  int64_t k_b, k_h, k_s, v_b, v_h, v_s;
  const void *mask;
  int64_t m_b, m_h, m_g;
  int64_t bf16;
  float scale;
  int64_t limit;
  int64_t amx;
  void *out;
} SdpaArgs;
int andromeda_decode_sdpa(const SdpaArgs *args);
int andromeda_decode_sdpa_amx(void);
}

namespace {

// x as the kernels read it: contiguous (M, K) bf16 or float32 (another floating dtype as float32).
at::Tensor rows(const at::Tensor &x, int64_t K, const char *kind) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "the ", kind, " kernel takes x of shape (M, ", K, "), not ",
              x.sizes());
  at::Tensor r = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  return r.contiguous();
}

const float *bias_pointer(const std::optional<at::Tensor> &bias, int64_t N, const char *kind) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "the ", kind,
              " kernel takes a contiguous float32 bias of ", N, " values");
  return bias->const_data_ptr<float>();
}

void check(int status, const std::string &kind, int64_t M, int64_t K) {
  TORCH_CHECK(status == 0, "the ", kind, " kernel refused its arguments (status ", status, "): M=", M, ", K=", K);
}

// The row-tile layout (native.to_row_tiles) holds N rows in whole tiles of `tile` rows: vnni.c's and
// bf16_rows.c's ROWS (4), vnni.c's INT8_ROWS (8).
void check_tiles(const at::Tensor &weight, int64_t N, const std::string &kind, int64_t tile = 4) {
  const int64_t tiled = (N + tile - 1) / tile * tile;
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == tiled && weight.is_contiguous(), "the ", kind,
                    " kernel takes a contiguous weight of ", tiled, " rows for ", N, " rows (to_row_tiles), not ",
                    weight.sizes());
}

at::Tensor int8_rows(const at::Tensor &x_in, const at::Tensor &weight, const at::Tensor &scale, const at::Tensor &wsum,
                     const std::optional<at::Tensor> &bias) {
  const int64_t N = scale.size(0), K = weight.size(1);
  check_tiles(weight, N, "int8", 8);
  const at::Tensor x = rows(x_in, K, "int8");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  check(andromeda_int8_rows(x.const_data_ptr(), M, K, x.scalar_type() == at::kBFloat16,
                            weight.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(),
                            wsum.const_data_ptr<int32_t>(), N, bias_pointer(bias, N, "int8"), y.mutable_data_ptr()),
        "int8", M, K);
  return y;
}

at::Tensor int4_rows(const at::Tensor &x_in, const at::Tensor &weight, const at::Tensor &scale_zero,
                     int64_t group_size, const std::optional<at::Tensor> &bias) {
  const int64_t N = scale_zero.size(0), K = 2 * weight.size(1);
  TORCH_CHECK_TYPE(scale_zero.scalar_type() == at::kFloat || scale_zero.scalar_type() == at::kBFloat16,
                   "the int4 kernel's scales and zeros must be float32 or bfloat16, not ", scale_zero.scalar_type());
  check_tiles(weight, N, "int4");
  TORCH_CHECK_VALUE(group_size > 0 && K % group_size == 0 && scale_zero.dim() == 3 && scale_zero.size(1) == 2 &&
                        scale_zero.size(2) == K / group_size && scale_zero.is_contiguous(),
                    "expected contiguous scales and zeros of shape (", N, ", 2, K / group) for group size ",
                    group_size, " and K = ", K, " (to_kernel_layout), got ", scale_zero.sizes());
  const at::Tensor x = rows(x_in, K, "int4");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  check(andromeda_int4_rows(x.const_data_ptr(), M, K, x.scalar_type() == at::kBFloat16,
                            weight.const_data_ptr<uint8_t>(), scale_zero.const_data_ptr(),
                            scale_zero.scalar_type() == at::kBFloat16, N, group_size, bias_pointer(bias, N, "int4"),
                            y.mutable_data_ptr()),
        "int4 (group " + std::to_string(group_size) + ")", M, K);
  return y;
}

at::Tensor bf16_rows(const at::Tensor &x_in, const at::Tensor &weight, int64_t N,
                     const std::optional<at::Tensor> &bias) {
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kBFloat16, "the bf16 kernel takes a bf16 weight, not ",
                    weight.scalar_type());
  check_tiles(weight, N, "bf16");
  const int64_t K = weight.size(1);
  const at::Tensor x = rows(x_in, K, "bf16");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const bool x_bf16 = x.scalar_type() == at::kBFloat16;
  const int status = andromeda_bf16_rows(x.const_data_ptr(), M, K, x_bf16,
                                         reinterpret_cast<const uint16_t *>(weight.const_data_ptr()), N,
                                         bias_pointer(bias, N, "bf16"), y.mutable_data_ptr(), x_bf16);
  if (status == 3) {  // this CPU lacks AVX-512 BF16: the same product by ATen (native.bf16_rows_reference)
    TORCH_CHECK_VALUE(K % 32 == 0, "the bf16 kernel takes rows of whole 32-weight blocks, not K=", K);
    const at::Tensor plain = weight.view({-1, K / 32, 4, 32}).transpose(1, 2).reshape({-1, K}).slice(0, 0, N);
    const at::Tensor exact = x.to(at::kBFloat16).to(at::kFloat);
    const at::Tensor product = bias.has_value() ? at::linear(exact, plain.to(at::kFloat), *bias)
                                                : at::linear(exact, plain.to(at::kFloat));
    return x_bf16 ? product.to(at::kBFloat16) : product;
  }
  check(status, "bf16", M, K);
  return y;
}

// channels (the last dimension) contiguous, as the kernel reads rows
at::Tensor rows_of(const at::Tensor &t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// softmax(q k^T * scale + mask) v for q (B, K, G, D), k and v (B, K, S, D) and a mask broadcast to
// (B, K, G, S), all bf16 or all float32: decode_sdpa.c's kernel (bf16 by AMX tiles where this process
// has them, at any length; else its FMA path where every task reads at most `limit` columns), else
// ATen's SDPA (the same result to rounding).
at::Tensor decode_sdpa(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                       const at::Tensor &mask_in, double scale, int64_t limit) {
  TORCH_CHECK_VALUE(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4 && mask_in.dim() == 4,
                    "decode_sdpa takes q (B, K, G, D), k and v (B, K, S, D) and a mask (B, K, G, S), not ",
                    q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes(), " and ", mask_in.sizes());
  const int64_t B = q_in.size(0), K = q_in.size(1), G = q_in.size(2), D = q_in.size(3), S = k_in.size(2);
  const auto dtype = q_in.scalar_type();
  const bool same = k_in.scalar_type() == dtype && v_in.scalar_type() == dtype && mask_in.scalar_type() == dtype;
  TORCH_CHECK_VALUE(k_in.sizes() == at::IntArrayRef({B, K, S, D}) && v_in.sizes() == k_in.sizes(),
                    "decode_sdpa: k and v must be (", B, ", ", K, ", S, ", D, "), not ", k_in.sizes(), " and ",
                    v_in.sizes());
  if (!same || (dtype != at::kBFloat16 && dtype != at::kFloat))
    return at::scaled_dot_product_attention(q_in, k_in, v_in, mask_in, 0.0, false, scale);
  static const bool amx = andromeda_decode_sdpa_amx() != 0;  // AMX tiles granted to this process
  const at::Tensor q = q_in.contiguous(), k = rows_of(k_in), v = rows_of(v_in);
  const at::Tensor mask = rows_of(mask_in.expand({B, K, G, S}));
  at::Tensor out = at::empty({B, K, G, D}, q.options());
  const SdpaArgs args{B, K, G, S, D, q.const_data_ptr(), q.stride(0), q.stride(1), q.stride(2),
                      k.const_data_ptr(), v.const_data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), mask.const_data_ptr(), mask.stride(0),
                      mask.stride(1), mask.stride(2), dtype == at::kBFloat16, static_cast<float>(scale), limit,
                      amx, out.mutable_data_ptr()};
  const int status = andromeda_decode_sdpa(&args);
  TORCH_CHECK(status != 2, "decode_sdpa: out of memory for its scratch buffers");
  if (status != 0)  // 1: a shape the kernel does not take; 3: more columns than `limit`
    return at::scaled_dot_product_attention(q, k_in, v_in, mask_in, 0.0, false, scale);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(andromeda, CPU, m) {
  m.impl("int8_rows", &int8_rows);
  m.impl("int4_rows", &int4_rows);
  m.impl("bf16_rows", &bf16_rows);
  m.impl("decode_sdpa", &decode_sdpa);
}
