"""bf16 Linears with their weight packed once for oneDNN: batch-1 CPU decoding at the bandwidth bound.

Shape letters: M rows of activations (batch x positions), K input features, N output features.

On a CPU with AVX-512 BF16 or AMX, PyTorch computes a bf16 `F.linear` with oneDNN, which first
reorders the plain (N, K) weight into its blocked layout -- on every call. For one row that
reorder (a read and a write of the whole weight) costs more than the product, so decoding runs
at about half the memory-bandwidth bound. `PackedLinear` reorders once, when the model is
prepared, and calls the same oneDNN kernel on the packed weight
(`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise`, the pair Inductor's CPU
freezing path uses): the same products bit for bit, 2-3x faster at one row, no slower for a
prefill, and nothing process-global is switched (`torch.backends.mkldnn` stays as it is).
Measured on an AMD EPYC Zen 5 (AVX-512 BF16, 2 threads): the 2.5 B default decodes at 9.0
tok/s instead of 5.9 (93% of its bound instead of 61%), prefills 1024 tokens as fast, and packs
in 1.9 s; see `benchmarks/bench_decode.py --big`. On Intel Xeons with AMX the default path
reorders just the same; the speed-up there is expected, not measured.

The packed weight is an opaque oneDNN tensor, and that decides what a PackedLinear can do:

- It holds only the packed copy: no dense weight beside it, so a prepacked model takes the
  memory of the plain one.
- Inference only. The oneDNN op has no backward (autograd would silently produce wrong
  gradients), so forward raises if a gradient is wanted; `unpack` gives nn.Linears back.
- CPU and bf16 only. Other activation dtypes are rounded to bf16 and the result returned in
  theirs, as the quantized Linears do. The module cannot move or change dtype: `.to("cuda")`,
  `.float()`, `.to("meta")` raise and name `unpack`; moves to CPU and bf16 are no-ops. (The
  error comes at the first PackedLinear: nn.Module converts child by child, so modules before
  it, such as the embedding, have been converted already. Unpack first.)
- Checkpoints are unchanged (`laid_out.LaidOutLinear`): `state_dict()` gives the dense bf16
  `weight` (unpacked exactly, one fresh copy per layer) and `bias`, `load_state_dict` packs what it
  loads, and copying or pickling goes through the dense weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model.fused import is_plain_linear
from . import native
from .bf16_linear import Bf16RowsLinear, use_bf16_rows
from .laid_out import LaidOutLinear, replace_module
from .quantize import QuantizedLinear
from .quantized_linear import compile_refusal

DTYPE = torch.bfloat16  # oneDNN packs bf16 weights for bf16 activations only
# The row count oneDNN chooses the blocked layout for. Decoding is the case packing exists for;
# the same layout serves a 1024-row prefill at F.linear's speed (measured, step 1 of #13).
PACK_ROWS_HINT = 1


def can_prepack(module: nn.Module) -> bool:
    """Whether `prepack(module)` applies: this CPU has oneDNN bf16 kernels and every nn.Linear in
    `module` holds a bf16 weight on the CPU (vacuously true without Linears: nothing to do)."""
    return packing_supported() and all(_unpackable_reason(m) is None for _, m in _linears(module))


def packing_supported() -> bool:
    """Whether PyTorch was built with oneDNN and this CPU runs its bf16 kernels (AVX-512 BF16,
    AMX, or AVX-512 with emulation; not plain AVX2)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(LaidOutLinear):
    """F.linear(x, W, bias) for bf16 x (..., K) -> (..., N), with W kept only in oneDNN's packed
    layout. Built from an nn.Linear by `from_linear`, or by `prepack` for a whole model."""

    def __init__(self, packed: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self._packed = packed  # a plain attribute: no state-dict, .to() or autograd machinery sees it
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """A PackedLinear computing `linear`'s products exactly; `linear` is left as it was."""
        reason = _unpackable_reason(linear)
        if reason is not None:
            raise ValueError(f"cannot pack this Linear: {reason}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(_pack(linear.weight.detach()), bias)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear is inference-only: its oneDNN op has no backward, so gradients "
                               "through it would be wrong. Run under torch.no_grad() or torch.inference_mode(), "
                               "or call andromeda.inference.packed.unpack(model) before training")
        if x.device.type != "cpu":
            raise ValueError(f"PackedLinear's weight is packed for the CPU, got activations on {x.device}")
        y = torch.ops.mkldnn._linear_pointwise(x.to(DTYPE), self._packed, self.bias, "none", [None], "")
        return y.to(x.dtype)  # (..., N)

    def dense_weight(self) -> Tensor:
        """The (N, K) bf16 weight, unpacked exactly into a fresh tensor."""
        return self._packed.to_dense()

    def _apply(self, fn, recurse: bool = True):
        # Module.to/.float/.cuda/.to_empty call this with a per-tensor function; a bf16 CPU probe
        # shows where it would send the weight. The packed weight can only stay.
        try:
            probe = fn(torch.empty(0, dtype=DTYPE))
        except Exception as error:
            raise ValueError(f"a PackedLinear cannot be moved or converted ({error}); "
                             f"call andromeda.inference.packed.unpack(model) first") from error
        if probe.device.type != "cpu" or probe.dtype != DTYPE:
            raise ValueError(f"a PackedLinear holds a oneDNN-packed bf16 CPU weight and cannot become "
                             f"{probe.dtype} on {probe.device}; call andromeda.inference.packed.unpack(model) "
                             f"first, or load the checkpoint into a model built there")
        return super()._apply(fn, recurse)

    def _store_dense(self, weight: Tensor) -> None:
        self._packed = _pack(weight.to(DTYPE))
        if self.bias is not None:
            self.bias = self.bias.to(DTYPE)

    def _stand_in(self) -> Tensor:
        return torch.empty(self.out_features, self.in_features, dtype=DTYPE)

    # Copies and pickles carry the dense weight and pack it again.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_packed"] = self.dense_weight()
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "_packed": _pack(state["_packed"])})


