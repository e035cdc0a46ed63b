"""The AutoRegressiveWrapper: next-token loss over a Transformer, and generation from it.

The Transformer only maps tokens to logits; this wrapper owns the loss, sampling and the KV
cache's lifecycle (generation.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Transformer, check_tokens

IGNORE_INDEX = -100
LOSS_CHUNK = 1024  # rows of logits alive at once in the loss


class LMOutput(NamedTuple):
    loss: Tensor  # scalar, mean next-token cross-entropy in nats
    logits: Tensor  # (B, T - 1, V): the predictions for tokens[:, 1:]


class AutoRegressiveWrapper(nn.Module):
    def __init__(self, net: Transformer) -> None:
        super().__init__()
        self.net = net

    @property
    def config(self):
        return self.net.config

    def forward(self, tokens: Tensor, *, return_logits: bool = False) -> Tensor | LMOutput:
        """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1].

        `tokens` is (B, T) with 2 <= T <= max_seq_len + 1 (the inputs are the first T - 1).
        Returns the scalar loss, or `LMOutput(loss, logits)` with `return_logits=True`.
        """
        check_tokens(tokens, self.config, max_len=self.config.max_seq_len + 1)
        if tokens.shape[1] < 2:
            raise ValueError(f"the loss needs at least 2 tokens per sequence, got {tokens.shape[1]}")
        inputs, targets = tokens[:, :-1], tokens[:, 1:].long()
        if return_logits:
            logits = self.net(inputs, validate=False)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            return LMOutput(loss, logits)
        hidden = self.net(inputs, return_hidden=True, validate=False)  # (B, T - 1, C)
        return linear_cross_entropy(hidden.flatten(0, 1), self.net.to_logits.weight, targets.flatten())

    def generate(self, prompts, seq_len: int, **kwargs) -> Tensor:
        """Sample `seq_len` new tokens after each prompt; see `andromeda.generation.generate`."""
        from .generation import generate

        return generate(self.net, prompts, seq_len, **kwargs)

    def stream(self, prompts, seq_len: int, **kwargs):
        """Yield each step's new tokens (B,) as they are sampled; see `generation.stream`."""
        from .generation import stream

        return stream(self.net, prompts, seq_len, **kwargs)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str = "mean", chunk: int = LOSS_CHUNK
) -> Tensor:
    """cross_entropy(hidden @ weight.T, targets) without holding all (N, V) logits at once.

    Targets equal to -100 are ignored. Under autograd, each chunk's gradient is formed while its
    logits exist (the loss is the end of the graph, so d loss / d logits = softmax - onehot is
    known in the forward pass), so training keeps one chunk of logits alive and does no extra
    matrix products — the fused linear-cross-entropy idea of Liger-Kernel and Apple's CCE.
    Its backward hands those gradients over, so it runs once per graph (no retain_graph reuse).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not torch.is_grad_enabled():
        # No backward can follow (evaluation under torch.no_grad()), but Function.forward sees
        # needs_input_grad True for any parameter regardless of grad mode: detach, so it skips
        # the two gradient products and the (V, C) fp32 gradient buffer.
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets, reduction, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str, chunk: int) -> Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != IGNORE_INDEX
        divisor = valid.sum().clamp(min=1) if reduction == "mean" else valid.new_ones((), dtype=torch.long)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, fp64 stays
        # Under autocast, cast the operands once, not per chunk and per product: autocast would
        # recast the (n, V) gradient for each of its two products.
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.empty_like(weight, dtype=acc) if want_weight else None
        # One (chunk, V) buffer holds each chunk's logits, then its softmax, then its gradient:
        # every step is in place, so no (n, V) tensor is allocated (and page-faulted) per chunk.
        buffer = hidden.new_empty((min(chunk, hidden.shape[0]), weight.shape[0]), dtype=acc)
        with torch.autocast(device, enabled=False):
            hidden_c, w = hidden.to(compute), weight.to(compute)
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                h, t, ok = hidden_c[rows], targets[rows], valid[rows]
                logits = buffer[: len(t)]  # (n, V)
                _matmul_into(logits, h, w.T)
                safe_t = t.clamp(min=0)
                picked = logits.gather(1, safe_t[:, None])  # (n, 1)
                peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                exp = logits.sub_(peak).exp_()  # exp(logits - peak), in place
                sums = exp.sum(dim=-1, keepdim=True)  # (n, 1)
                total += ((peak + sums.log() - picked).squeeze(1) * ok).sum()
                if want_hidden or want_weight:
                    # d (total / divisor) / d logits = (softmax - onehot) * ok / divisor
                    row_weight = ok[:, None].to(acc) / divisor  # (n, 1)
                    grad = exp.mul_(row_weight / sums)
                    grad.scatter_add_(1, safe_t[:, None], -row_weight)
                    grad = grad.to(compute)
                    if want_hidden:
                        _matmul_into(grad_hidden[rows], grad, w)  # (n, C)
                    if want_weight:
                        _matmul_into(grad_weight, grad.T, h, accumulate=start > 0)  # (V, C)
        # Plain attributes, not save_for_backward: backward scales them in place and hands them
        # over, so autograd can adopt them as .grad without another (V, C) copy.
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
        gw = grad_weight.mul_(grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def _matmul_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool = False) -> None:
    """out = a @ b (or out += a @ b), with no temporary when the dtypes already agree."""
    if a.dtype != out.dtype:
        if accumulate:
            out.add_(a @ b)
        else:
            out.copy_(a @ b)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)
