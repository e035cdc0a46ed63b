"""Training batches and evaluation windows over a token array.

Sampling is a pure function of ``(seed, step)``: resuming needs only the step counter, and the
global batch is the same whatever the number of processes, so a run can be resumed on a different
number of GPUs and see exactly the data it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


def sample_batch(
    tokens: np.ndarray,
    step: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """This rank's share of the training batch for ``step``: a LongTensor ``(B // W, T + 1)``.

    The global batch is ``batch_size`` windows of ``seq_len + 1`` tokens at uniformly random
    starts drawn from ``PCG64([seed, step])``, so it depends only on (seed, step) — not on the
    process count, nor on earlier steps. Rank ``r`` takes the contiguous rows
    ``r * B / W .. (r + 1) * B / W``; concatenating all ranks in order gives the global batch.
    Inputs are ``batch[:, :-1]`` and targets ``batch[:, 1:]``.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be non-negative, got step={step}, seed={seed}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by world_size ({world_size})"
        )
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the corpus has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a shorter seq_len or more data"
        )
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # all windows fit
    per_rank = batch_size // world_size
    starts = starts[rank * per_rank : (rank + 1) * per_rank]
    rows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return torch.from_numpy(rows)  # (B // W, T + 1)


@dataclass(frozen=True)
class EvalWindow:
    """A chunk of the evaluation tokens: ``tokens[start : start + len(tokens)]`` of the array.

    Predict ``targets`` from ``inputs``; every target in it is counted once across all windows,
    so summing the per-token loss over all windows gives the corpus total.
    """

    start: int
    tokens: torch.Tensor  # (n + 1,) int64

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[1:]

    @property
    def num_targets(self) -> int:
        return self.tokens.numel() - 1


def eval_windows(
    tokens: np.ndarray, seq_len: int, max_windows: int | None = None
) -> Iterator[EvalWindow]:
    """Deterministic windows in which every token except the very first is predicted once.

    Window ``i`` holds tokens ``[i * seq_len, i * seq_len + seq_len + 1)``: consecutive windows
    share one token, the last target of one being the first input of the next, and the final
    window may be shorter (at least 2 tokens). This drops context at each window start (each
    window starts cold) in exchange for one forward pass per ``seq_len`` tokens. ``max_windows``
    keeps only the first windows, for a quicker estimate on a prefix.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    if len(tokens) < 2:
        raise ValueError(f"evaluation needs at least 2 tokens, got {len(tokens)}")
    count = -(-(len(tokens) - 1) // seq_len)  # ceil: windows needed to predict tokens 1..N-1
    if max_windows is not None:
        count = min(count, max_windows)
    for index in range(count):
        start = index * seq_len
        chunk = np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)
        yield EvalWindow(start=start, tokens=torch.from_numpy(chunk))