# Modules that compute a Linear's forward but cannot be trained: training code can refuse them.
INFERENCE_ONLY = (PackedLinear, Bf16RowsLinear, *QuantizedLinear)


def inference_only_modules(net: nn.Module) -> list[str]:
    """Names of the modules in `net` that cannot train (prepacked, row-tiled or quantized Linears)."""
    return [name for name, module in net.named_modules() if isinstance(module, INFERENCE_ONLY)]


def check_compilable(net: nn.Module, rows: int = 1) -> None:
    """Raise ValueError naming the first layer of `net` that torch.compile cannot take in a decode
    step of `rows` rows: a PackedLinear (Inductor fails to lower its oneDNN op; `unpack` first)
    or an int8/int4 Linear without its VNNI decoding kernel (`quantized_linear.compile_refusal`:
    ATen's int8/int4 paths do not trace)."""
    for name in inference_only_modules(net):
        layer = net.get_submodule(name)
        if isinstance(layer, Bf16RowsLinear):  # its op traces
            continue
        if isinstance(layer, PackedLinear):
            raise ValueError(f"compile=True cannot compile prepacked bf16 layers ({name}): call "
                             f"andromeda.inference.packed.unpack(model) first, then "
                             f"andromeda.inference.bf16_linear.use_bf16_rows(model) for the rows kernel's "
                             f"compiled step where it runs (as `generate --compile` does)")
        reason = compile_refusal(layer, rows)
        if reason is not None:
            raise ValueError(f"compile=True cannot compile {type(layer).__name__} layer {name}: {reason} "
                             f"(or decode without compile)")


