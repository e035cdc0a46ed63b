"""Cache files that are either complete or absent: write under a temporary name, then rename.

A temporary is named ``<final name>.<pid>-<random>.tmp`` and created with mode 0666 less the
umask (``tempfile.mkstemp`` would make it 0600, unreadable by the rest of a team sharing a
cache). Only a process holding the cache folder's build lock writes in it, so when a build
starts, every ``*.tmp`` file there is a leftover of a killed writer and is removed.

Nothing here imports torch or the rest of Andromeda: tokenizer worker processes import it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


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


def remove_temporaries(directory: Path) -> int:
    """Delete every ``*.tmp`` file under ``directory``; returns how many. Call only while
    holding the build lock, when no live process can be writing one."""
    removed = 0
    for path in directory.rglob(f"*{TMP_SUFFIX}"):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
