"""Transposed copies for the weight gradients of bf16 training on the CPU, by a small C kernel.

The weight gradients' products run fastest with contiguous operands (`model.fused`), so a step
writes several matrices as their transposes: each projection's bf16 output gradient dy (N, C) as
(C, N), the feed-forward's bf16 (C, F) weight gradient back into float32 (F, C), and the logits'
float32 (C, V) gradient, scaled, into (V, C). ATen's strided copies read the transposed source an
element at a time: 50 ms for the feed-forward's (2560, 10240) gradient at one thread, where a plain
conversion of it takes 18. `kernels/transpose.c` moves 16 x 16 blocks through registers, converting
and scaling on the way, at about the plain conversion's speed.

`transpose_kernel()` gives it where it can run (AVX-512 and a C compiler; built on first use like the
other kernels, `inference.native.build_library`), else None; `use_transpose_kernel(model)` hands it
to every `model.Transformer` of a model (a `model.fused.Transposer`), whose feed-forward, attention
projections and loss then use it for float32 and bf16 CPU tensors (not while torch.compile traces).
The numbers are those of `model.fused.transposed`'s PyTorch ops, bit for bit.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor, nn

from ..inference.native import KernelLibrary
from ..model.fused import TRANSPOSER_DTYPES, Transposer
from .kernels import AVX512_CPU_FLAGS, AVX512_FLAGS, give_transformers

SOURCE = Path(__file__).parents[1] / "inference" / "kernels" / "transpose.c"
PROFILER_NAME = "andromeda::transpose"  # its calls in a torch.profiler trace
LIBRARY = KernelLibrary("the transpose kernel", SOURCE, AVX512_FLAGS, AVX512_CPU_FLAGS,
                        "set the model's transpose to None to use PyTorch's ops")


def transposed_by_kernel(src: Tensor, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor:
    """`model.fused.Transposer` by the C kernel: src.T (times `scale`) as a new contiguous tensor of
    `dtype`. A plain function, so a model holding it still deep-copies and pickles."""
    if src.dim() != 2 or src.device.type != "cpu" or src.dtype not in TRANSPOSER_DTYPES or dtype not in TRANSPOSER_DTYPES:
        raise ValueError(f"the transpose kernel takes a 2-D float32 or bf16 CPU tensor into float32 or bf16, got "
                         f"{tuple(src.shape)} {src.dtype} on {src.device} into {dtype}")
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"scale must hold one number, got shape {tuple(scale.shape)}")
    rows, cols = src.shape
    if src.stride(1) != 1 or (rows > 1 and src.stride(0) < cols):  # columns apart, or rows overlapping (broadcast)
        src = src.contiguous()
    out = torch.empty((cols, rows), dtype=dtype)
    factor = None if scale is None else scale.detach().to(device="cpu", dtype=torch.float32).reshape(())
    if rows and cols:
        with torch.profiler.record_function(PROFILER_NAME):  # a ctypes call is no op the profiler sees
            _kernel()(src.data_ptr(), src.dtype == torch.bfloat16, rows, cols, src.stride(0), out.data_ptr(),
                      dtype == torch.bfloat16, rows, None if factor is None else factor.data_ptr())
    return out


def transpose_kernel() -> Transposer | None:
    """The kernel as a `model.fused.Transposer`, or None where it cannot run (the reason is logged)."""
    return LIBRARY.offer(transposed_by_kernel, "the weight gradients' transposes run in PyTorch's ops")


def use_transpose_kernel(model: nn.Module) -> bool:
    """Give every `Transformer` in `model` the kernel where it can run; returns whether it did."""
    return give_transformers(model, "transpose", transpose_kernel())


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (no AVX-512, no C compiler, a failed build), or None."""
    return LIBRARY.unavailable_reason()


def _kernel() -> ctypes._CFuncPtr:
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return LIBRARY.function("andromeda_transpose", [pointer, flag, size, size, size, pointer, flag, size, pointer])
