"""DDP or FSDP2 over a Transformer, applied from outside the model; activation checkpointing;
the gradient norm over shards; the whole model's state dict for a consolidated checkpoint.

- ddp: `DistributedDataParallel` over the Transformer, whose forward computes the loss.
- fsdp: FSDP2 (`fully_shard`; Zhao et al. 2023, https://arxiv.org/abs/2304.11277), one unit per
  Block plus the root (embedding, final norm, to_logits). Each process keeps 1/W of the weights,
  gradients and AdamW moments.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ..config import Config
from ..model import Transformer, build_transformer
from .environment import DistEnv

PARALLEL_MODES = ("none", "ddp", "fsdp")


def _check_mode(mode: str, env: DistEnv) -> None:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; expected one of {', '.join(PARALLEL_MODES)}")
    if env.distributed and mode == "none":
        raise ValueError(f"{env.world_size} processes were launched but the parallel mode is 'none'; "
                         f"pass --parallel ddp or --parallel fsdp")


def check_parallel_setup(mode: str, batch_size: int, grad_accum: int, env: DistEnv) -> None:
    """Raise a ValueError unless `mode` fits the processes launched and the global batch splits
    evenly: only when every micro-batch of every process holds the same number of sequences is
    the mean of their mean losses the mean over the global batch."""
    _check_mode(mode, env)
    if batch_size % (env.world_size * grad_accum):
        raise ValueError(
            f"batch size {batch_size} does not split evenly over {env.world_size} processes x {grad_accum} "
            f"accumulation micro-steps; use a --batch-size that is a multiple of "
            f"{env.world_size * grad_accum}"
        )


# --------------------------------------------------------------------------- parallelism


def apply_activation_checkpointing(net: Transformer) -> None:
    """Recompute each block's activations in the backward pass instead of storing them
    (Chen et al. 2016, https://arxiv.org/abs/1604.06174): memory per block drops to its input.

    Applied from outside the model, as torchtitan does: each block's `forward` is wrapped, so the
    parameters and the state dict are untouched and FSDP's hooks (on the module call) still run.
    Non-reentrant checkpointing, PyTorch's recommended mode, which also handles the keyword-free
    dataclass argument.
    """
    for block in net.blocks:
        if getattr(block, "_checkpointed", False):
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block._checkpointed = True


def parallelize(
    net: Transformer,
    mode: str,
    env: DistEnv,
    *,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Apply `mode` ("none", "ddp" or "fsdp") to `net`; returns the module to call for the loss,
    `train_module(inputs, targets=targets)`.

    With one process every mode is the plain Transformer. "fsdp" shards `net` in place (it may
    still be on the meta device; see `build_parallel_model`) and returns it: one FSDP2 unit per
    Block plus the root (embedding, final norm, output projection), each resharded after its
    forward, as the loss is computed inside the root's forward. `param_dtype` (e.g.
    torch.bfloat16) is the dtype the gathered weights compute in, while the shards, the optimizer
    and the gradient reduction stay fp32 (gloo all-gathers bf16 on the CPU as NCCL does on GPUs).
    "ddp" returns a DistributedDataParallel around `net`.
    """
    _check_mode(mode, env)
    if activation_checkpointing:
        apply_activation_checkpointing(net)
    if not env.distributed or mode == "none":
        return net
    if mode == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=device_ids)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Blocks get the residual stream in param_dtype from the embedding already; casting their
    # inputs would also round the fp32 xPos tables and ALiBi slopes in AttentionInputs.
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
    for block in net.blocks:
        fully_shard(block, mp_policy=block_policy)
    fully_shard(net, mp_policy=policy)
    return net


def build_parallel_model(
    make_net: Callable[[], Transformer],
    config: Config,
    mode: str,
    env: DistEnv,
    *,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
) -> tuple[Transformer, nn.Module]:
    """The Transformer and the module to call for the loss (see `parallelize`).

    `make_net()` builds the single-process model: a fresh initialisation or a checkpoint. For
    "fsdp" over several processes only rank 0 calls it; every process shards an empty model built
    on the meta device and receives its shard of rank 0's weights, so no other process ever holds
    the whole model, and the weights are the ones a single process would start from.
    """
    if mode != "fsdp" or not env.distributed:
        net = make_net()
        return net, parallelize(net, mode, env, param_dtype=param_dtype,
                                activation_checkpointing=activation_checkpointing)
    full_state = make_net().state_dict() if env.is_main else {}
    net = build_transformer(config, device="meta")
    train_module = parallelize(net, mode, env, param_dtype=param_dtype,
                               activation_checkpointing=activation_checkpointing)
    net.to_empty(device=env.device)
    set_model_state_dict(net, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return net, train_module


def is_sharded(net: nn.Module) -> bool:
    return isinstance(net, FSDPModule)


@contextlib.contextmanager
def gradient_sync(train_module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on the micro-steps that only accumulate.

    FSDP reduce-scatters after every micro-step instead: skipping it would keep whole unsharded
    gradients on every process, which is the memory FSDP exists to save.
    """
    if enabled or not isinstance(train_module, DistributedDataParallel):
        yield
        return
    with train_module.no_sync():
        yield


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The global gradient norm, over the shards of all processes; clip to `max_norm` if finite.

    Under FSDP each gradient is a DTensor shard: the norm is reduced over the processes
    (`full_tensor`) before the clip coefficient is formed, so every process scales by the same
    factor a single process would.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def full_model_state_dict(net: nn.Module, env: DistEnv) -> dict[str, Tensor]:
    """The whole model's state dict on rank 0's CPU (other processes get {}). Collective under
    FSDP: the shards are gathered one tensor at a time and each is moved to the CPU at once, so
    the device holds at most one gathered tensor beyond its shards."""
    if is_sharded(net):
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return {}
    return {name: t.detach().cpu() for name, t in net.state_dict().items()}
