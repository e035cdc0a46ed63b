"""Held-out evaluation: mean loss, perplexity and bits per byte over a token array.

Bits per byte (total nats / ln 2 / bytes of text) is the tokenizer-independent number: a byte
model and a BPE model of the same text are compared on it directly (as in Gao et al. 2020,
"The Pile", section 5). Every token except the first is predicted exactly once, in windows of
`seq_len` that each start without context (`andromeda.data.eval_windows`), so a longer `seq_len`
gives each prediction more context on average; evaluating beyond the training length shows how
well the positions extrapolate (ALiBi: Press et al. 2022).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from .data import EvalWindow, eval_windows
from .model import Transformer


def _selected_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None) -> Iterator[EvalWindow]:
    """All windows, or `max_windows` of them spread evenly over the array (a quick estimate
    that samples every document instead of only the first)."""
    total = -(-(len(tokens) - 1) // seq_len)  # ceil, as in eval_windows
    if max_windows is None or max_windows >= total:
        yield from eval_windows(tokens, seq_len)
        return
    keep = {int(i) for i in np.linspace(0, total - 1, max_windows).round()}
    for index, window in enumerate(eval_windows(tokens, seq_len)):
        if index in keep:
            yield window


def _batches(windows: Iterator[EvalWindow], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack windows into (B, T + 1) batches; a window of another length (the last, shorter one)
    starts a batch of its own."""
    pending: list[torch.Tensor] = []
    for window in windows:
        if pending and (len(pending) == batch_size or len(window.tokens) != len(pending[0])):
            yield torch.stack(pending)
            pending = []
        pending.append(window.tokens)
    if pending:
        yield torch.stack(pending)


@torch.no_grad()
def evaluate(
    net: Transformer,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    num_bytes: int,
    *,
    max_windows: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float | int]:
    """Loss (nats/token), perplexity and bits per byte of `net` on the 1-D array `tokens`.

    `num_bytes` is the UTF-8 size of the text `tokens` encode (`TokenStore.num_bytes`). With
    `max_windows`, only that many windows (evenly spread) are scored and the byte count is
    scaled by the fraction of tokens scored: an estimate for periodic evaluation during training.
    Returns {"loss", "perplexity", "bits_per_byte", "tokens" (predictions scored), "bytes"}.
    """
    if seq_len > net.config.max_seq_len:
        raise ValueError(
            f"evaluation seq_len {seq_len} exceeds the model's max_seq_len {net.config.max_seq_len}; "
            f"use --seq-len <= {net.config.max_seq_len}"
        )
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 (or None to score every window), got {max_windows}")
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive (the size of the evaluated text), got {num_bytes}")
    device = next(net.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None else contextlib.nullcontext()
    )
    was_training = net.training
    net.eval()
    total_nats, count = 0.0, 0
    try:
        for batch in _batches(_selected_windows(tokens, seq_len, max_windows), batch_size):
            batch = batch.to(device)  # (B, T + 1)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with autocast:
                nats = net(inputs, targets=targets, reduction="sum")
            total_nats += float(nats)
            count += targets.numel()
    finally:
        net.train(was_training)
    scored_bytes = num_bytes * count / (len(tokens) - 1)
    loss = total_nats / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nats / math.log(2) / scored_bytes,
        "tokens": count,
        "bytes": round(scored_bytes),
    }
