"""Training on several processes: the process group, data or fully sharded parallelism applied from
outside the model, and the collective halves of a checkpoint.

torchrun is the launcher; it starts one process per device and sets RANK, LOCAL_RANK and
WORLD_SIZE, which `distributed` reads:

    torchrun --standalone --nproc_per_node 2 -m andromeda train --parallel ddp ...

Each process takes a contiguous block of every step's global batch (`data.sample_batch`, a
function of (seed, step) only) and splits its block further into the gradient-accumulation
micro-batches. Every micro-batch has the same number of target tokens, so the mean of the
per-micro-batch mean losses is the mean over all tokens of the global batch: each process
backpropagates `loss / grad_accum`, and DDP's all-reduce and FSDP's reduce-scatter *average* the
gradients over the W processes, giving d(global token mean)/dθ exactly as one process would
compute it, up to the order of floating-point sums. The logged loss is averaged the same way
(`all_reduce_mean`). The loss curve therefore does not depend on the number of processes.

Parallelism is applied to a plain single-device model, as torchtitan does (`parallelize`):

- ddp: `DistributedDataParallel` over the AutoRegressiveWrapper, so the fused loss — which reads
  `net.to_logits.weight` outside the Transformer's forward — runs inside DDP's forward.
- fsdp: FSDP2 (`fully_shard`; Zhao et al. 2023, https://arxiv.org/abs/2304.11277), one unit per
  Block plus the root (embedding, final norm, to_logits). The root is sharded with
  `reshard_after_forward=False`: the loss multiplies the hidden states by `to_logits.weight` after
  the root's forward has returned, so the root's parameters must still be the gathered, plain
  tensors then; their gradients are reduce-scattered into the shards when backward ends. Each
  process keeps 1/W of the weights, gradients and AdamW moments.

Checkpoints (checkpoint.py) are consolidated at save time for the weights — rank 0 gathers them
into one model.safetensors, which single-process evaluation, generation and `from_pretrained` read
unchanged — and sharded for the optimizer state, which every process writes with
torch.distributed.checkpoint and which is resharded on load for any number of processes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from .andromeda import Andromeda
from .config import Config
from .model import Transformer

logger = logging.getLogger(__name__)

PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world_size` processes, and its device."""

    rank: int = 0
    local_rank: int = 0  # the rank within this node: the index of its GPU
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, draws the progress bar, writes metrics and commits checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# --------------------------------------------------------------------------- the process group


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def launched_rank() -> int:
    """This process's rank as torchrun set it (RANK); 0 without torchrun."""
    return _env_int("RANK") or 0


