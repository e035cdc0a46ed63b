"""The next-token loss: cross-entropy of the output projection, never holding all (N, V) logits.

Shape letters: N rows (tokens), C model width, V vocabulary.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import Transposer, is_plain_linear, transposed

IGNORE_INDEX = -100
LOSS_CHUNK = 1024  # rows of logits alive at once in the loss
ADD_BLOCK_BYTES = 1 << 20  # float32 bytes of a weight gradient's rows converted and summed at a time
# bf16 bytes of logits rows a pass of the loss holds, where the CPU kernel forms their gradient in
# place (`_LinearCrossEntropy`): at the default vocabulary, 5 chunks of 1,024 rows, each product (the
# logits, the hidden and the weight gradients) taken once over the group. For the weight gradient, one
# product in place of a product per chunk each added into a float32 (C, V) sum drops that sum's
# read-modify-write passes, and for a group of every row the sum itself.
LOSS_GROUP_BYTES = 1 << 29


class SoftmaxCrossEntropy(Protocol):
    """A fused kernel for the elementwise part of the loss over bf16 logits on the CPU (the
    training loop's `train.loss_kernel`): logits (n, V) bf16 with contiguous rows, targets (n,)
    (-100: ignored), row_weight (n,) float32 or None -> float32 losses (n,), logsumexp(row) -
    row[target] and 0 for ignored rows; with row_weight, each row is overwritten in place by
    (softmax(row) - onehot(target)) * row_weight in bf16, the loss's gradient."""

    def __call__(self, logits: Tensor, targets: Tensor, row_weight: Tensor | None) -> Tensor: ...


def projected_cross_entropy(
    hidden: Tensor, projection: nn.Module, targets: Tensor, reduction: str = "mean", chunk: int = LOSS_CHUNK,
    softmax: SoftmaxCrossEntropy | None = None, transpose: Transposer | None = None,
) -> Tensor:
    """cross_entropy(projection(hidden), targets) for hidden (N, C), targets (N,), -100 ignored.

    A plain nn.Linear projection takes the fused path (`linear_cross_entropy`); any other module
    (quantized, LoRA, ...) is called on `chunk` rows at a time, so its forward is honoured and
    (N, V) logits still never exist at once.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if is_plain_linear(projection):
        return linear_cross_entropy(hidden, projection.weight, targets, reduction, chunk, softmax, transpose)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk):
        logits = projection(hidden[start : start + chunk]).float()  # (n, V)
        total = total + F.cross_entropy(logits, targets[start : start + chunk], reduction="sum",
                                        ignore_index=IGNORE_INDEX)
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str = "mean", chunk: int = LOSS_CHUNK,
    softmax: SoftmaxCrossEntropy | None = None, transpose: Transposer | None = None,
) -> Tensor:
    """cross_entropy(hidden @ weight.T, targets) without holding all (N, V) logits at once.

    Targets equal to -100 are ignored. Under autograd, each chunk's gradient is formed while its
    logits exist (the loss is the end of the graph, so d loss / d logits = softmax - onehot is
    known in the forward pass), so training keeps one chunk of logits alive and does no extra
    matrix products — the fused linear-cross-entropy idea of Liger-Kernel and Apple's CCE.
    Its backward hands those gradients over, so it runs once per graph (no retain_graph reuse).
    `softmax`: a fused kernel for the elementwise part (`SoftmaxCrossEntropy`), used where the
    logits are bf16 on the CPU (bf16 hidden states, or bf16 autocast); else PyTorch's ops on a
    float32 copy of each chunk's logits. `transpose`: a kernel for the weight gradient's transposed
    copies (`fused.Transposer`).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not torch.is_grad_enabled():
        # No backward can follow (evaluation under torch.no_grad()), but Function.forward sees
        # needs_input_grad True for any parameter regardless of grad mode: detach, so it skips
        # the two gradient products and the (V, C) fp32 gradient buffer.
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets, reduction, chunk, softmax, transpose)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str, chunk: int,
                softmax: SoftmaxCrossEntropy | None, transpose: Transposer | None) -> Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_grad = want_hidden or want_weight
        valid = targets != IGNORE_INDEX
        divisor = valid.sum().clamp(min=1) if reduction == "mean" else valid.new_ones((), dtype=torch.long)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, fp64 stays
        # Under autocast, cast the operands once, not per chunk and per product: autocast would
        # recast the (n, V) gradient for each of its two products.
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        if compute != torch.bfloat16 or device != "cpu":
            softmax = None  # the kernel's case: bf16 logits in CPU memory
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = _WeightGradient(weight, acc, compute, transposed=device == "cpu" and compute != acc,
                                      kernel=transpose) if want_weight else None
        # One buffer holds each chunk's logits, then its softmax, then its gradient: every step is
        # in place, so no (n, V) tensor is allocated (and page-faulted) per chunk. Where the kernel
        # leaves bf16 gradients in place on the CPU, the buffer holds a group of chunks
        # (LOSS_GROUP_BYTES) and each of the three products runs once per group: oneDNN runs the
        # logits' and the hidden gradient's products ~10% faster over 4,096 rows than over 1,024.
        # (A float32 hidden gradient takes its product through a bf16 temporary of the pass's rows:
        # 26 MB for a group at the 2.5 B's width.)
        n_rows, V = hidden.shape[0], weight.shape[0]
        group = chunk
        if want_weight and softmax is not None and grad_weight.transposed:
            group = max(chunk, LOSS_GROUP_BYTES // (V * compute.itemsize) // chunk * chunk)
        buffer = hidden.new_empty((min(group, n_rows), V), dtype=compute if softmax is not None else acc)
        with torch.autocast(device, enabled=False):
            hidden_c, w = hidden.to(compute), weight.to(compute)
            for start in range(0, n_rows, group):
                rows = slice(start, start + group)
                h, t, ok = hidden_c[rows], targets[rows], valid[rows]
                logits = buffer[: len(t)]  # (n, V)
                _matmul_into(logits, h, w.T)
                # d (total / divisor) / d logits = (softmax - onehot) * ok / divisor
                row_weight = ok.to(acc) / divisor if want_grad else None  # (n,)
                if softmax is not None:
                    losses = softmax(logits, t, row_weight)  # logits now hold the gradient
                    for first in range(0, len(t), chunk):  # summed a chunk at a time: the bits of one chunk a pass
                        total += losses[first: first + chunk].sum()
                    grad = logits
                else:
                    total += _softmax_cross_entropy(logits, t, ok, row_weight)
                    grad = logits.to(compute) if want_grad else None
                if want_hidden:
                    _matmul_into(grad_hidden[rows], grad, w)  # (n, C)
                if want_weight:
                    grad_weight.add(grad, h, first=start == 0)
        if grad_weight is not None:
            grad_weight.release()  # freed now, not held until the backward
        # Plain attributes, not save_for_backward: backward scales them (in place, or into the
        # weight's layout) and hands them over, so autograd adopts them as .grad.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy's backward ran twice on one graph; it hands its gradient "
                "buffers over on the first run, so retain_graph=True re-use is not supported"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        gh = grad_hidden.mul_(grad_out) if grad_hidden is not None else None
        gw = grad_weight.scaled(grad_out, ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None


class _WeightGradient:
    """d loss / d weight (V, C), summed over the chunks in `acc` (float32 at least) from products
    in the compute dtype. `transposed` (bf16 products on the CPU) sums it as (C, V): h.T @ grad of
    contiguous operands runs 1.5x as fast as grad.T @ h there (oneDNN, one thread, 1024 x 50432 x
    512; in float32 both take the same time), and the backward's scaling pass writes it back in
    the weight's layout (one (V, C) copy more while it runs). Otherwise the products take the
    transposed operand as it is and the sum is scaled in place. A product in the compute dtype is
    kept as it is until a second one comes: a gradient of one product (one group of rows) never
    makes the float32 sum, and the scaling pass converts it."""

    def __init__(self, weight: Tensor, acc: torch.dtype, compute: torch.dtype, *, transposed: bool,
                 kernel: Transposer | None = None) -> None:
        V, C = weight.shape
        self.transposed, self.kernel = transposed, kernel
        self.shape, self.acc = ((C, V) if transposed else (V, C)), acc
        self.sum: Tensor | None = None  # made by `add` when a second product comes (or the first, direct)
        # A product in the compute dtype is summed into `sum` from a buffer of its own (one, not
        # one a chunk); in `acc` itself it goes straight into `sum`.
        self.direct = compute == acc
        self.product = None if self.direct else weight.new_empty(self.shape, dtype=compute)
        self.pending = False  # `product` holds the only product so far
        # On the CPU the product goes into `sum` through a float32 buffer of a few rows (~1 MiB,
        # in L2): add_ of a bf16 tensor into a float32 one first converts all of it into a new
        # float32 tensor, 2x slower (C = 2560: 0.2 s against 0.1 s a chunk, one thread).
        rows = max(1, ADD_BLOCK_BYTES // (self.shape[1] * acc.itemsize))
        self.block = None if self.direct or weight.device.type != "cpu" else \
            weight.new_empty((min(rows, self.shape[0]), self.shape[1]), dtype=acc)

    def add(self, grad: Tensor, h: Tensor, *, first: bool) -> None:
        """sum += grad.T @ h for one pass's (a chunk's or a group's) gradient of logits (n, V) and its
        rows h (n, C)."""
        a, b = (transposed(h, h.dtype, kernel=self.kernel), grad) if self.transposed else (grad.T, h)
        if self.direct:
            if first:
                self.sum = torch.mm(a, b)
            else:
                self.sum.addmm_(a, b)
            return
        if not first and self.pending:  # a second product: the first goes into the float32 sum now
            self.sum = self.product.to(self.acc)
            self.pending = False
        torch.mm(a, b, out=self.product)
        if first:
            self.pending = True
        elif self.block is None or torch.compiler.is_compiling():  # Inductor fuses the conversion
            self.sum.add_(self.product)
        else:
            rows = self.block.shape[0]
            for r0 in range(0, self.sum.shape[0], rows):
                block = self.block[: min(rows, self.sum.shape[0] - r0)]
                block.copy_(self.product[r0:r0 + rows])
                self.sum[r0:r0 + rows].add_(block)

    def release(self) -> None:
        """Free the buffers the products no longer need (all but a pending product)."""
        self.block = None
        if not self.pending:
            self.product = None

    def scaled(self, scale: Tensor, dtype: torch.dtype) -> Tensor:
        """sum * scale in the weight's layout and `dtype` (zeros where no rows were added)."""
        total = self.product if self.pending else self.sum
        if total is None:
            return torch.zeros(self.shape[::-1] if self.transposed else self.shape, dtype=dtype, device=scale.device)
        if not self.transposed:
            return (total.to(self.acc) if self.pending else total).mul_(scale).to(dtype)
        # In blocks of rows (`fused.transposed`): one pass over the whole transposed sum is 3x
        # slower at C = 2560 (0.64 s against 0.2 s, V = 50432, one thread).
        return transposed(total, dtype, scale, self.kernel)


def _softmax_cross_entropy(logits: Tensor, targets: Tensor, ok: Tensor, row_weight: Tensor | None) -> Tensor:
    """The loss summed over the rows of float logits (n, V) (`ok` False: ignored), and where
    row_weight (n,) is given the logits overwritten in place by (softmax - onehot) * row_weight:
    what `SoftmaxCrossEntropy` computes, in PyTorch."""
    safe_t = targets.clamp(min=0)
    picked = logits.gather(1, safe_t[:, None])  # (n, 1)
    peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    exp = logits.sub_(peak).exp_()  # exp(logits - peak), in place
    sums = exp.sum(dim=-1, keepdim=True)  # (n, 1)
    total = ((peak + sums.log() - picked).squeeze(1) * ok).sum()
    if row_weight is not None:
        exp.mul_(row_weight[:, None] / sums).scatter_add_(1, safe_t[:, None], -row_weight[:, None])
    return total


def _matmul_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b, with no temporary when the dtypes already agree."""
    if a.dtype != out.dtype:
        out.copy_(a @ b)
    else:
        torch.mm(a, b, out=out)
