"""Weight-only int8 and int4 quantization of every Linear, for decoding past the bf16 bandwidth bound.

Shape letters: M rows of activations (batch x positions), K input features, N output features,
G = K // group_size groups per output row.

Batch-1 decoding reads every weight once per token, so its speed is weight bytes over memory
bandwidth. Storing weights in 8 or 4 bits and dequantizing inside the matrix-vector kernel (as
gpt-fast and torchchat do) cuts the bytes 2x or ~3.8x; activations stay in the model's dtype.

- int8: symmetric, one scale per output row: w[n, k] = q[n, k] * scales[n], q in [-127, 127].
  Kernel: `torch._weight_int8pack_mm` (ATen, AVX-512/AVX2), which streams the int8 weight.
- int4: asymmetric, one scale and zero per group of `group_size` inputs of a row:
  w[n, k] = (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g], q in [0, 15] -- the
  convention of ATen's "tinygemm" kernels. Kernel: `torch._weight_int4pack_mm_for_cpu` on the
  weight packed by `torch._convert_weight_to_int4pack_for_cpu`.

The kernels win for a few rows (decoding; see INT8_KERNEL_ROWS); for a prefill they are 2-4x
slower than a bf16 matmul, so there the weight is dequantized a 4 MB slab at a time and multiplied
by oneDNN: nothing weight-sized is kept or allocated per call, and the cost over bf16 is the
dequantizing pass (a conversion for int8, a few elementwise passes for int4).

Scales and zeros are stored in the model's dtype, rounded so the stored grid still covers each
row's (or group's) range: every weight is then within scale / 2 of its quantized value.

Checkpoints. `state_dict()` holds plain tensors a safetensors file can store: int8 `weight`
(N, K) and `scales` (N,); int4 `weight` uint8 (N, K // 2) with two values per byte (column 2j in
the low nibble, 2j + 1 in the high), `scales` and `zeros` (N, G); `bias` (N,) where the Linear had
one. ATen's packed int4 layout depends on the CPU's vector width, so it is built on load, never
stored. `build_quantized_transformer` builds the empty model on the meta device for a loader to
validate names and shapes against and to load into (`load_state_dict(..., assign=True)`).

On CUDA (untested: no GPU was available) the modules dequantize the whole weight and call
F.linear: correct, but slower than bf16.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the block sizes ATen's int4 kernels are built for
DEFAULT_GROUP_SIZE = 128

INT8_MAX = 127  # symmetric: -127..127, so negating a weight negates its code
INT4_LEVELS = 16  # codes 0..15
INT4_OFFSET = 8  # the kernels dequantize (q - 8) * scale + zero

# Rows (batch x positions) up to which the packed kernels are used. Their time grows with the
# rows (they dequantize per row block), while dequantizing slabs to bf16 for oneDNN's matmul costs
# a fixed pass over the weight: cheap for int8 (a conversion), ~0.7 ns a weight for int4. Measured
# crossovers on an AMD EPYC Zen 5 (AVX-512 BF16), torch 2.13, one thread, layers of the 2.5 B
# default: int8 16-24 rows, int4 64-128 rows.
INT8_KERNEL_ROWS = 16
INT4_KERNEL_ROWS = 64
# torch 2.13's int8 kernel reads K in steps of 16 with aligned loads and silently returns garbage
# for other widths (K = 72, 136), so narrower-stepped layers take the dequantizing path.
INT8_KERNEL_K_MULTIPLE = 16
# Weights dequantized at a time on the many-rows path: a 4 MB bf16 slab, big enough for an
# efficient matmul, small enough that its temporaries are reused from the heap rather than
# mapped (and page-faulted) afresh for every slab.
DEQUANT_WEIGHTS = 2**21
# Rows repacked or unpacked at a time when loading and saving int4 weights.
PACK_ROWS = 1024
# ATen packs int4 weights in blocks of up to 64 output rows and needs N divisible by this.
INT4_ROW_MULTIPLE = 16
_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # the low nibble of each byte of an int64
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
        x2 = _rows(x, self.scales.dtype)  # (M, K)
        if x2.device.type != "cpu":  # untested: dequantize, then the device's matmul
            y = F.linear(x2, self.dequantized().to(x2.dtype))
        elif x2.shape[0] <= INT8_KERNEL_ROWS and self.in_features % INT8_KERNEL_K_MULTIPLE == 0:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)  # (M, N)
        else:
            return _finish(_slab_matmul(x2, self.out_features, self._slab, self.bias), None, x)
        return _finish(y, self.bias, x)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # Assigned tensors may be mapped from a file at any offset; the kernel needs alignment.
        self.weight, self.scales = _aligned(self.weight), _aligned(self.scales)

    def _slab(self, start: int, end: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        # The scale is per output row, so it multiplies the product instead of the weight:
        # one conversion pass over the slab (int8 -> bf16 is exact), no multiply.
        return self.weight[start:end].to(dtype), self.scales[start:end]

    def dequantized(self) -> Tensor:
        """The weight this module represents, (N, K) float32 (exact: q * scale needs 16 bits)."""
        return self.weight.float() * self.scales.float()[:, None]

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
        module._set(_pack_nibbles(codes), scales, zeros)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def forward(self, x: Tensor) -> Tensor:
        on_cpu = self.weight.device.type == "cpu"
        if on_cpu != self.packed_for_cpu:  # moved across devices since it was packed
            self._set(*self.plain())
        x2 = _rows(x, self.scales_and_zeros.dtype)  # (M, K)
        if not on_cpu:  # untested: dequantize, then the device's matmul
            y = F.linear(x2, self.dequantized().to(x2.dtype))
        elif x2.shape[0] <= INT4_KERNEL_ROWS:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
            y = y[:, : self.out_features]  # (M, N), without the padding rows
        else:
            return _finish(_slab_matmul(x2, self.out_features, self._slab, self.bias), None, x)
        return _finish(y, self.bias, x)

    def _slab(self, start: int, end: int, dtype: torch.dtype) -> tuple[Tensor, None]:
        """Rows start:end of the dequantized weight, (end - start, K); start is a block boundary."""
        block, form = _cpu_int4_layout()
        K, n = self.in_features, end - start
        if form != "halves" or n % block:  # a partial last block: the general path
            codes = _unpack_cpu_rows(self.weight, start, end, K)  # (n, K) uint8
            return _dequantize_int4(codes, self.scales_and_zeros[:, start:end], self.group_size, dtype), None
        # Full blocks straight from the packed bytes: each block is (K, B/2) bytes holding rows
        # 0..B/2-1 in the low nibbles and B/2..B-1 in the high ones, i.e. W.T's layout already.
        nb, half, groups = n // block, block // 2, K // self.group_size
        packed = self.weight.view(-1)[start * K // 2 : end * K // 2].view(nb, K, half)
        codes = torch.empty(K, nb, block, dtype=torch.uint8)  # (K, n): W.T
        # Eight bytes at a time: masking an int64 keeps each byte's low nibble in that byte.
        words = packed.view(torch.int64)  # (nb, K, B/16)
        by_block = codes.view(torch.int64).permute(1, 0, 2)  # (nb, K, B/8)
        torch.bitwise_and(words, _LOW_NIBBLES, out=by_block[..., : half // 8])
        torch.bitwise_right_shift(words, 4, out=by_block[..., half // 8 :]).bitwise_and_(_LOW_NIBBLES)
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
        if self.packed_for_cpu:
            weight = _plain_from_cpu(self.weight, N, K)
        else:
            weight = self.weight
        sz = self.scales_and_zeros[:, :N]  # (G, N, 2)
        return weight, sz[..., 0].T.contiguous(), sz[..., 1].T.contiguous()

    def _set(self, weight: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """Store plain (N, K // 2) nibbles with (N, G) scales and zeros, packed for ATen on CPU."""
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
        if weight.device.type == "cpu":
            weight, sz = _pack_for_cpu(weight, sz, self.in_features)
        self.weight, self.scales_and_zeros = weight, sz
        self.packed_for_cpu = weight.device.type == "cpu"

    def dequantized(self) -> Tensor:
        """The weight this module represents, (N, K) float32, as the kernel computes it."""
        weight, scales, zeros = self.plain()
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1)  # (G, N, 2)
        return _dequantize_int4(_unpack_nibbles(weight), sz, self.group_size, torch.float32)

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


