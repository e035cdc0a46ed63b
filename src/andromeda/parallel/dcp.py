"""The optimizer state, sharded with torch.distributed.checkpoint (DCP).

Every process writes its own shards, keyed by parameter name, not by position, so any number of
processes can load it: DCP reads exactly the slices this process's shards cover.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict


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
