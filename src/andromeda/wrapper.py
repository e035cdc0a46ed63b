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
        count = valid.sum().clamp(min=1)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, fp64 stays
        # Under autocast, cast the operands once, not per chunk and per product: autocast would
        # recast the (n, V) gradient for each of its two products.
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if want_weight else None
        with torch.autocast(device, enabled=False):
            hidden_c, w = hidden.to(compute), weight.to(compute)
            for start in range(0, hidden.shape[0], chunk):
                h, t, ok = hidden_c[start : start + chunk], targets[start : start + chunk], valid[start : start + chunk]
                logits = (h @ w.T).to(acc)  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                safe_t = t.clamp(min=0)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                total += ((lse - picked) * ok).sum()
                if want_hidden or want_weight:
                    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
                    grad[torch.arange(len(t), device=t.device), safe_t] -= 1
                    grad = grad.mul_(ok[:, None]).to(compute)  # (n, V) d loss_sum / d logits
                    if want_hidden:
                        grad_hidden[start : start + chunk] = grad @ w
                    if want_weight:
                        if compute == acc:
                            grad_weight.addmm_(grad.T, h)
                        else:
                            grad_weight += grad.T @ h
        divisor = count if reduction == "mean" else torch.ones_like(count)
        ctx.save_for_backward(grad_hidden, grad_weight, divisor)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight, divisor = ctx.saved_tensors
        scale = grad_out / divisor
        gh = (grad_hidden * scale).to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None
