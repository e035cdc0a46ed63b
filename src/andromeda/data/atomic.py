"""Cache files that are either complete or absent: write under a temporary name, then rename.

A temporary is named ``<final name>.<pid>-<random hex>.tmp`` and created with mode 0666 less
the umask (``tempfile.mkstemp`` would make it 0600, unreadable by the rest of a team sharing a
cache). Only a process holding the cache folder's build lock writes in it, so when a build
starts, every temporary there is a leftover of a killed writer and is removed: only names of
that form, in the folders the cache writes (a cache folder given by hand may hold other files).

Nothing here imports torch or the rest of Andromeda: tokenizer worker processes import it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"(.+)\.\d+-[0-9a-f]+" + re.escape(TMP_SUFFIX) + "$")  # `temporary_path`'s: final name


def temporary_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def create_new(path: Path) -> BinaryIO:
    """Open a new file for writing; its mode is 0666 less the umask, as ``open`` gives."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return os.fdopen(fd, "wb")


def write_json(path: Path, value: object) -> None:
    """Write ``value`` as JSON to ``path`` atomically."""
    tmp = temporary_path(path)
    try:
        with create_new(tmp) as file:
            file.write((json.dumps(value, indent=1) + "\n").encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested, not ours
        return None
    return value if isinstance(value, dict) else None


def is_temporary(path: Path) -> bool:
    """Whether ``path`` has a name `temporary_path` gives."""
    return _TEMPORARY.search(path.name) is not None


def remove_temporaries(directory: Path, subfolders: Iterable[str] = (), folders: Iterable[str] = ()) -> int:
    """Delete the temporary files (`is_temporary`) directly in ``directory`` and anywhere below
    its ``subfolders``, and the temporary folders directly in it whose final name is one of
    ``folders`` (a tokenizer's copy); returns how many. Everything else, ``*.tmp`` files and
    folders included, is left alone. Call only while holding the build lock, when no live process
    can be writing one."""
    folders = set(folders)
    candidates = [*directory.glob(f"*{TMP_SUFFIX}")]
    for name in subfolders:
        candidates += (directory / name).rglob(f"*{TMP_SUFFIX}")
    removed = 0
    for path in filter(is_temporary, candidates):
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            elif path.parent == directory and _TEMPORARY.search(path.name).group(1) in folders:
                shutil.rmtree(path)
            else:
                continue
            removed += 1
        except FileNotFoundError:
            pass
    return removed
