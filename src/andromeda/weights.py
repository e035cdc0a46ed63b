"""Weights files: the one safetensors reader (its header, its dtype table, its tensors) and the
checks of a file's tensors against the model a config describes.

A safetensors file (https://github.com/huggingface/safetensors#format) is 8 bytes of
little-endian header length N, N bytes of JSON -- {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}} -- then the data, each tensor's bytes at [begin, end)
counted from the end of the header.

`SafetensorsFile` reads and checks the header once: every loader (full-precision and quantized
checkpoints, Hugging Face folders) validates names, shapes and dtypes from it before any tensor is
read, so a truncated, corrupt or mismatched file is named and nothing is half-loaded. Then either

- `mapped()`: every tensor as a copy-on-write view of a private memory map of the file, as
  safetensors' own loader gives them: nothing is read until it is used, and pages never written
  stay shared with the page cache (full-precision weights);
- `read(name)`: one tensor read into fresh memory (or a buffer given), 64-byte aligned as
  PyTorch's allocator aligns it, which the quantized kernels need (safetensors aligns to 8) and
  which mapped pages, copied while repacked, would count twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import Config
from .folders import CheckpointError
from .model import Transformer, build_transformer

# The one table of safetensors dtype names (what a header says) and the torch dtypes they read as.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit: a larger length is a corrupt file


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int  # byte offsets in the data, which starts after the header
    end: int


class SafetensorsFile:
    """A safetensors file whose header has been read and checked: `entries` {name: TensorEntry},
    `metadata` {str: str}; `read(name)` reads one tensor (as a context manager, many through one
    open file), `mapped()` maps them all.

    Any problem (not safetensors, truncated, a tensor whose byte range does not fit its shape or
    the file, an unknown dtype) raises a CheckpointError naming the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = None
        self.entries, self.metadata, self._data_start = _read_header(self.path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in self.entries.items()}

    def read(self, name: str, out: Tensor | None = None) -> Tensor:
        """The tensor `name`, read into `out` (contiguous, of its shape and dtype) or a new tensor."""
        entry = self.entries[name]
        tensor = torch.empty(entry.shape, dtype=entry.dtype) if out is None else out
        return self._read_into(tensor, name, entry.begin, entry.end)

    def read_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows start:stop (along the first dimension) of the tensor `name`, reading only those."""
        entry = self.entries[name]
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        if not entry.shape or not 0 <= start <= stop <= entry.shape[0]:
            raise IndexError(f"rows {start}:{stop} of tensor {name} of shape {entry.shape} in {self.path}")
        tensor = torch.empty((stop - start, *entry.shape[1:]), dtype=entry.dtype)
        return self._read_into(tensor, name, entry.begin + start * row_bytes, entry.begin + stop * row_bytes)

    def _read_into(self, tensor: Tensor, name: str, begin: int, end: int) -> Tensor:
        handle = self._handle or open(self.path, "rb")
        try:
            handle.seek(self._data_start + begin)
            read = handle.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) if end > begin else 0
        finally:
            if handle is not self._handle:
                handle.close()
        if read != end - begin:
            raise _unreadable(self.path, f"the file ends inside tensor {name}")
        return tensor

    def mapped(self) -> dict[str, Tensor]:
        """Every tensor, backed by a private (copy-on-write) memory map of the file: read lazily,
        never written back. A tensor whose bytes do not start at a multiple of its item size (no
        file safetensors writes) is read instead."""
        storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self._data_start
                                                 + max((e.end for e in self.entries.values()), default=0))
        tensors = {}
        for name, entry in self.entries.items():
            start = self._data_start + entry.begin
            if start % entry.dtype.itemsize:
                tensors[name] = self.read(name)
            else:
                tensors[name] = torch.empty(0, dtype=entry.dtype).set_(storage, start // entry.dtype.itemsize,
                                                                         entry.shape)
        return tensors

    def __enter__(self) -> SafetensorsFile:
        self._handle = open(self.path, "rb")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """({name: TensorEntry}, metadata, offset of the data) of the safetensors file `path`."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            raise _unreadable(path, f"its header length ({length} bytes) does not fit the file ({size} bytes)")
        try:
            header = json.loads(file.read(length))
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _unreadable(path, f"its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _unreadable(path, '"__metadata__" is not an object')
    data_bytes = size - 8 - length
    entries = {}
    for name, fields in header.items():
        entry = _entry(fields)
        if entry is None:
            raise _unreadable(path, f"tensor {name!r} is described as {_shortened(fields)}; expected "
                                    f'{{"dtype": one of {sorted(SAFETENSORS_DTYPES)}, "shape": [...], "data_offsets": '
                                    f"[begin, end]}} with end - begin the bytes of that shape")
        if entry.end > data_bytes:
            raise _unreadable(path, f"tensor {name!r} ends at byte {entry.end} of the data, which holds {data_bytes}")
        entries[name] = entry
    return entries, metadata, 8 + length


def _unreadable(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {detail}")


def _shortened(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _entry(fields: Any) -> TensorEntry | None:
    """The TensorEntry a header's fields describe; None if they are malformed or inconsistent."""
    if not isinstance(fields, dict):
        return None
    name, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        return None
    if not all(type(n) is int and n >= 0 for n in (*shape, *offsets)):
        return None
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        return None
    return TensorEntry(tuple(shape), dtype, begin, end)


# --------------------------------------------------------------------------- checks and building


def state_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the state dict of a Transformer of `config` (built on the meta device)."""
    return {name: tuple(t.shape) for name, t in build_transformer(config, device="meta").state_dict().items()}


def shape_problems(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                   where: Mapping[str, str], config_file: str = "config.json") -> str:
    """What differs between the tensors a file holds and those a config expects, as one phrase
    (missing, unexpected, shape mismatches, five of each at most); "" when nothing does.
    `where[name]` says which file holds a found tensor."""
    def some(names: list[str]) -> str:
        return f"{names[:5]}{' ...' if len(names) > 5 else ''}"

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{n}: {found[n]} in {where[n]}, {expected[n]} from {config_file}"
             for n in sorted(set(found) & set(expected)) if found[n] != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors {some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {some(unexpected)}")
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
    return "; ".join(problems)


def placed(tensor: Tensor, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """`tensor` on `device` (by default torch's default device), cast to `dtype` if it is given and
    the tensor is floating-point (integer tensors, such as quantized weights, keep theirs)."""
    target = torch.device(device) if device is not None else torch.get_default_device()
    return tensor.to(target, dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype)


def transformer_from_state(config: Config, state: Mapping[str, Tensor]) -> Transformer:
    """A Transformer of `config` holding the tensors of `state` (every name, every shape), in eval
    mode: built on the meta device and the tensors assigned in place, so no memory is spent on an
    initialisation that would be overwritten."""
    net = build_transformer(config, device="meta")
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()