def prepack(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside `module` by a PackedLinear, in place, and return `module`.

    For inference on the CPU with bf16 weights. Every Linear is checked before any is replaced:
    a ValueError names the first layer whose weight is not bf16 on the CPU (and the fix), or says
    the CPU lacks oneDNN's bf16 kernels; `can_prepack` asks the same without raising. Layers are
    packed one at a time and each dense weight is freed once its layer is replaced (if nothing
    else holds it), so peak memory is the model plus one layer. Only exact nn.Linear modules are
    swapped: a subclass may read its weight directly (MultiheadAttention's out_proj does).
    """
    if not packing_supported():
        raise ValueError("this CPU (or PyTorch build) has no oneDNN bf16 kernels "
                         "(torch.ops.mkldnn._is_mkldnn_bf16_supported() is False); keep the nn.Linears")
    names = []
    for name, linear in _linears(module):
        reason = _unpackable_reason(linear)
        if reason is not None:
            raise ValueError(f"cannot prepack layer {name!r}: {reason}")
        names.append(name)
    for name in names:  # by name, so no list holds on to the replaced Linears
        replace_module(module, name, lambda linear: PackedLinear.from_linear(linear))
    return module


def prepack_if_supported(module: nn.Module) -> nn.Module:
    """`prepack(module)` where it applies (`can_prepack`: bf16 weights on a CPU with oneDNN's bf16
    kernels), else `module` unchanged; returns it. What generate, eval and serve load models with."""
    return prepack(module) if can_prepack(module) else module


def rows_kernel_preferred() -> bool:
    """Whether decoding reads bf16 weights by the rows kernel rather than oneDNN's prepacked product
    (`prepare_bf16`): where the kernel runs and the CPU has no AMX tiles. With AMX (Sapphire
    Rapids on) oneDNN's product reads a prepacked weight at the bandwidth at one row and computes
    several on the tiles: `benchmarks/bench_bf16_rows.py` on an Intel Xeon, 2 threads, gave the
    kernel 0.88x oneDNN's speed at 1 row, 0.82x at 2, 0.29x at 16 (on an AMD EPYC without AMX,
    1.3x at 1 row and 1.5x at 2)."""
    return native.bf16_rows_kernel() and not (_amx_tiles() and packing_supported())


def _amx_tiles() -> bool:
    """Whether the CPU has AMX's bf16 tiles (which oneDNN's bf16 products then use)."""
    return native.cpu_has(native.AMX_BF16_FLAGS)


def prepare_bf16(module: nn.Module) -> nn.Module:
    """`module`'s bf16 CPU Linears made ready to decode, in place: read by the rows kernel where it
    beats oneDNN (`rows_kernel_preferred`: it runs and the CPU has no AMX tiles), else
    prepacked for oneDNN where that applies; returns `module`. What `checkpoint.load_for_inference`
    does for decoding."""
    if rows_kernel_preferred():
        use_bf16_rows(module)
    return prepack_if_supported(module)


def unpack(module: nn.Module, *, row_tiles: bool = True) -> nn.Module:
    """Replace every PackedLinear and (with `row_tiles`) Bf16RowsLinear inside `module` by an
    nn.Linear with its weight, in place, and return `module`: for training or moving the model to
    another device or dtype. `row_tiles=False` keeps the row-tiled layers: for torch.compile, which
    takes them and not prepacked ones."""
    kinds = (PackedLinear, Bf16RowsLinear) if row_tiles else PackedLinear
    names = [name for name, child in module.named_modules() if isinstance(child, kinds)]
    for name in names:
        replace_module(module, name, lambda layer: layer.to_linear())
    return module


def _pack(weight: Tensor) -> Tensor:
    """The (N, K) bf16 weight in oneDNN's blocked layout, as a new opaque tensor."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, child) for name, child in module.named_modules() if is_plain_linear(child)]


def _unpackable_reason(linear: nn.Linear) -> str | None:
    """Why this Linear's weight cannot be packed, with the fix; None if it can."""
    w = linear.weight
    if w.is_meta:
        return "its weight is on the meta device; load the weights first"
    if w.device.type != "cpu":
        return (f"its weight is on {w.device}; packing is for CPU inference (on a GPU, F.linear "
                f"already reads the weight as it is)")
    if w.dtype != DTYPE:
        return f"its weight is {w.dtype}; convert the model first: model.to(torch.bfloat16)"
    if linear.bias is not None and linear.bias.dtype != DTYPE:
        return f"its bias is {linear.bias.dtype}; convert the model first: model.to(torch.bfloat16)"
    return None
