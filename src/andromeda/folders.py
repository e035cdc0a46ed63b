"""The folders commands read and write: which files a checkpoint may contribute, and which
existing folder a command may replace.

Reading. Every file a checkpoint or a Hugging Face folder contributes is a regular file inside
that folder: a name that is a plain relative path (no `..`, not absolute), no symbolic link that
leads out of the folder, no FIFO, device or socket. A crafted folder therefore cannot make a
command read (and a server publish) a file from elsewhere on the machine, or block on a FIFO.
`check_folder` walks a folder once when it is opened; `member` checks one name read from a file
(a manifest entry, an index's weight map, an optimizer storage entry).

Writing. A command that writes a folder (`quantize`, `import-hf`, `export-hf`, `save_pretrained`)
writes into a new or empty folder; it replaces an existing one only if that folder is, file for
file, what the same command would have written, and never a training run folder. Anything else is
refused with an error naming the folder and the flag to change; nothing is deleted that the user
did not name. The replacement itself is atomic: the new folder is written beside the old one and
renamed over it (`replace_folder`). A full disk (or quota) while writing is an error that names the
file being written (`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from safetensors import SafetensorError

# A training run folder (`train --out`): never replaced by a command that writes a checkpoint.
RUN_MARKERS = ("checkpoints", "latest", "metrics.jsonl")
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be used: truncated, corrupt, crafted, or not matching its config."""


class UnsafeFileError(CheckpointError):
    """A folder holds a file that must not be read: a link out of it, a special file, a path escaping it."""


# --------------------------------------------------------------------------- reading


def member(folder: str | Path, name: str, *, what: str = "file") -> Path:
    """`folder / name` after checking that `name` stays inside `folder`: a relative POSIX path with
    no `..` or empty parts, and, where the file exists, a regular file whose real path is inside
    the folder. UnsafeFileError naming `what` otherwise."""
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise UnsafeFileError(f"{folder}: {what} {name!r} is not a file name")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts:
        raise UnsafeFileError(f"{folder}: {what} {name!r} points outside the folder; only names of files inside "
                              f"it are accepted")
    path = folder / name
    if os.path.lexists(path):
        _check_entry(folder.resolve(), path)
    return path


def check_folder(folder: str | Path) -> None:
    """Walk `folder` (without following links) and refuse any entry that is a link out of it or
    not a regular file or folder: UnsafeFileError naming the entry."""
    folder = Path(folder)
    root = folder.resolve()
    for directory, subdirs, files in os.walk(folder, followlinks=False):
        for name in [*subdirs, *files]:
            _check_entry(root, Path(directory) / name)


def _check_entry(root: Path, path: Path) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        target = path.resolve()
        if not (target == root or root in target.parents):
            raise UnsafeFileError(f"{path} is a symbolic link to {target}, outside {root}: files of a checkpoint "
                                  f"must lie inside it (copy the folder with `cp -rL` if you trust the link)")
        info = os.stat(target)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise UnsafeFileError(f"{path} is not a regular file (a FIFO, device or socket): refused")


def read_json_object(path: str | Path, expected: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in the file `path`; a ValueError naming the file and `expected` (the form
    the caller wants, e.g. '{"type": "byte"}') for invalid JSON, deep nesting or another type."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected {expected}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to read; expected {expected}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {_json_type(data)}; expected {expected}")
    return data


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__)


# --------------------------------------------------------------------------- writing


def is_run_folder(path: str | Path) -> bool:
    """Whether `path` is (or looks like) a training run folder."""
    path = Path(path)
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def check_output(out: str | Path, *, kind: str, accepts: Callable[[Path], bool], flag: str = "directory") -> Path:
    """Check that `out` may be written by a command that writes a `kind` (e.g. "quantized
    checkpoint"): it does not exist, is an empty folder, or is a `kind` the command itself would
    write (`accepts(out)`), and is never a run folder. FileExistsError naming `out` and `flag`."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return out
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another {flag}: a new or empty folder")
    if not any(out.iterdir()):
        return out
    if is_run_folder(out):
        raise FileExistsError(f"{out} is a training run folder, which is never replaced; choose another {flag}: a new "
                              f"or empty folder")
    if not accepts(out):
        raise FileExistsError(f"{out} exists and is not a {kind} (it holds files this command would not write); "
                              f"choose another {flag}: a new or empty folder (or remove this one yourself)")
    return out


def staging_beside(target: Path) -> Path:
    """A new private folder next to `target`, to write into before `replace_folder`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))


def replace_folder(source: Path, target: Path) -> None:
    """Rename the complete folder `source` to `target`, moving an existing `target` aside first, so
    that at every moment `target` is either the old folder whole or the new one whole."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=target.parent))
        os.rename(target, trash / target.name)
        os.rename(source, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(source, target)
    fsync(target.parent)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a full disk (or quota) while writing `path` into an error that says so and names it."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path) from None
        raise
    except SafetensorError as err:  # safetensors' writer reports I/O errors as its own
        if "os error 28" in str(err) or "No space left" in str(err):
            raise disk_full(path) from None
        raise


def disk_full(path: Path, detail: str = "") -> OSError:
    """An ENOSPC error whose message names the file being written."""
    error = OSError(f"no space left on device while writing {path}{detail}")
    error.errno = errno.ENOSPC
    return error


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the permissions the umask allows (mkdtemp and
    safetensors create private files)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk: a rename is only durable after both."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_root() -> Path:
    """``$ANDROMEDA_CACHE`` if set, else ``~/.cache/andromeda``: token caches, the Shakespeare
    corpus, built kernels."""
    configured = os.environ.get("ANDROMEDA_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "andromeda"
