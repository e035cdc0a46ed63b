"""The process group torchrun describes, and the collectives processes use to agree.

Outside torchrun, or with one process, nothing is initialised and every collective is the
identity, so single-process code runs the same calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..choices import DEFAULT_TIMEOUT_S  # how long a collective waits for the other processes by default

# How long processes wait for each other around work of unknown length (tokenising a corpus,
# training a BPE, writing a large checkpoint): no practical limit. A process that dies still ends
# the job, because torchrun stops the others when one fails.
WAIT_TIMEOUT_S = 7 * 24 * 3600.0

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world_size` processes, and its device."""

    rank: int = 0
    local_rank: int = 0  # the rank within this node: the index of its GPU
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # A gloo group over the same processes, for waits without the collectives' timeout (`wait`).
    wait_group: Any = field(default=None, compare=False, repr=False)

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
def distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistEnv]:
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
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_TIMEOUT_S))
    env = DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device, wait_group=wait_group)
    logger.info("process %d of %d on %s (backend %s)", rank, world_size, device, dist.get_backend())
    try:
        yield env
    finally:
        if created:
            dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available; use --device cpu")
    return device


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(value: Tensor, env: DistEnv) -> Tensor:
    """The sum of `value` over all processes (a copy; `value` is untouched)."""
    value = value.detach().clone()
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: Tensor, env: DistEnv) -> Tensor:
    """The mean of `value` over all processes (a copy; `value` is untouched)."""
    return all_reduce_sum(value, env) / env.world_size


def all_reduce_max(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise maxima over all processes: how the ranks agree on a clock or a stop flag."""
    if not env.distributed:
        return list(values)
    # On the CPU, over the wait group (gloo): agreeing on a clock never waits for a GPU's queue.
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=env.wait_group)
    return tensor.tolist()


def broadcast_object(value: Any, env: DistEnv) -> Any:
    """Rank 0's `value` (any picklable object), on every process; waits as long as rank 0 needs to
    produce it (the wait group)."""
    if not env.distributed:
        return value
    box = [value if env.is_main else None]
    dist.broadcast_object_list(box, src=0, group=env.wait_group)
    return box[0]


def wait(env: DistEnv) -> None:
    """A barrier with no practical time limit (`WAIT_TIMEOUT_S`), for waits around work of unknown
    length: the job's collectives keep their `--dist-timeout` for the training steps."""
    if env.distributed:
        dist.barrier(group=env.wait_group)


@contextlib.contextmanager
def node_first(env: DistEnv) -> Iterator[None]:
    """The first process of each node runs the block first (fetching a corpus, tokenising it into
    the node's cache, training a tokenizer); the others run it after every node's first process
    is done, and find the results there. Nothing is done twice on a node, no two processes write
    the same cache files, and the wait has no practical time limit."""
    if env.local_rank != 0:
        wait(env)
    try:
        yield
    finally:
        if env.local_rank == 0:
            wait(env)
