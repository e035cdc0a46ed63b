"""One optimizer step: this process's share of the batch, micro-batches, the loss through the
parallel wrapper, gradient clipping over all shards, and the non-finite check before the update.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import Tensor, nn

from ..data import sample_batch
from ..parallel.environment import DistEnv, all_reduce_mean
from ..parallel.parallelize import clip_grad_norm, gradient_sync
from .config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before applying the update."""


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: Tensor,
    optimizer: torch.optim.Optimizer,
    lr: float,
    config: TrainConfig,
    step: int,
    env: DistEnv = DistEnv(),
    autocast: bool | None = None,
) -> tuple[float, float]:
    """One optimizer update on this process's `batch` (B / W, T + 1), split into `grad_accum`
    micro-batches; `model` is what `parallelize` returned, called as
    `model(inputs, targets=targets)` for the loss.

    Every micro-batch of every process holds the same number of target tokens, so the mean of
    their mean losses — each process averages its own, `all_reduce_mean` averages the processes,
    as DDP/FSDP average their gradients — is the mean over the global batch. `autocast` (default
    `config.bf16`) is off under FSDP, whose mixed-precision policy computes in bf16 instead.

    Returns (mean loss, gradient norm before clipping), the same on every process. Raises
    NonFiniteLossError before the update when either is NaN/inf, so the weights never take a
    non-finite step.
    """
    autocast = config.bf16 if autocast is None else autocast
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float32, device=batch.device)
    micro_batches = batch.chunk(config.grad_accum)  # (B / W / A, T + 1) each
    for index, micro in enumerate(micro_batches):
        # DDP all-reduces the gradients once, after the last micro-step.
        with gradient_sync(model, enabled=index == len(micro_batches) - 1):
            with autocast_context(batch.device, autocast):
                # Ids come from the token store, checked when it was built: no per-step check
                # (each would read the batch back from the device).
                loss = model(micro[:, :-1], targets=micro[:, 1:], validate=False)
            (loss / config.grad_accum).backward()
        total += loss.detach().float()
    mean_loss = float(all_reduce_mean(total, env)) / config.grad_accum
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"non-finite training loss ({mean_loss}) at step {step + 1}")
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = clip_grad_norm(params, max_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at step {step + 1} "
                                 f"(loss {mean_loss:.4f})")
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    optimizer.step()
    return mean_loss, grad_norm


def get_batch(tokens: np.ndarray, step: int, config: TrainConfig, device: torch.device,
              rank: int = 0, world_size: int = 1) -> Tensor:
    """This process's share of step `step`'s global batch: (batch_size / world_size, seq_len + 1)."""
    batch = sample_batch(tokens, step, config.batch_size, config.seq_len, config.seed, rank, world_size)
    return batch.to(device, non_blocking=True)
