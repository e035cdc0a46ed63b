"""The int8 and int4 Linears: weight-only quantized weights, dequantized inside the product.

Shape letters: M rows of activations (batch x positions), K input features, N output features,
G = K // group_size groups per output row.

- int8: symmetric, one scale per output row: w[n, k] = q[n, k] * scales[n], q in [-127, 127].
  Kernel: `torch._weight_int8pack_mm` (ATen, AVX-512/AVX2), which streams the int8 weight and
  converts every weight to fp32 in registers: compute-bound at about half the memory bandwidth.
  Once `pack_for_decoding` has run (`load_for_inference` does it for decoding), a few rows go
  through `native`'s AVX-512 VNNI kernel instead, with the weight laid out for it in row tiles
  (`native.to_row_tiles`, in place of the plain layout; more rows read slabs back from it):
  activations quantized per row to 8 bits (as llama.cpp's Q8_0 does, in blocks of 32), integer
  dot products, at about the memory bandwidth.
- int4: asymmetric, one scale and zero per group of `group_size` inputs of a row:
  w[n, k] = (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g], q in [0, 15] -- the
  convention of ATen's "tinygemm" kernels. Kernel: `torch._weight_int4pack_mm_for_cpu` on the
  weight packed by `torch._convert_weight_to_int4pack_for_cpu` (see `int4_packing`), which
  converts every weight to floating point: compute-bound. Once `pack_for_decoding` has run, a
  few rows instead go through `native`'s VNNI kernel (groups of 128 or 256), with the weight laid
  out for it in place of ATen's layout: activations quantized per row to 8 bits, integer dot
  products; more rows dequantize slabs from that layout.

The kernels win for a few rows (decoding; see INT8_KERNEL_ROWS); for a prefill they are 2-4x
slower than a bf16 matmul, so there the weight is dequantized a 4 MB slab at a time and multiplied
by oneDNN: nothing weight-sized is kept or allocated per call, and the cost over bf16 is the
dequantizing pass (a conversion for int8; for int4 a few elementwise passes, or, from the kernels'
layout, one pass in C: `native.int4_dequantize`).

Scales and zeros are stored in the model's dtype, rounded so the stored grid still covers each
row's (or group's) range: every weight is then within scale / 2 of its quantized value.

On CUDA (untested: no GPU was available) the modules dequantize the whole weight and call
F.linear: correct, but slower than bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .int4_packing import (
    INT4_LEVELS,
    INT4_OFFSET,
    LOW_NIBBLES,
    cpu_int4_layout,
    pack_for_cpu,
    pack_nibbles,
    plain_from_cpu,
    unpack_cpu_rows,
    unpack_nibbles,
)

INT8_MAX = 127  # symmetric: -127..127, so negating a weight negates its code

# Rows (batch x positions) up to which the packed kernels are used. Their time grows with the
# rows (they dequantize per row block), while dequantizing slabs to bf16 for oneDNN's matmul costs
# a fixed pass over the weight: cheap for int8 (a conversion), ~0.7 ns a weight for int4. Measured
# crossovers on an AMD EPYC Zen 5 (AVX-512 BF16), torch 2.13, one thread, layers of the 2.5 B
# default: int8 16-24 rows, int4 64-128 rows.
INT8_KERNEL_ROWS = 16
INT4_KERNEL_ROWS = 64
# Rows up to which `native`'s kernels run once `pack_for_decoding` has: decoding, a batch of
# decoding rows, a speculative verify step, a short prompt. They quantize activations per row and
# re-read each weight row from cache for every activation row (int4: up to three rows share its
# unpacked codes), so their cost grows with the rows; the slabs' cost is a dequantizing pass and a
# bf16 matmul whose weight oneDNN reorders anew. Measured on an Intel Xeon (Emerald Rapids, AMX, 2
# threads; `benchmarks/bench_quantized_rows.py`): at 64 rows the kernels take 0.68x (int8) and
# 0.85x (int4) of the slabs' time; they cross over near 110 and 80 rows. Not measured on CPUs
# without AMX: their bf16 matmuls (the slabs) are slower, which should move the crossovers up.
DECODE_KERNEL_ROWS = 64
# torch 2.13's int8 kernel reads K in steps of 16 with aligned loads and silently returns garbage
# for other widths (K = 72, 136), so narrower-stepped layers take the dequantizing path.
INT8_KERNEL_K_MULTIPLE = 16
# Weights dequantized at a time on the many-rows path: a 4 MB bf16 slab, big enough for an
# efficient matmul, small enough that its temporaries are reused from the heap rather than
# mapped (and page-faulted) afresh for every slab.
DEQUANT_WEIGHTS = 2**21
ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator gives and the kernels' vector loads need


class Int8Linear(nn.Module):
    """F.linear(x, q * scales[:, None], bias) with an int8 weight: (..., K) -> (..., N)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     dtype=w.dtype, device=w.device)
        if w.is_meta:
            return module
        w32 = w.float()  # (N, K)
        scales = _round_up(w32.abs().amax(dim=1) / INT8_MAX, w.dtype)  # (N,)
        module.weight.copy_((w32 / scales.float()[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX))
        module.scales.copy_(scales)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def forward(self, x: Tensor) -> Tensor:
        if self._decode_weight is not None and x.numel() <= DECODE_KERNEL_ROWS * self.in_features:
            # Decoding: straight to the kernel, bias and dtype included (a few rows: little Python)
            y = native.int8_rows(x.reshape(-1, self.in_features), self.weight, *self._decode_weight)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if y.dtype == x.dtype else y.to(x.dtype)  # fp16: from float32 (a no-op `to` costs a dispatch)
        x2 = _rows(x, self.scales.dtype)  # (M, K)
        if x2.device.type != "cpu":  # untested: dequantize, then the device's matmul
            y = F.linear(x2, self.dequantized().to(x2.dtype))
        elif (self._decode_weight is None and x2.shape[0] <= INT8_KERNEL_ROWS
              and self.in_features % INT8_KERNEL_K_MULTIPLE == 0):
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)  # (M, N)
        else:
            return _finish(_slab_matmul(x2, self.out_features, self._slab, self.bias), None, x)
        return _finish(y, self.bias, x)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._unpack()  # the state dict's weight is plain: load it into a plain buffer
        super()._load_from_state_dict(*args, **kwargs)
        # Assigned tensors may be mapped from a file at any offset; the kernel needs alignment.
        self.weight, self.scales = _aligned(self.weight), _aligned(self.scales)

    # (float32 scales, int32 row sums, float32 bias) for `native.int8_rows` once `pack_for_decoding`
    # has laid `weight` out in row tiles for it, else None (`weight` plain).
    _decode_weight = None

    def pack_for_decoding(self) -> bool:
        """Lay the weight out in row tiles for the VNNI kernel's few-row products (`native`) in place
        of the plain layout, where the kernel runs here and takes this width; returns whether it
        did. It also keeps the row scales in float32 and each row's code sum (N numbers each). The
        state dict is unchanged; loading one or moving the module restores the plain layout."""
        if self._decode_weight is not None:
            return True
        if not (self.weight.device.type == "cpu" and native.int8_kernel_applies(self.in_features)
                and native.kernels() is not None):
            return False
        plain = self.weight.contiguous()
        self._decode_weight = (self.scales.float().contiguous(), native.int8_row_sums(plain), _float_bias(self.bias))
        self.weight = native.to_row_tiles(plain, tile=native.INT8_TILE_ROWS)
        return True

    def _unpack(self) -> None:
        """Back to the plain layout (and no decoding state), if `pack_for_decoding` had run."""
        if self._decode_weight is not None:
            self.weight = self.plain_weight()
            self._decode_weight = None

    def _apply(self, fn, recurse: bool = True):
        self._unpack()  # a move or dtype change: plain, and no derived state to go stale
        return super()._apply(fn, recurse)

    def plain_weight(self) -> Tensor:
        """The (N, K) int8 codes in their plain layout (the state dict's)."""
        return self._weight_rows(0, self.out_features)

    def _weight_rows(self, start: int, end: int) -> Tensor:
        if self._decode_weight is None:
            return self.weight[start:end]
        return native.from_row_tiles(self.weight, start, end, tile=native.INT8_TILE_ROWS)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._decode_weight is not None:
            destination[prefix + "weight"] = self.plain_weight()

    def _slab(self, start: int, end: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        # The scale is per output row, so it multiplies the product instead of the weight:
        # one conversion pass over the slab (int8 -> bf16 is exact), no multiply; from the row
        # tiles by the kernels' library where it laid them out.
        if self._decode_weight is not None and dtype in (torch.bfloat16, torch.float32):
            return native.int8_dequantize(self.weight, start, end, dtype), self.scales[start:end]
        return self._weight_rows(start, end).to(dtype), self.scales[start:end]

    def dequantized(self) -> Tensor:
        """The weight this module represents, (N, K) float32 (exact: q * scale needs 16 bits)."""
        return self.plain_weight().float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """F.linear(x, W, bias) with W stored as 4-bit codes and a scale and zero per group of inputs.

    In memory, on CPU, `weight` is in ATen's packed layout (rows padded to a multiple of 16) and
    `scales_and_zeros` is the kernel's interleaved (G, N_padded, 2) tensor; elsewhere (meta,
    CUDA) both are in the plain layout of the state dict. `packed_for_cpu` says which.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, *,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        codes = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("weight", codes)
        self.register_buffer("scales_and_zeros", torch.empty(groups, out_features, 2, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.packed_for_cpu = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                     dtype=w.dtype, device=w.device)
        if w.is_meta:
            return module
        codes, scales, zeros = _quantize_int4(w, group_size)
        module._set(pack_nibbles(codes), scales, zeros)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def forward(self, x: Tensor) -> Tensor:
        if self._decode_weight is not None and x.numel() <= DECODE_KERNEL_ROWS * self.in_features:
            y = native.int4_rows(x.reshape(-1, self.in_features), self.weight, self._decode_weight, self.group_size,
                                 self._decode_bias)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if y.dtype == x.dtype else y.to(x.dtype)  # fp16: from float32 (a no-op `to` costs a dispatch)
        on_cpu = self.weight.device.type == "cpu"
        if on_cpu != self.packed_for_cpu:  # moved across devices since it was packed
            self._set(*self.plain())
        x2 = _rows(x, self.scales_and_zeros.dtype)  # (M, K)
        if not on_cpu:  # untested: dequantize, then the device's matmul
            y = F.linear(x2, self.dequantized().to(x2.dtype))
        elif self._decode_weight is not None:  # `weight` in the VNNI kernel's layout; many rows
            return _finish(_slab_matmul(x2, self.out_features, self._slab, self.bias), None, x)
        elif x2.shape[0] <= INT4_KERNEL_ROWS:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
            y = y[:, : self.out_features]  # (M, N), without the padding rows
        else:
            return _finish(_slab_matmul(x2, self.out_features, self._slab, self.bias), None, x)
        return _finish(y, self.bias, x)

    def _slab(self, start: int, end: int, dtype: torch.dtype) -> tuple[Tensor, None]:
        """Rows start:end of the dequantized weight, (end - start, K); start is a block boundary."""
        block, form = cpu_int4_layout()
        K, n = self.in_features, end - start
        if self._decode_weight is not None:  # the VNNI kernel's layout: row tiles, read by its library
            if dtype in (torch.bfloat16, torch.float32):  # in float32, rounded once; 2.5x faster than PyTorch's passes
                return native.int4_dequantize(self.weight, self._decode_weight, self.group_size, start, end, dtype), None
            return native.int4_dequantize(self.weight, self._decode_weight, self.group_size, start, end,
                                          torch.float32).to(dtype), None
        if form != "halves" or n % block:  # a partial last block: the general path
            codes = unpack_cpu_rows(self.weight, start, end, K)  # (n, K) uint8
            return _dequantize_int4(codes, self.scales_and_zeros[:, start:end], self.group_size, dtype), None
        # Full blocks straight from the packed bytes: each block is (K, B/2) bytes holding rows
        # 0..B/2-1 in the low nibbles and B/2..B-1 in the high ones, i.e. W.T's layout already.
        nb, half, groups = n // block, block // 2, K // self.group_size
        packed = self.weight.view(-1)[start * K // 2 : end * K // 2].view(nb, K, half)
        codes = torch.empty(K, nb, block, dtype=torch.uint8)  # (K, n): W.T
        # Eight bytes at a time: masking an int64 keeps each byte's low nibble in that byte.
        words = packed.view(torch.int64)  # (nb, K, B/16)
        by_block = codes.view(torch.int64).permute(1, 0, 2)  # (nb, K, B/8)
        torch.bitwise_and(words, LOW_NIBBLES, out=by_block[..., : half // 8])
        torch.bitwise_right_shift(words, 4, out=by_block[..., half // 8 :]).bitwise_and_(LOW_NIBBLES)
        # (q - 8) * scale + zero in `dtype` (a mixed-dtype addcmul takes a slow path): q - 8 is
        # exact in int8 and in bf16, and addcmul rounds once, so each weight is the kernel's value
        # rounded to `dtype`.
        weight_t = torch.empty(groups, self.group_size, n, dtype=dtype)  # (K, n) = W.T
        torch.sub(codes.view(torch.int8).view(weight_t.shape), INT4_OFFSET, out=weight_t)
        sz = self.scales_and_zeros[:, start:end]  # (G, n, 2)
        scale, zero = sz[..., 0].contiguous().unsqueeze(1), sz[..., 1].contiguous().unsqueeze(1)  # (G, 1, n)
        torch.addcmul(zero, weight_t, scale, out=weight_t)
        return weight_t.view(K, n).T, None

    def plain(self) -> tuple[Tensor, Tensor, Tensor]:
        """(weight (N, K // 2) uint8, scales (N, G), zeros (N, G)): the state dict's layout."""
        N, K = self.out_features, self.in_features
        if self._decode_weight is not None:
            weight = pack_nibbles(native.from_kernel_layout(self.weight, 0, N))
        elif self.packed_for_cpu:
            weight = plain_from_cpu(self.weight, N, K)
        else:
            weight = self.weight
        sz = self.scales_and_zeros[:, :N]  # (G, N, 2)
        return weight, sz[..., 0].T.contiguous(), sz[..., 1].T.contiguous()

    def _set(self, weight: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """Store plain (N, K // 2) nibbles with (N, G) scales and zeros, packed for ATen on CPU."""
        self._decode_weight = None
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
        if weight.device.type == "cpu":
            weight, sz = pack_for_cpu(weight, sz, self.in_features)
        self.weight, self.scales_and_zeros = weight, sz
        self.packed_for_cpu = weight.device.type == "cpu"

    # The (N, 2, G) scales and zeros (bf16 or float32) of `native.int4_rows` once `pack_for_decoding` has
    # laid `weight` out for it (on CPU, instead of ATen's layout), else None.
    _decode_weight = None
    _decode_bias = None  # the bias in float32 for the kernel

    def pack_for_decoding(self) -> bool:
        """Lay the weight out for `native`'s VNNI kernel in place of ATen's layout, where it runs
        here and the groups fit (`native.int4_kernel_applies`); returns whether it did. Up to
        DECODE_KERNEL_ROWS rows then run that kernel and more rows dequantize slabs from it.
        The state dict is unchanged; loading one or moving the module restores ATen's layout."""
        if self._decode_weight is not None:
            return True
        if not (self.packed_for_cpu and native.int4_kernel_applies(self.in_features, self.group_size)
                and native.kernels() is not None):
            return False
        weight, scales, zeros = self.plain()
        self.weight, self._decode_weight = native.to_kernel_layout(unpack_nibbles(weight), scales, zeros)
        self._decode_bias = _float_bias(self.bias)
        return True

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._decode_weight is not None:  # moved or converted: back to the standard layout
            self._set(*self.plain())
        return self

    def dequantized(self) -> Tensor:
        """The weight this module represents, (N, K) float32, as the kernel computes it."""
        weight, scales, zeros = self.plain()
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1)  # (G, N, 2)
        return _dequantize_int4(unpack_nibbles(weight), sz, self.group_size, torch.float32)

    # The state dict holds the plain layout, whatever the device (see the module docstring).
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        weight, scales, zeros = self.plain()
        destination[prefix + "weight"], destination[prefix + "scales"] = weight, scales
        destination[prefix + "zeros"] = zeros
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        shapes = int4_state_shapes(self.in_features, self.out_features, self.group_size, self.bias is not None)
        found = {}
        for name, shape in shapes.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
            elif tuple(state_dict[key].shape) != shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(state_dict[key].shape)}, the shape in current model is {shape}.")
            else:
                found[name] = state_dict[key]
        if strict:
            unexpected_keys.extend(key for key in state_dict
                                   if key.startswith(prefix) and key[len(prefix):] not in shapes)
        if len(found) != len(shapes):
            return
        device = self.weight.device if not self.weight.is_meta else found["weight"].device
        dtype = self.scales_and_zeros.dtype
        self._set(found["weight"].to(device, torch.uint8), found["scales"].to(device, dtype),
                  found["zeros"].to(device, dtype))
        if self.bias is not None:
            self.bias = found["bias"].to(device, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


QuantizedLinear = (Int8Linear, Int4Linear)


def int4_state_shapes(in_features: int, out_features: int, group_size: int,
                      bias: bool) -> dict[str, tuple[int, ...]]:
    """{name: shape} of an Int4Linear's state dict."""
    groups = in_features // group_size
    shapes = {"weight": (out_features, in_features // 2), "scales": (out_features, groups),
              "zeros": (out_features, groups)}
    return {**shapes, "bias": (out_features,)} if bias else shapes


# --------------------------------------------------------------------------- the arithmetic


def _round_up(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Positive fp32 `values` in `dtype`, rounded up (never down), at least the smallest normal."""
    rounded = values.clamp(min=torch.finfo(dtype).tiny).to(dtype)
    below = rounded.float() < values
    return torch.where(below, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)


def _quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(codes (N, K) uint8 in 0..15, scales (N, G), zeros (N, G)) for a weight (N, K).

    The zero is the group's value for code 8. Rounding it to the model's dtype moves the grid, so
    the scale is then widened until the grid [zero - 8 s, zero + 7 s] still covers the group's
    [min, max]: every weight is within s / 2 of its code's value, none is clipped.
    """
    N, K = w.shape
    wg = w.float().view(N, K // group_size, group_size)  # (N, G, g)
    low, high = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, G)
    scale = (high - low) / (INT4_LEVELS - 1)
    zeros = (low + INT4_OFFSET * scale).to(w.dtype)
    z = zeros.float()
    reach_low, reach_high = (z - low) / INT4_OFFSET, (high - z) / (INT4_LEVELS - 1 - INT4_OFFSET)
    scale = torch.maximum(scale, torch.maximum(reach_low, reach_high))
    scales = _round_up(scale, w.dtype)
    codes = ((wg - z[..., None]) / scales.float()[..., None]).round_().add_(INT4_OFFSET)
    codes.clamp_(0, INT4_LEVELS - 1)
    return codes.to(torch.uint8).view(N, K), scales, zeros


def _dequantize_int4(codes: Tensor, scales_and_zeros: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """(codes - 8) * scale + zero for codes (n, K) and their (G, n, 2) scales and zeros -> (n, K)."""
    n, K = codes.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # (n, G, 2)
    scale, zero = sz[..., 0:1], sz[..., 1:2]  # (n, G, 1)
    shifted_zero = zero - INT4_OFFSET * scale  # code 0's value
    w = torch.addcmul(shifted_zero, codes.view(n, K // group_size, group_size), scale)  # (n, G, g)
    return w.reshape(n, K).to(dtype)



# --------------------------------------------------------------------------- decoding kernels


def pack_for_decoding(module: nn.Module) -> int:
    """`pack_for_decoding` on every quantized Linear in `module`; returns how many it prepared
    for `native`'s kernels (each re-lays its weight out in row tiles, in place: ~1 ns a weight)."""
    return sum(layer.pack_for_decoding() for layer in module.modules() if isinstance(layer, QuantizedLinear))


def compile_refusal(layer: Int8Linear | Int4Linear, rows: int) -> str | None:
    """Why torch.compile cannot take `layer`'s decode step of `rows` rows, or None. Only the VNNI
    kernels' path traces (as `native`'s custom ops); ATen's int8/int4 paths check the activations'
    alignment by address, which Dynamo cannot trace, and so do more rows than DECODE_KERNEL_ROWS."""
    if layer._decode_weight is None:
        return f"it has no VNNI decoding kernel: {_no_kernel_reason(layer)}"
    if rows > DECODE_KERNEL_ROWS:
        return (f"a batch of {rows} rows is more than its decoding kernel takes ({DECODE_KERNEL_ROWS}); "
                f"split the batch")
    return None


def _no_kernel_reason(layer: Int8Linear | Int4Linear) -> str:
    if layer.weight.device.type != "cpu":
        return f"the kernels run on the CPU, its weight is on {layer.weight.device}"
    reason = native.unavailable_reason()
    if reason is not None:
        return reason
    if isinstance(layer, Int8Linear) and not native.int8_kernel_applies(layer.in_features):
        return f"its input width {layer.in_features} is not a multiple of 64"
    if isinstance(layer, Int4Linear) and not native.int4_kernel_applies(layer.in_features, layer.group_size):
        fits = native.int4_kernel_applies(layer.in_features, native.BLOCK)
        fix = "; quantize with group size 128 or 256" if fits else ""
        return (f"its group size {layer.group_size} is not a multiple of {native.BLOCK} dividing its input width "
                f"{layer.in_features}{fix}")
    return ("it is not prepared for decoding: call andromeda.inference.quantize.pack_for_decoding(model) "
            "(load_for_inference does)")


# --------------------------------------------------------------------------- shared helpers


def _rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x (..., K) as contiguous, aligned (M, K) rows in the kernels' dtype."""
    return _aligned(x.reshape(-1, x.shape[-1]).to(dtype).contiguous())


def _aligned(t: Tensor) -> Tensor:
    """`t`, or a copy of it starting on a 64-byte boundary.

    ATen's int8 kernel uses aligned vector loads: torch 2.13's `_weight_int8pack_mm` crashes
    (SIGSEGV) on activations that start 2..16 bytes off a 32-byte boundary, and on some weights
    mapped from a file at an odd offset. PyTorch's allocator aligns to 64 bytes; views and
    memory-mapped checkpoints need not be.
    """
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone(memory_format=torch.contiguous_format)


def _float_bias(bias: Tensor | None) -> Tensor | None:
    """A float32 copy of a bias for the decoding kernels (they add it before rounding to bf16, as
    `_finish` does: the same numbers)."""
    return None if bias is None else bias.detach().float().contiguous()


def _finish(y: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """Add the bias, restore x's leading dimensions and dtype: (M, N) -> (..., N)."""
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _slab_matmul(x: Tensor, out_features: int, slab, bias: Tensor | None) -> Tensor:
    """x (M, K) @ W.T + bias for many rows, dequantizing about DEQUANT_WEIGHTS of W at a time.

    `slab(start, end, dtype)` gives (weight rows (n, K), per-row output scale or None). Slabs
    are whole multiples of 64 rows, so each starts on an int4 block boundary. Each slab's
    product is written once into its columns of the output, bias included.
    """
    M, K = x.shape
    rows = max(64, DEQUANT_WEIGHTS // K // 64 * 64)
    y = torch.empty(M, out_features, dtype=x.dtype, device=x.device)  # (M, N)
    for start in range(0, out_features, rows):
        end = min(start + rows, out_features)
        weight, scale = slab(start, end, x.dtype)
        b = None if bias is None else bias[start:end].to(x.dtype)
        if scale is None:
            part = F.linear(x, weight, b)  # (M, n)
        else:
            part = F.linear(x, weight)
            scale = scale.to(x.dtype)
            part = part.mul_(scale) if b is None else torch.addcmul(b, part, scale)
        if end - start == out_features:
            return part
        y[:, start:end] = part
    return y
