"""The optimizer state, sharded with torch.distributed.checkpoint (DCP).

Every process writes its own shards, keyed by parameter name, not by position, so any number of
processes can load it: DCP reads exactly the slices this process's shards cover.

Reading never runs code from the files. DCP's stock reader unpickles the `.metadata` index and
`torch.load(weights_only=False)`s every non-tensor item, so a crafted checkpoint could execute
anything on `--resume`. Here the index goes through an unpickler that admits only DCP's own
metadata classes (`SafeFileSystemReader`), and non-tensor items (the optimizer's
hyperparameters) through `torch.load(weights_only=True)` (`SafeLoadPlanner`); anything else is a
`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from ..folders import CheckpointError, UnsafeFileError, disk_full, member

METADATA_FILE = ".metadata"

# What DCP's .metadata index holds: its dataclasses, sizes, dtypes, layouts and paths.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata index and nothing else: any other class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a checkpoint index")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with the metadata index read by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path} is not a valid optimizer-state index (truncated, corrupt or "
                                  f"crafted): {err}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not an optimizer-state index")
        _check_storage(Path(self.path), path, metadata)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_storage(folder: Path, index: Path, metadata: Metadata) -> None:
    """Refuse an index whose storage entries read anything but byte ranges of this folder's own
    files: a relative path inside the folder (not "../x", "/dev/zero" or a link out), a regular
    file that exists, offset and length within its size, and no transforms (we write none)."""
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(f"{index} has no storage table; it is not an optimizer-state index")
    sizes: dict[str, int] = {}
    for key, info in storage.items():
        where = f"{index}: storage entry {getattr(key, 'fqn', key)!r}"
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{where} is a {type(info).__name__}, not a file range")
        try:
            file = member(folder, info.relative_path, what="optimizer storage file")
        except UnsafeFileError as err:
            raise CheckpointError(f"{where}: {err}") from None
        if info.relative_path not in sizes:
            if not file.is_file():
                raise CheckpointError(f"{where} names {info.relative_path!r}, which {folder} does not hold")
            sizes[info.relative_path] = file.stat().st_size
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0
                and offset + length <= sizes[info.relative_path]):
            raise CheckpointError(f"{where} cannot be read: it spans bytes {offset}..{offset}+{length} of "
                                  f"{info.relative_path}, which has {sizes[info.relative_path]} (truncated or crafted)")
        if info.transform_descriptors:
            raise CheckpointError(f"{where} asks for transforms {list(info.transform_descriptors)}; optimizer "
                                  f"state is written without any")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, loading non-tensor items with `torch.load(weights_only=True)`: plain numbers,
    strings and containers (an optimizer's hyperparameters), never arbitrary objects."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"optimizer-state item {read_item.dest_index.fqn!r} holds something other "
                                  f"than plain data: {err}") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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
        try:
            dcp.save(get_optimizer_state_dict(net, optimizer), checkpoint_id=directory,
                     no_dist=not dist.is_initialized())
        except CheckpointException as err:
            cause = _first_cause(err)
            # torch.save reports a short write on a full disk only as "unexpected pos N vs M".
            if (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) or (
                    "unexpected pos" in str(cause)):
                raise disk_full(directory) from None
            if isinstance(cause, OSError):
                raise cause from None
            raise RuntimeError(f"writing the optimizer state to {directory} failed: {cause}") from None


def load_optimizer(directory: Path, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load `save_optimizer`'s state into `optimizer`, resharded for this run's processes.

    The state dict of the (fresh) optimizer is the template: torch.distributed.checkpoint reads
    exactly the slices this process's shards cover, whatever the process count at save time.
    Raises CheckpointError naming the folder for anything unreadable or not plain data.
    """
    directory = Path(directory)
    if not (directory / METADATA_FILE).is_file():
        raise FileNotFoundError(f"no optimizer state in {directory} (expected torch.distributed.checkpoint "
                                f"files with a {METADATA_FILE} index)")
    # The template only gets its state tensors from a zero-gradient step, which is skipped while
    # any gradient is set: stale gradients would leave it empty, and nothing would be loaded.
    optimizer.zero_grad(set_to_none=True)
    state = get_optimizer_state_dict(net, optimizer)
    reader = SafeFileSystemReader(directory)
    reader.read_metadata()  # refused here with a clear error, before DCP retries it noisily
    with _single_process_quietly():
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(),
                     no_dist=not dist.is_initialized())
        except CheckpointError:
            raise
        except (CheckpointException, Exception) as err:  # CheckpointException is a BaseException
            cause = _first_cause(err)
            if isinstance(cause, CheckpointError):
                raise cause from None
            raise CheckpointError(f"the optimizer state in {directory} cannot be read (truncated or corrupt?): "
                                  f"{cause}") from None
    set_optimizer_state_dict(net, optimizer, state)


def _first_cause(err: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (which collects one per rank)."""
    if isinstance(err, CheckpointException):
        for exc, _trace in err.failures.values():
            return exc
    return err
