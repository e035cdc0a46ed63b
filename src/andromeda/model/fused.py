"""The feed-forward's training step with a hand-written backward that keeps less and allocates less.

Shape letters: N tokens (batch x positions), C model width, F feed-forward width.

Autograd keeps two (N, F) tensors per feed-forward for backward: the first projection's output h
and GELU's output. The backward here keeps only h and recomputes GELU(h), which costs one cheap
elementwise pass and saves N * F activations per layer (for the default model at 8192 tokens,
168 MB per layer in bf16). Its (N, F) temporaries live in a `Workspace` that every layer of one
forward pass shares, so a training step doesn't allocate (and, on CPU, page-fault) four fresh
(N, F) blocks per layer.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Transposer(Protocol):
    """A kernel for `transposed` (the training loop's `train.transpose_kernel`): src (R, C) float32
    or bf16 on the CPU, its rows contiguous -> src.T (times the 0-dim float32 `scale` where given)
    as a new contiguous (C, R) tensor of `dtype` (float32 or bf16), the numbers `transposed`
    computes with PyTorch's ops."""

    def __call__(self, src: Tensor, dtype: torch.dtype, scale: Tensor | None) -> Tensor: ...


class Workspace:
    """Scratch buffers shared by the layers of one forward pass and its backward, one per (name,
    device, dtype), grown on demand. The Transformer makes one per forward; the autograd graph
    holds it until backward is done, then it is freed with the graph. Each user finishes with a
    buffer before returning (inside one forward or one backward; layers run one at a time), as
    the next user overwrites it. `transpose`: the model owner's `Transposer`, or None.
    """

    def __init__(self, transpose: Transposer | None = None) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
        self.transpose = transpose

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of `shape`, uninitialised."""
        key, size = (name, torch.device(device), dtype), math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size:
            self._buffers.pop(key, None)  # free the old one before the larger one is made
            buffer = self._buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size].view(shape)


def is_plain_linear(module: nn.Module) -> bool:
    """True for an unmodified nn.Linear, whose product the fused paths may compute from its
    weight directly. Anything else (a quantized or LoRA replacement, a counting subclass) is
    called as a module, so replacing Linear modules is always honoured."""
    return type(module) is nn.Linear


# bf16 weight gradients on the CPU: oneDNN's dy.T @ x, the transposed first operand taken as it is,
# runs slower than the same product with dy.T made contiguous first for large weights, faster for
# small ones (one thread, 4 x 1024 rows, Intel AMX: the 2.5 B's attention projections, 9.2 M and
# 7.9 M entries, 1.42x and 1.25x; dim 512's, 0.4 M and 0.26 M, 0.82x and 0.91x;
# `benchmarks/bench_weight_gradients.py`). Bias-free projections from this many weights on take
# the contiguous form (`projection`).
CONTIGUOUS_FIRST_MIN = 1 << 21


# Rows of a matrix written as its transpose at a time (`transposed`): a block's strided reads stay
# in the caches, where one pass reads across all rows for each output row. One thread, Intel Xeon
# with AMX: a bf16 (2560, 10240) product into float32 47 against 150 ms; the weight gradients'
# bf16 transposes of (4096, 2560) and (4096, 3584) operands 7.2 and 9.5 ms against 11.3 and 15.8
# for .T.contiguous(). Under BLOCKS_MIN entries the blocks' own overhead loses ((2048, 192), the
# demo's: 0.31 against 0.24 ms), and one pass is taken; the same size decides W1's gradient form.
TRANSPOSE_BLOCK = 64
BLOCKS_MIN = 1 << 20


TRANSPOSER_DTYPES = (torch.float32, torch.bfloat16)


def transposed(src: Tensor, dtype: torch.dtype, scale: Tensor | None = None,
               kernel: Transposer | None = None) -> Tensor:
    """src.T (times `scale` where given, in `dtype`'s precision at least) as a new contiguous
    tensor of `dtype`: by `kernel` where given and the tensors are its (float32 or bf16 on the CPU,
    not while torch.compile traces), else written in blocks of TRANSPOSE_BLOCK of src's rows (in
    one pass under BLOCKS_MIN entries)."""
    if (kernel is not None and src.device.type == "cpu" and src.dim() == 2 and src.dtype in TRANSPOSER_DTYPES
            and dtype in TRANSPOSER_DTYPES and not torch.compiler.is_compiling()):
        return kernel(src, dtype, scale)
    rows = src.shape[0]
    out = src.new_empty((src.shape[1], rows), dtype=dtype)
    if src.numel() < BLOCKS_MIN:
        _copy_scaled(out, src.T, scale)
        return out
    for r0 in range(0, rows, TRANSPOSE_BLOCK):
        _copy_scaled(out[:, r0:r0 + TRANSPOSE_BLOCK], src[r0:r0 + TRANSPOSE_BLOCK].T, scale)
    return out


def _copy_scaled(target: Tensor, src: Tensor, scale: Tensor | None) -> None:
    """target = src * scale (or src). A src narrower than target (bf16 into float32) is widened
    first: torch.mul would multiply in src's dtype, then widen the rounded product."""
    if scale is None:
        target.copy_(src)
    elif torch.promote_types(src.dtype, target.dtype) == src.dtype:
        torch.mul(src, scale, out=target)
    else:
        target.copy_(src).mul_(scale)


def column_sums(x: Tensor) -> Tensor:
    """x.sum(0) for a bf16 matrix x (N, F) on the CPU, as the product ones (1, N) @ x: oneDNN's
    matrix-vector product reads x at 1.6x the speed of ATen's column reduction (13.2 against 8.4 ms
    for (4096, 10240), one thread), both summing in float32 into bf16."""
    return (x.new_ones((1, x.shape[0])) @ x)[0]


def projection(x: Tensor, module: nn.Module, transpose: Transposer | None = None) -> Tensor:
    """module(x) for a bias-free projection; under bf16 CPU autocast, training a plain nn.Linear of
    at least CONTIGUOUS_FIRST_MIN weights, the same product with its weight gradient formed from a
    contiguous dy.T (`_Projection`, by `transpose` where given). Anything else, and while
    torch.compile traces, calls the module."""
    if (is_plain_linear(module) and module.bias is None and module.weight.numel() >= CONTIGUOUS_FIRST_MIN
            and module.weight.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.compiler.is_compiling()):
        return _Projection.apply(x, module.weight, transpose)
    return module(x)


class _Projection(torch.autograd.Function):
    """x @ weight.T as CPU autocast computes it (both cast to bf16, the casts kept for backward),
    with the weight's gradient from dy.T made contiguous (`transposed`) @ x."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, transpose: Transposer | None) -> Tensor:
        with torch.autocast("cpu", enabled=False):
            xc, wc = x.to(torch.bfloat16), weight.to(torch.bfloat16)
            y = F.linear(xc, wc)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.transpose = transpose
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xc, wc = ctx.saved_tensors
        dy = grad_y.to(torch.bfloat16)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (dy @ wc).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dy2 = dy.reshape(-1, dy.shape[-1])
            grad_w = (transposed(dy2, dy2.dtype, kernel=ctx.transpose) @ xc.reshape(-1, xc.shape[-1])).to(ctx.dtypes[1])
        return grad_x, grad_w, None


def feed_forward(x: Tensor, proj_in: nn.Module, proj_out: nn.Module, workspace: Workspace) -> Tensor:
    """proj_out(gelu(proj_in(x))) for x (..., C).

    Uses the lean autograd function when both projections are plain nn.Linear and a backward
    can follow; under no_grad, while torch.compile traces (which plans memory itself), or with
    replaced projections, the module calls.
    """
    if is_plain_linear(proj_in) and is_plain_linear(proj_out):
        return lean_feed_forward(x, proj_in.weight, proj_in.bias, proj_out.weight, proj_out.bias, workspace)
    return proj_out(F.gelu(proj_in(x)))


def lean_feed_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, workspace: Workspace) -> Tensor:
    """linear(gelu(linear(x, w1, b1)), w2, b2), with the lean backward when one can follow (and
    the plain ops under no_grad or while torch.compile traces, which plans memory itself)."""
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2))
    if not tracked or torch.compiler.is_compiling():
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return _FeedForward.apply(x, w1, b1, w2, b2, workspace)


class _FeedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, workspace: Workspace) -> Tensor:
        device = x.device.type
        # Under autocast, cast once here (as autocast would for each linear) and run without it,
        # so backward sees the same dtypes as forward.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, C)
            w1c, b1c, w2c, b2c = (t.to(dtype) for t in (w1, b1, w2, b2))
            h = torch.addmm(b1c, x2, w1c.T)  # (N, F)
            activated = workspace.get("ff", h.shape, dtype, h.device)
            torch._C._nn.gelu(h, out=activated)
            y = torch.addmm(b2c, activated, w2c.T)  # (N, C)
        ctx.save_for_backward(x2, h, w1c, w2c)
        ctx.workspace = workspace
        ctx.dtypes = (x.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x2, h, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(h.dtype)  # (N, C)
        buffer = ctx.workspace.get("ff", h.shape, h.dtype, h.device)  # (N, F)
        grad_w2 = grad_b2 = grad_w1 = grad_b1 = grad_x = None
        # bf16 on the CPU: oneDNN's product with a transposed first operand (the weight gradients'
        # dy.T @ x form) runs at ~550-650 GFLOP/s on AMX where the same product of contiguous
        # operands runs at 750-1,050, so W2's narrow dy (N, C) is transposed first (a small copy):
        # 1.2x at dim 512, 1.6x at the 2.5 B default's width (4 x 1024 rows, one thread;
        # benchmarks/bench_weight_gradients.py). W1's gradient, from BLOCKS_MIN weights on, is formed
        # as its transpose from the narrow x (N, C) made contiguous, (C, F) = x.T @ d h, and written
        # back (F, C) in float32 in blocks (`transposed`), which also does autograd's conversion.
        contiguous_first = h.dtype == torch.bfloat16 and h.device.type == "cpu"
        transpose = ctx.workspace.transpose
        if need_w2:
            torch._C._nn.gelu(h, out=buffer)  # GELU's output again
            grad_w2 = (transposed(dy, dy.dtype, kernel=transpose) if contiguous_first else dy.T) @ buffer  # (C, F)
        if need_b2:
            grad_b2 = column_sums(dy) if contiguous_first else dy.sum(0)
        if need_x or need_w1 or need_b1:
            torch.mm(dy, w2, out=buffer)  # d loss / d GELU output, over GELU's output
            torch.ops.aten.gelu_backward.grad_input(buffer, h, grad_input=buffer)  # d loss / d h
            if need_w1 and contiguous_first and w1.numel() >= BLOCKS_MIN:  # (F, C), from its (C, F) transpose
                grad_w1 = transposed(transposed(x2, x2.dtype, kernel=transpose) @ buffer, ctx.dtypes[1], kernel=transpose)
            elif need_w1:
                grad_w1 = buffer.T @ x2  # (F, C)
            if need_b1:
                grad_b1 = column_sums(buffer) if contiguous_first else buffer.sum(0)
            if need_x:
                grad_x = (buffer @ w1).view(grad_y.shape[:-1] + (w1.shape[1],))
        grads = (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)
        return (*(g if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None)
