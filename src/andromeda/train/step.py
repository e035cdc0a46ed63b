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
from ..model import IGNORE_INDEX
from ..parallel.environment import DistEnv, all_reduce_sum
from ..parallel.parallelize import clip_grad_norm, gradient_sync
from .config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before applying the update."""


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: tuple[Tensor, Tensor],
    optimizer: torch.optim.Optimizer,
    lr: float,
    config: TrainConfig,
    step: int,
    env: DistEnv = DistEnv(),
    autocast: bool | None = None,
) -> tuple[float, float]:
    """One optimizer update on this process's share of the batch, (inputs, targets) of (B / W, T)
    each (targets -100 where there is nothing to predict), split into `grad_accum` micro-batches;
    `model` is what `parallelize` returned, called as `model(inputs, targets=targets)`.

    The loss is the mean over every target token of the global batch: each micro-batch
    backpropagates its summed loss times W / N, with N the targets of all processes, since
    DDP/FSDP average the gradients over the W processes. (With every target counted, N is the
    same each step and this is the mean of the micro-batches' means.) `autocast` (default
    `config.bf16`) wraps the forward passes.

    Returns (mean loss, gradient norm before clipping), the same on every process. Raises
    NonFiniteLossError before the update when either is NaN/inf, so the weights never take a
    non-finite step.
    """
    autocast = config.bf16 if autocast is None else autocast
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=True)
    counted = all_reduce_sum((targets != IGNORE_INDEX).sum().to(torch.float32), env).clamp(min=1)  # N
    scale = env.world_size / counted
    total = torch.zeros((), dtype=torch.float32, device=inputs.device)
    micro_batches = list(zip(inputs.chunk(config.grad_accum), targets.chunk(config.grad_accum)))
    for index, (micro_inputs, micro_targets) in enumerate(micro_batches):
        # DDP all-reduces the gradients once, after the last micro-step.
        with gradient_sync(model, enabled=index == len(micro_batches) - 1):
            with autocast_context(inputs.device, autocast):
                # Ids come from the token store, checked when it was built: no per-step check
                # (each would read the batch back from the device).
                loss = model(micro_inputs, targets=micro_targets, reduction="sum", validate=False)
            (loss * scale).backward()
        total += loss.detach().float()
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = clip_grad_norm(params, max_norm)
    # The one point a step waits for the device: both numbers read together.
    mean_loss, grad_norm = torch.stack([all_reduce_sum(total, env) / counted, grad_norm.float()]).tolist()
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"non-finite training loss ({mean_loss}) at step {step + 1}")
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at step {step + 1} "
                                 f"(loss {mean_loss:.4f})")
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    optimizer.step()
    return mean_loss, grad_norm


def lm_batch(tokens: np.ndarray, step: int, config: TrainConfig, device: torch.device,
             rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
    """This process's share of step `step`'s global batch of text windows: (inputs, targets),
    each (batch_size / world_size, seq_len), the targets the inputs shifted by one."""
    batch = sample_batch(tokens, step, config.batch_size, config.seq_len, config.seed, rank, world_size)
    batch = batch.to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]