def quantize(module: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace every nn.Linear inside `module` (a Transformer, an Andromeda, any module) by its
    int8 or int4 version, in place, and return `module`.

    Every layer is checked before any is replaced, so a bad group size leaves the model as it
    was. Biases are kept. Each Linear is freed as soon as it is replaced (if nothing else holds
    it), so peak memory is the model plus a few fp32 copies of its largest layer.
    """
    check_scheme(scheme, group_size)
    names = [name for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    if scheme == "int4":
        for name in names:
            check_int4_width(name, module.get_submodule(name).in_features, group_size)
    for name in names:  # by name, so no list holds on to the replaced Linears
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if scheme == "int8":
            setattr(parent, attr, Int8Linear.from_linear(linear))
        else:
            setattr(parent, attr, Int4Linear.from_linear(linear, group_size))
    return module


def quantization_of(module: nn.Module) -> tuple[str, int | None] | None:
    """(scheme, group_size) of a model `quantize` has converted (group_size None for int8, which
    has one scale per row), or None if it holds no quantized Linear. Raises ValueError for a
    mixture, which no checkpoint can describe."""
    found = {("int8", None) if isinstance(m, Int8Linear) else ("int4", m.group_size)
             for m in module.modules() if isinstance(m, QuantizedLinear)}
    if len(found) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(found)}; quantize it with one")
    if found and any(isinstance(m, nn.Linear) for m in module.modules()):
        raise ValueError("the model is only partly quantized (some nn.Linear layers remain)")
    return found.pop() if found else None


def check_scheme(scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Raise a ValueError naming the problem for an unknown scheme or an unusable group size."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES} (ATen's int4 kernels "
                         f"support these), got {group_size}")


def check_int4_width(name: str, in_features: int, group_size: int) -> None:
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input width "
                         f"{in_features} of layer {name!r}; choose a group size from "
                         f"{INT4_GROUP_SIZES} that divides it")


def dequantize_weight(module: nn.Module) -> Tensor:
    """The (N, K) weight a Linear or quantized Linear represents: a Linear's own weight, or a
    quantized one's in float32 (where its value is exact)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if isinstance(module, QuantizedLinear):
        return module.dequantized()
    raise TypeError(f"expected an nn.Linear or a quantized Linear, got {type(module).__name__}")


def build_quantized_transformer(config: Config, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                                dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """An empty quantized Transformer on the meta device, to validate a quantized checkpoint's
    names and shapes against and to load it into: `net.load_state_dict(state, assign=True)`
    (int4 weights are packed for the CPU as they load).
    """
    from ..model import Transformer  # the model package imports nothing from inference

    check_scheme(scheme, group_size)
    with torch.device("meta"):
        net = Transformer(config).to(dtype)
    return quantize(net, scheme, group_size)


def quantized_state_dict_shapes(
    config: Config, scheme: str, group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype = torch.bfloat16
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of every tensor a quantized checkpoint of this config holds."""
    net = build_quantized_transformer(config, scheme, group_size, dtype)
    return {name: (tuple(t.shape), t.dtype) for name, t in net.state_dict().items()}


def load_quantized_transformer(config: Config, source: Mapping[str, Tensor] | str | Path, scheme: str,
                               group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """The quantized Transformer holding `source`: a state dict, or a safetensors file.

    Every name, shape and dtype is checked first (a ValueError lists what does not match).
    The model is built on the meta device and each quantized Linear is loaded on its own, so
    from a file the peak memory is the model plus one layer (int4 weights are repacked for the
    CPU as they load; a whole state dict held at once would double the int4 peak). A file is
    read into fresh tensors rather than memory-mapped: safetensors aligns data to 8 bytes, the
    kernels want 64 (see `_aligned`), and mapped pages would count twice while being copied.
    """
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, Path)):
            entries, data_start = _safetensors_entries(source)
            found = {n: (shape, dtype) for n, (shape, dtype, _, _) in entries.items()}
            file = stack.enter_context(open(source, "rb"))

            def get(name: str, scratch: Tensor | None = None) -> Tensor:
                return _read_tensor(file, data_start, entries[name], name, scratch)
        else:
            found = {n: (tuple(t.shape), t.dtype) for n, t in source.items()}

            def get(name: str, scratch: Tensor | None = None) -> Tensor:
                return source[name]
        dtype = found.get("token_emb.weight", (None, torch.bfloat16))[1]
        expected = quantized_state_dict_shapes(config, scheme, group_size, dtype)
        problems = [f"missing {n}" for n in expected if n not in found]
        problems += [f"unexpected {n}" for n in found if n not in expected]
        problems += [f"{n}: {found[n][0]} {found[n][1]}, expected {shape} {dt}"
                     for n, (shape, dt) in expected.items() if n in found and found[n] != (shape, dt)]
        if problems:
            raise ValueError(f"weights do not match a {scheme} (group size {group_size}) model of this "
                             f"config: " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
        net = build_quantized_transformer(config, scheme, group_size, dtype)
        scratch = torch.empty(0, dtype=torch.uint8)
        loaded = set()
        for name, module in net.named_modules():
            if isinstance(module, QuantizedLinear):
                names = [n for n in expected if n.rpartition(".")[0] == name]
                if isinstance(module, Int4Linear):
                    state, scratch = _int4_layer_state(names, expected, get, scratch)
                else:
                    state = {n.rpartition(".")[2]: get(n) for n in names}
                module.load_state_dict(state, strict=True, assign=True)
                loaded.update(names)
        rest = {n: get(n) for n in expected if n not in loaded}  # embeddings, norms: not quantized
        net.load_state_dict(rest, strict=False, assign=True)
    return net.eval()


def _int4_layer_state(names: list[str], expected, get, scratch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """({local name: tensor} of one Int4Linear, the scratch buffer).

    Its weight, scales and zeros are repacked into new tensors as they load, so they are read
    into one reused buffer (grown when too small): no layer leaves a hole in the heap behind it.
    The bias is kept as read.
    """
    reused = [n for n in names if not n.endswith(".bias")]
    sizes = [-(-math.prod(expected[n][0]) * expected[n][1].itemsize // ALIGNMENT) * ALIGNMENT for n in reused]
    if sum(sizes) > scratch.numel():
        scratch = torch.empty(sum(sizes), dtype=torch.uint8)
    state, offset = {}, 0
    for n in names:
        if n in reused:
            shape, dtype = expected[n]
            out = scratch[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            state[n.rpartition(".")[2]] = get(n, out)
            offset += sizes[reused.index(n)]
        else:
            state[n.rpartition(".")[2]] = get(n)
    return state, scratch


def int4_state_shapes(in_features: int, out_features: int, group_size: int,
                      bias: bool) -> dict[str, tuple[int, ...]]:
    """{name: shape} of an Int4Linear's state dict."""
    groups = in_features // group_size
    shapes = {"weight": (out_features, in_features // 2), "scales": (out_features, groups),
              "zeros": (out_features, groups)}
    return {**shapes, "bias": (out_features,)} if bias else shapes


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "I8": torch.int8, "U8": torch.uint8}


def _safetensors_entries(path: str | Path) -> tuple[dict[str, tuple], int]:
    """({name: (shape, dtype, start, end)}, offset of the data) from a safetensors file's header:
    8 bytes of little-endian header length, then a JSON object of byte ranges in the data."""
    with open(path, "rb") as file:
        try:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file: {err}") from None
    header.pop("__metadata__", None)
    entries = {name: (tuple(e["shape"]), _SAFETENSORS_DTYPES.get(e["dtype"]), *e["data_offsets"])
               for name, e in header.items()}
    return entries, 8 + size


def _read_tensor(file, data_start: int, entry, name: str, out: Tensor | None = None) -> Tensor:
    shape, dtype, start, end = entry
    tensor = torch.empty(shape, dtype=dtype) if out is None else out
    file.seek(data_start + start)
    if file.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - start:
        raise ValueError(f"{file.name} ends inside tensor {name} (truncated?)")
    return tensor


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


def _pack_nibbles(codes: Tensor) -> Tensor:
    """(N, K) codes in 0..15 -> (N, K // 2) uint8: column 2j low nibble, 2j + 1 high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_nibbles(packed: Tensor) -> Tensor:
    """(N, K // 2) uint8 -> (N, K) codes; the inverse of _pack_nibbles."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


# ATen's CPU int4 layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel):
# output rows go in blocks of BLOCK_N (64 with AVX-512, 32 otherwise), each block stored as
# (K, BLOCK_N // 2) bytes. In a full block on AVX-512/AVX2 the low nibbles hold rows 0..B/2-1 and
# the high nibbles rows B/2..B-1 ("halves"); in a last, partial block and without AVX2, byte j
# holds rows 2j (low) and 2j + 1 (high) ("pairs"). The layout is found once per process by
# packing a probe and comparing, so a PyTorch that packs differently fails loudly, not silently.
_LAYOUT_CANDIDATES = ((64, "halves"), (32, "halves"), (32, "pairs"), (16, "pairs"), (64, "pairs"))


@functools.cache
def _cpu_int4_layout() -> tuple[int, str]:
    """(BLOCK_N, full-block format) of this process's ATen int4 packing, checked both ways."""
    K = 4
    codes = torch.randint(0, INT4_LEVELS, (112, K), dtype=torch.uint8)  # 112 = 64 + 48: full and partial blocks
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    for layout in _LAYOUT_CANDIDATES:
        if (torch.equal(_unpack_layout(packed, 0, codes.shape[0], K, *layout), codes)
                and torch.equal(_pack_layout(codes, *layout), packed)):
            return layout
    raise RuntimeError("this PyTorch build packs int4 weights in a layout andromeda does not know; "
                       "use --quantize int8, or a torch version whose layout is listed in "
                       "andromeda/inference/quantize.py")


def _unpack_layout(packed: Tensor, start: int, end: int, K: int, block: int, form: str) -> Tensor:
    """Codes (end - start, K) uint8 of rows start:end of an ATen-packed weight; `start` is a
    multiple of `block`, `end` of 16 or the padded row count."""
    rows = packed.shape[0]
    flat = packed.view(-1)
    out = torch.empty(end - start, K, dtype=torch.uint8, device=packed.device)
    full_end = min(end, rows // block * block)
    if full_end > start:
        nb = (full_end - start) // block
        blocks = flat[start * K // 2 : full_end * K // 2].view(nb, K, block // 2)  # (nb, K, B/2)
        low, high = blocks & 0xF, blocks >> 4
        if form == "halves":
            codes = torch.cat([low, high], dim=-1)  # (nb, K, B)
        else:
            codes = torch.stack([low, high], dim=-1).view(nb, K, block)
        out[: full_end - start].view(nb, block, K).copy_(codes.transpose(1, 2))
    if end > full_end:  # the partial last block, always in pairs
        tail = end - full_end
        last = flat[full_end * K // 2 : end * K // 2].view(K, tail // 2)
        out[full_end - start :] = torch.stack([last & 0xF, last >> 4], dim=-1).view(K, tail).T
    return out


def _pack_layout(codes: Tensor, block: int, form: str) -> Tensor:
    """The inverse of _unpack_layout for a whole weight: codes (N, K), N a multiple of 16 ->
    ATen's packed (N, K // 2) uint8."""
    N, K = codes.shape
    out = torch.empty(N, K // 2, dtype=torch.uint8, device=codes.device)
    flat = out.view(-1)
    full_end = N // block * block
    if full_end:
        nb, half = full_end // block, block // 2
        by_k = codes[:full_end].view(nb, block, K).transpose(1, 2)  # (nb, K, B)
        if form == "halves":
            low, high = by_k[..., :half], by_k[..., half:]
        else:
            low, high = by_k[..., 0::2], by_k[..., 1::2]
        torch.bitwise_or(low, high << 4, out=flat[: full_end * K // 2].view(nb, K, half))
    if N > full_end:
        last = codes[full_end:].T  # (K, tail)
        torch.bitwise_or(last[:, 0::2], last[:, 1::2] << 4, out=flat[full_end * K // 2 :].view(K, -1))
    return out


def _unpack_cpu_rows(packed: Tensor, start: int, end: int, K: int) -> Tensor:
    """Codes (end - start, K) of rows start:end (not past the real rows) of a CPU-packed weight."""
    padded_end = min(packed.shape[0], -(-end // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE)
    return _unpack_layout(packed, start, padded_end, K, *_cpu_int4_layout())[: end - start]


def _pack_for_cpu(weight: Tensor, scales_and_zeros: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Plain (N, K // 2) nibbles and (G, N, 2) scales/zeros -> ATen's packed weight and the
    scales/zeros padded to the same row count (a multiple of 16; pad rows are zero)."""
    layout = _cpu_int4_layout()
    N = weight.shape[0]
    padded = -(-N // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
    if padded != N:
        weight = F.pad(weight, (0, 0, 0, padded - N))
        scales_and_zeros = F.pad(scales_and_zeros, (0, 0, 0, padded - N))
    packed = torch.empty_like(weight)
    for i in range(0, padded, PACK_ROWS):  # PACK_ROWS is a multiple of every block size
        packed[i : i + PACK_ROWS] = _pack_layout(_unpack_nibbles(weight[i : i + PACK_ROWS]), *layout)
    return packed, scales_and_zeros.contiguous()


def _plain_from_cpu(packed: Tensor, N: int, K: int) -> Tensor:
    """The plain (N, K // 2) nibbles of a CPU-packed weight, PACK_ROWS rows at a time."""
    plain = torch.empty(N, K // 2, dtype=torch.uint8, device=packed.device)
    for i in range(0, N, PACK_ROWS):
        end = min(i + PACK_ROWS, N)
        plain[i:end] = _pack_nibbles(_unpack_cpu_rows(packed, i, end, K))
    return plain


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
