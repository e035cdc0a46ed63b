"""Weight-only int8 and int4 quantization of every Linear, for decoding past the bf16 bandwidth bound.

Batch-1 decoding reads every weight once per token, so its speed is weight bytes over memory
bandwidth. Storing weights in 8 or 4 bits and dequantizing inside the matrix-vector kernel (as
gpt-fast and torchchat do) cuts the bytes 2x or ~3.8x; activations stay in the model's dtype.
`quantize` swaps every nn.Linear for its `Int8Linear` or `Int4Linear` (`quantized_linear`: the
schemes, the kernels and their dispatch; `int4_packing`: ATen's int4 layout).

Checkpoints. `state_dict()` holds plain tensors a safetensors file can store: int8 `weight`
(N, K) and `scales` (N,); int4 `weight` uint8 (N, K // 2) with two values per byte (column 2j in
the low nibble, 2j + 1 in the high), `scales` and `zeros` (N, G); `bias` (N,) where the Linear had
one. ATen's packed int4 layout depends on the CPU's vector width, so it is built on load, never
stored. `build_quantized_transformer` builds the empty model on the meta device for a loader to
validate names and shapes against and to load into (`load_quantized_transformer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..choices import DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, SCHEMES
from ..config import Config
from ..weights import SafetensorsFile
from .laid_out import LaidOutLinear
from .quantized_linear import (
    ALIGNMENT,
    DECODE_KERNEL_ROWS,
    INT4_KERNEL_ROWS,
    INT8_KERNEL_ROWS,
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    int4_state_shapes,
    pack_for_decoding,
)


def quantize(module: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace every nn.Linear inside `module` (a Transformer, an Andromeda, any module; prepacked or
    row-tiled bf16 Linears too) by its int8 or int4 version, in place, and return `module`.

    Every layer is checked before any is replaced, so a bad group size leaves the model as it
    was. Biases are kept. Each Linear is freed as soon as it is replaced (if nothing else holds
    it), so peak memory is the model plus a few fp32 copies of its largest layer.
    """
    check_scheme(scheme, group_size)
    names = [name for name, child in module.named_modules() if _dense_linear(child)]
    if scheme == "int4":
        for name in names:
            check_int4_width(name, module.get_submodule(name).in_features, group_size)
    for name in names:  # by name, so no list holds on to the replaced Linears
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):  # prepacked or row-tiled bf16: its plain Linear first
            linear = linear.to_linear()
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
    if found and any(_dense_linear(m) for m in module.modules()):
        raise ValueError("the model is only partly quantized (some nn.Linear layers remain)")
    return found.pop() if found else None


def _dense_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a bf16 Linear laid out for a kernel (`laid_out.LaidOutLinear`: prepacked or
    row-tiled; its plain weight by `dense_weight`, an nn.Linear by `to_linear`)."""
    return isinstance(module, (nn.Linear, LaidOutLinear))


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
    if _dense_linear(module):
        return module.dense_weight()
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


def load_quantized_transformer(config: Config, source: Mapping[str, Tensor] | SafetensorsFile | str | Path,
                               scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """The quantized Transformer holding `source`: a state dict, or a safetensors file (a path, or
    one whose header is read already).

    Every name, shape and dtype is checked first (a ValueError lists what does not match).
    The model is built on the meta device and each quantized Linear is loaded on its own, so
    from a file the peak memory is the model plus one layer (int4 weights are repacked for the
    CPU as they load; a whole state dict held at once would double the int4 peak). A file is
    read into fresh tensors rather than memory-mapped (see `weights`).
    """
    if isinstance(source, (str, Path)):
        source = SafetensorsFile(source)
    if isinstance(source, SafetensorsFile):
        with source:
            return _load_quantized(config, {n: (e.shape, e.dtype) for n, e in source.entries.items()}, source.read,
                                   scheme, group_size)
    found = {n: (tuple(t.shape), t.dtype) for n, t in source.items()}
    return _load_quantized(config, found, lambda name, scratch=None: source[name], scheme, group_size)


def _load_quantized(config: Config, found: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                    get: Callable[..., Tensor], scheme: str, group_size: int) -> nn.Module:
    """`load_quantized_transformer` given the (shape, dtype) of every tensor found and `get(name,
    scratch=None)`, which gives one (read into `scratch` when that is given and it can be)."""
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


__all__ = [
    "DECODE_KERNEL_ROWS", "DEFAULT_GROUP_SIZE", "INT4_GROUP_SIZES", "INT4_KERNEL_ROWS", "INT8_KERNEL_ROWS", "SCHEMES", "Int4Linear",
    "Int8Linear", "QuantizedLinear", "build_quantized_transformer", "check_int4_width", "check_scheme",
    "dequantize_weight", "int4_state_shapes", "load_quantized_transformer", "quantization_of", "quantize",
    "pack_for_decoding", "quantized_state_dict_shapes",
]