@contextlib.contextmanager
def distributed(device: torch.device, timeout_s: float = 600.0) -> Iterator[DistEnv]:
    """Join the process group torchrun describes (if any) and leave it on exit.

    Outside torchrun, or with one process, nothing is initialised and the env is rank 0 of 1.
    The backend is NCCL for CUDA devices (plus gloo for CPU tensors) and gloo otherwise. Each
    process takes the GPU of its LOCAL_RANK. `timeout_s` bounds every collective: a process
    whose peer died raises instead of waiting forever.
    """
    world_size = _env_int("WORLD_SIZE") or 1
    if world_size == 1:
        yield DistEnv(device=device)
        return
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None:
        raise ValueError("WORLD_SIZE is set but RANK or LOCAL_RANK is not; launch with torchrun")
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise ValueError(f"device {device} conflicts with LOCAL_RANK={local_rank}: under torchrun each "
                             f"process uses the GPU of its local rank; pass --device cuda (or auto)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"a process group of {dist.get_world_size()} processes is already initialised, "
                           f"but the environment says rank {rank} of {world_size}")
    env = DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
    logger.info("process %d of %d on %s (backend %s)", rank, world_size, device, dist.get_backend())
    try:
        yield env
    finally:
        if created:
            dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(value: Tensor, env: DistEnv) -> Tensor:
    """The mean of `value` over all processes (a copy; `value` is untouched)."""
    value = value.detach().clone()
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def all_reduce_max(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise maxima over all processes: how the ranks agree on a clock or a stop flag."""
    if not env.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def broadcast_object(value: Any, env: DistEnv) -> Any:
    """Rank 0's `value` (any picklable object), on every process."""
    if not env.distributed:
        return value
    box = [value if env.is_main else None]
    dist.broadcast_object_list(box, src=0, device=env.device if env.device.type == "cuda" else None)
    return box[0]


@contextlib.contextmanager
def main_process_first(env: DistEnv) -> Iterator[None]:
    """Rank 0 runs the block first (downloads, tokenising into a cache); the others then run it
    and find the results cached, instead of all writing the same files at once."""
    if not env.is_main:
        barrier(env)
    try:
        yield
    finally:
        if env.is_main:
            barrier(env)


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
    model: Andromeda,
    mode: str,
    env: DistEnv,
    *,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Apply `mode` ("none", "ddp" or "fsdp") to `model`; returns the module to call for the loss.

    With one process every mode is the plain model. "fsdp" shards `model.Andromeda` in place
    (which may still be on the meta device; see `build_parallel_model`) and returns `model`;
    `param_dtype` (e.g. torch.bfloat16) is then the dtype the gathered weights compute in, while
    the shards, the optimizer and the gradient reduction stay fp32 (gloo all-gathers bf16 on the
    CPU as NCCL does on GPUs). "ddp" returns a DistributedDataParallel around `model.decoder`.
    """
    _check_mode(mode, env)
    net = model.Andromeda
    if activation_checkpointing:
        apply_activation_checkpointing(net)
    if not env.distributed or mode == "none":
        return model
    if mode == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model.decoder, device_ids=device_ids)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Blocks get the residual stream in param_dtype from the embedding already; casting their
    # inputs would also round the fp32 xPos tables and ALiBi slopes in AttentionInputs.
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
    for block in net.blocks:
        fully_shard(block, mp_policy=block_policy)
    # The root stays gathered after its forward: the loss reads to_logits.weight afterwards.
    fully_shard(net, mp_policy=policy, reshard_after_forward=False)
    return model


def build_parallel_model(
    make_model: Callable[[], Andromeda],
    config: Config,
    mode: str,
    env: DistEnv,
    *,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
) -> tuple[Andromeda, nn.Module]:
    """The model and the module to call for the loss (see `parallelize`).

    `make_model()` builds the single-process model: a fresh initialisation or a checkpoint. For
    "fsdp" over several processes only rank 0 calls it; every process shards an empty model built
    on the meta device and receives its shard of rank 0's weights, so no other process ever holds
    the whole model, and the weights are the ones a single process would start from.
    """
    if mode != "fsdp" or not env.distributed:
        model = make_model()
        return model, parallelize(model, mode, env, param_dtype=param_dtype,
                                  activation_checkpointing=activation_checkpointing)
    full_state = make_model().Andromeda.state_dict() if env.is_main else {}
    model = Andromeda.from_config(config, device="meta")
    train_module = parallelize(model, mode, env, param_dtype=param_dtype,
                               activation_checkpointing=activation_checkpointing)
    model.Andromeda.to_empty(device=env.device)
    set_model_state_dict(model.Andromeda, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, train_module


def is_sharded(net: nn.Module) -> bool:
    return isinstance(net, FSDPModule)


@contextlib.contextmanager
def gathered(net: nn.Module) -> Iterator[None]:
    """Hold an FSDP model's root parameters gathered for code that reads them directly (an
    evaluation loop reading `net.to_logits.weight` before its first forward), then shard them
    again. Every process must enter it. A no-op for an unsharded model."""
    if not is_sharded(net):
        yield
        return
    net.unshard()
    try:
        yield
    finally:
        net.reshard()


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


# --------------------------------------------------------------------------- checkpoint state


def full_model_state_dict(net: nn.Module, env: DistEnv) -> dict[str, Tensor]:
    """The whole model's state dict on rank 0's CPU (other processes get {}). Collective under
    FSDP: the shards are gathered one tensor at a time and each is moved to the CPU at once, so
    the device holds at most one gathered tensor beyond its shards."""
    if is_sharded(net):
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return {}
    return {name: t.detach().cpu() for name, t in net.state_dict().items()}


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """Silence torch.distributed.checkpoint's warning that it runs without a process group: one
    process saving or loading is a use this module intends, not a misconfiguration."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_optimizer(directory: Path, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the optimizer state with torch.distributed.checkpoint: every process writes its own
    shards (replicated DDP state is written once), keyed by parameter name, not by position, so
    any number of processes can load it. Collective when a process group exists."""
    with _single_process_quietly():
        dcp.save(get_optimizer_state_dict(net, optimizer), checkpoint_id=directory, no_dist=not dist.is_initialized())


def load_optimizer(directory: Path, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load `save_optimizer`'s state into `optimizer`, resharded for this run's processes.

    The state dict of the (fresh) optimizer is the template: torch.distributed.checkpoint reads
    exactly the slices this process's shards cover, whatever the process count at save time.
    """
    if not (Path(directory) / ".metadata").is_file():
        raise FileNotFoundError(f"no optimizer state in {directory} (expected torch.distributed.checkpoint "
                                f"files with a .metadata index)")
    # The template only gets its state tensors from a zero-gradient step, which is skipped while
    # any gradient is set: stale gradients would leave it empty, and nothing would be loaded.
    optimizer.zero_grad(set_to_none=True)
    state = get_optimizer_state_dict(net, optimizer)
    with _single_process_quietly():
        dcp.load(state, checkpoint_id=directory, no_dist=not dist.is_initialized())
    set_optimizer_state_dict(net, optimizer, state)

