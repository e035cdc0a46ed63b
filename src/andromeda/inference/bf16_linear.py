"""bf16 Linears whose decoding products read the weight as stored, by `native.bf16_rows`.

Shape letters: M rows of activations (batch x positions), K input features, N output features.

A decode step reads every weight once, so its speed is the memory bandwidth's. oneDNN's bf16
product for one row reaches it only with the weight packed in its blocked layout
(`inference.packed`), and a packed weight is an opaque tensor Inductor cannot lower: a prepacked
model decodes eagerly, paying Python and dispatch between its ~130 products a token. The kernel
(`kernels/bf16_rows.c`, AVX-512 BF16) streams the plain (N, K) weight, eight rows side by side,
one vdpbf16ps per 32 weights, float32 sums: the same products to float32 rounding, at the
bandwidth, from the weight nn.Linear holds -- so a model keeps its ordinary parameters (state
dict, copies, `.to()` as nn.Linear's) and its decode step compiles (`generate --compile`), the op
traced as one node.

`Bf16RowsLinear` is an nn.Linear whose forward sends up to DECODE_ROWS rows of a CPU product
without gradient to the op and the rest (a prefill, a training step, another device) to F.linear.
`prepare_bf16(model)` swaps a model's plain bf16 CPU Linears for it where the kernel runs (a CPU
with AVX-512 BF16 and the ops library built, `native.bf16_rows_kernel`), else prepacks them for
oneDNN (`packed.prepack_if_supported`): what `checkpoint.load_for_inference` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.fused import is_plain_linear
from . import native
from .packed import DTYPE, _replace, prepack_if_supported

# Rows up to which the kernel computes a product: decoding, a batch of decoding rows, a speculative
# verify step. It re-reads each 8-row tile of the weight from cache once per 2 activation rows, so
# its time grows with the rows, where oneDNN's (the weight reordered once a call) barely does.
DECODE_ROWS = 16
K_MULTIPLE = 32  # the kernel's 64-byte vectors of 32 bf16 weights


class Bf16RowsLinear(nn.Linear):
    """nn.Linear (bf16 weight) whose few-row products without gradient on the CPU go through the
    bf16 rows kernel (module docstring); everything else is nn.Linear's own forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Whether the kernel runs in this process (`native.bf16_rows_kernel`), set where the module
        # is made or unpickled: a model prepared on one machine and loaded on another takes F.linear.
        self._kernel = native.bf16_rows_kernel()

    def forward(self, x: Tensor) -> Tensor:
        if (self._kernel and x.device.type == "cpu" and 0 < x.numel() <= DECODE_ROWS * self.in_features
                and self.weight.dtype == DTYPE and not (torch.is_grad_enabled() and self._wants_gradients(x))):
            bias = None if self.bias is None else self.bias.float()
            y = native.bf16_rows(x.reshape(-1, self.in_features), self.weight, bias)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def _wants_gradients(self, x: Tensor) -> bool:
        return x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Bf16RowsLinear:
        """The same layer, sharing `linear`'s weight and bias (and its training flag)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        module.train(linear.training)
        return module

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._kernel = native.bf16_rows_kernel()


def kernel_takes(linear: nn.Module) -> bool:
    """Whether `linear` is a plain nn.Linear the kernel can read: a contiguous bf16 CPU weight whose
    rows are whole vectors (K a multiple of 32)."""
    if not is_plain_linear(linear):
        return False
    w = linear.weight
    return (w.device.type == "cpu" and w.dtype == DTYPE and w.is_contiguous() and linear.in_features % K_MULTIPLE == 0
            and (linear.bias is None or linear.bias.dtype == DTYPE))


def use_bf16_rows(module: nn.Module) -> int:
    """Swap every plain nn.Linear in `module` the kernel takes (`kernel_takes`) for a
    Bf16RowsLinear sharing its parameters, in place, where the kernel runs here; returns how many."""
    if not native.bf16_rows_kernel():
        return 0
    names = [name for name, child in module.named_modules() if kernel_takes(child)]
    for name in names:
        _replace(module, name, Bf16RowsLinear.from_linear)
    return len(names)


def prepare_bf16(module: nn.Module) -> nn.Module:
    """`module`'s bf16 CPU Linears made ready to decode, in place: read by the rows kernel where it
    runs (`use_bf16_rows`), else prepacked for oneDNN where that applies; returns `module`."""
    use_bf16_rows(module)
    return prepack_if_supported(module)
