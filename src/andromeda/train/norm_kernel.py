"""The blocks' LayerNorms for bf16 training on the CPU, from float32 rows straight to bf16, by a
small C kernel.

Under CPU autocast `F.layer_norm` runs in float32 (autocast's float32 list) on the float32
residual stream, and each consumer (the attention's projection, the feed-forward, the loss)
converts its output to bf16; the backward converts their bf16 gradient back to float32 before
the norm's own backward: four passes over (N, C) around the norm's two, ~37 ms a norm at the
2.5 B default's width (4 x 1024 tokens, one thread). `kernels/layer_norm.c` normalizes each row,
applies the weight and rounds to bf16 in one pass, and in one backward pass takes the bf16
gradient and writes the float32 input gradient, summing the weight's gradient per thread (added
in thread order: the same result for the same thread count).

`norm_kernel()` gives it where it can run (AVX-512 and a C compiler; built on first use like the
other kernels, `inference.native.build_library`), else None; `use_norm_kernel(model)` hands it
to every `model.transformer.LayerNorm` of a model, which uses it under bf16 CPU autocast for
float32 input and weight (not while torch.compile traces: Inductor fuses the norm and the casts
itself). It is the custom op `andromeda::layer_norm_bf16` with its backward registered.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor, nn

from ..inference.native import KernelLibrary
from ..model.transformer import LayerNorm, NormToBF16
from .kernels import AVX512_CPU_FLAGS, AVX512_FLAGS

SOURCE = Path(__file__).parents[1] / "inference" / "kernels" / "layer_norm.c"
LIBRARY = KernelLibrary("the LayerNorm kernel", SOURCE, AVX512_FLAGS, AVX512_CPU_FLAGS,
                        "set the model's norms' to_bf16 to None to use PyTorch's ops")


def layer_norm_bf16(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`model.transformer.NormToBF16` by the C kernel (module docstring), through its op. A plain
    function, so a model holding it still deep-copies and pickles."""
    return _norm_op(x, weight, eps)[0]


def reference_layer_norm_bf16(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """What the kernel computes, in PyTorch's ops: float32 LayerNorm, then rounded to bf16."""
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), None, eps).to(torch.bfloat16)


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"the LayerNorm kernel takes float32 rows and weight, got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be ({x.shape[-1] if x.dim() else '?'},) for rows of x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")


def _pointers(*tensors: Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


@torch.library.custom_op("andromeda::layer_norm_bf16", mutates_args=(), device_types="cpu")
def _norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight)
    x, weight = x.contiguous(), weight.contiguous()
    C = x.shape[-1]
    rows = x.numel() // C if C else 0
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    mean, rstd = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.float32)
    if rows and C:
        _kernels()[0](*_pointers(x, weight), rows, C, eps, *_pointers(y, mean, rstd))
    return y, mean, rstd


@_norm_op.register_fake
def _norm_shape(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=torch.bfloat16), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("andromeda::layer_norm_bf16_backward", mutates_args=(), device_types="cpu")
def _norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    grad, x, weight = grad.to(torch.bfloat16).contiguous(), x.contiguous(), weight.contiguous()
    C = x.shape[-1]
    rows = x.numel() // C if C else 0
    dx, dw = torch.empty(x.shape, dtype=torch.float32), torch.zeros(C, dtype=torch.float32)
    if rows and C and _kernels()[1](*_pointers(grad, x, weight, mean, rstd), rows, C, *_pointers(dx, dw)) != 0:
        raise MemoryError("no memory for the LayerNorm kernel's per-thread weight-gradient rows")
    return dx, dw


@_norm_backward_op.register_fake
def _norm_backward_shape(grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape[-1], dtype=torch.float32)


def _save(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])


def _backward(ctx, grad: Tensor, grad_mean: Tensor | None, grad_rstd: Tensor | None) -> tuple:
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw = _norm_backward_op(grad, x, weight, mean, rstd)
    return dx, dw, None


_norm_op.register_autograd(_backward, setup_context=_save)


def norm_kernel() -> NormToBF16 | None:
    """The kernel as a `NormToBF16`, or None where it cannot run (the reason is logged)."""
    return LIBRARY.offer(layer_norm_bf16, "norms run in PyTorch's ops")


def use_norm_kernel(model: nn.Module) -> bool:
    """Give every `model.transformer.LayerNorm` in `model` the kernel where it can run; returns
    whether it did. Only float32 input under bf16 CPU autocast takes it."""
    kernel = norm_kernel()
    norms = [module for module in model.modules() if isinstance(module, LayerNorm)]
    if kernel is None or not norms:
        return False
    for module in norms:
        module.to_bf16 = kernel
    return True


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (no AVX-512, no C compiler, a failed build), or None."""
    return LIBRARY.unavailable_reason()


def _kernels() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    return (LIBRARY.function("andromeda_layer_norm_forward",
                             [pointer, pointer, size, size, ctypes.c_float, pointer, pointer, pointer]),
            LIBRARY.function("andromeda_layer_norm_backward",
                             [pointer, pointer, pointer, pointer, pointer, size, size, pointer, pointer]))
