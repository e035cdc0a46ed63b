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
import logging
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from ..inference.native import build_library, missing_support
from ..model import Transformer
from ..model.fused import TRANSPOSER_DTYPES, Transposer

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parents[1] / "inference" / "kernels" / "transpose.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp", "-shared", "-fPIC",
         "-std=gnu11")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
PROFILER_NAME = "andromeda::transpose"  # its calls in a torch.profiler trace


def transposed_by_kernel(src: Tensor, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor:
    """`model.fused.Transposer` by the C kernel: src.T (times `scale`) as a new contiguous tensor of
    `dtype`. A plain function, so a model holding it still deep-copies and pickles."""
    if src.dim() != 2 or src.device.type != "cpu" or src.dtype not in TRANSPOSER_DTYPES or dtype not in TRANSPOSER_DTYPES:
        raise ValueError(f"the transpose kernel takes a 2-D float32 or bf16 CPU tensor into float32 or bf16, got "
                         f"{tuple(src.shape)} {src.dtype} on {src.device} into {dtype}")
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"scale must hold one number, got shape {tuple(scale.shape)}")
    if src.stride(1) != 1:
        src = src.contiguous()
    rows, cols = src.shape
    out = torch.empty((cols, rows), dtype=dtype)
    factor = None if scale is None else scale.detach().to(device="cpu", dtype=torch.float32).reshape(())
    if rows and cols:
        with torch.profiler.record_function(PROFILER_NAME):  # a ctypes call is no op the profiler sees
            _kernel()(src.data_ptr(), src.dtype == torch.bfloat16, rows, cols, max(src.stride(0), 1), out.data_ptr(),
                      dtype == torch.bfloat16, rows, None if factor is None else factor.data_ptr())
    return out


@cache
def transpose_kernel() -> Transposer | None:
    """The kernel as a `model.fused.Transposer`, or None where it cannot run (the reason is logged)."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("transpose kernel not used: %s; the weight gradients' transposes run in PyTorch's ops", reason)
        return None
    return transposed_by_kernel


def use_transpose_kernel(model: nn.Module) -> bool:
    """Give every `Transformer` in `model` the kernel where it can run; returns whether it did."""
    kernel = transpose_kernel()
    if kernel is None:
        return False
    for module in model.modules():
        if isinstance(module, Transformer):
            module.transpose = kernel
    return True


@cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (no AVX-512, no C compiler, a failed build), or None."""
    return missing_support(CPU_FLAGS, SOURCE, lambda: build_library(SOURCE, FLAGS))


@cache
def _kernel() -> ctypes._CFuncPtr:
    reason = unavailable_reason()
    if reason is not None:  # a model pickled where the kernel ran, loaded where it cannot
        raise RuntimeError(f"the transpose kernel cannot run here: {reason}; set the model's transpose "
                           f"to None to use PyTorch's ops")
    function = ctypes.CDLL(str(build_library(SOURCE, FLAGS))).andromeda_transpose
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    function.argtypes = [pointer, flag, size, size, size, pointer, flag, size, pointer]
    function.restype = ctypes.c_int
    return function
