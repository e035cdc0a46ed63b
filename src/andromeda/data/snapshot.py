"""What an input file was when its tokenisation began, to refuse caching it if it changed since.

A file rewritten while it is being read gives tokens that match neither version; cached under
the old version's key, they would be served as that version. So a file is described before it is
read — its size and modification time (for a ``datasets`` folder, those of every file in it),
which also make its cache key, and for a file under :data:`HASHED_BYTES` the SHA-256 of its
bytes — and described again once it has been read: any difference is a ``ValueError`` naming it.

The hash is for small files because they are read within one tick of the file system's clock
(a few milliseconds on Linux): a rewrite of the same size then keeps the modification time too.
A larger file takes longer to read than a tick, so a change while it is read shows in its time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .formats import Format

HASHED_BYTES = 1 << 20  # files up to this size are hashed as well


def source_identity(source: Path, fmt: Format) -> list:
    """The resolved path with the size and modification time of the file, or of each file of a
    ``datasets`` folder."""
    resolved = source.resolve()
    if fmt.kind == "dataset":
        files = sorted(p for p in resolved.rglob("*") if p.is_file())
        return [str(resolved), [[str(p.relative_to(resolved)), p.stat().st_size, p.stat().st_mtime_ns]
                                for p in files]]
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]


def content_hash(source: Path, fmt: Format) -> str | None:
    """The SHA-256 of a file of at most HASHED_BYTES; None for larger files and folders."""
    if fmt.kind == "dataset" or source.stat().st_size > HASHED_BYTES:
        return None
    return hashlib.sha256(source.read_bytes()).hexdigest()


class SourceSnapshot:
    """One input's identity (taken when its cache key is computed) and, taken just before its
    tokenisation, its content hash."""

    def __init__(self, source: Path, fmt: Format) -> None:
        self.source, self.format = source, fmt
        self.identity = source_identity(source, fmt)
        self.hash: str | None = None

    def before_reading(self) -> None:
        self.hash = content_hash(self.source, self.format)

    def check_unchanged(self) -> None:
        """Raise ``ValueError`` naming the input if it differs from this snapshot."""
        try:
            change = self._change()
        except OSError as error:
            change = f"it can no longer be read: {error}"
        if change is not None:
            raise ValueError(
                f"{self.source} changed while it was being tokenized ({change}): its tokens would "
                f"match neither version, so nothing of it was cached; tokenize it again once "
                f"nothing writes to it"
            )

    def _change(self) -> str | None:
        now = source_identity(self.source, self.format)
        if now != self.identity:
            if now[0] != self.identity[0]:
                return f"it now resolves to {now[0]}"
            if self.format.kind == "dataset":
                return "files of the folder were added, removed or modified"
            if now[1] != self.identity[1]:
                return f"its size went from {self.identity[1]} to {now[1]} bytes"
            return "its modification time changed"
        if self.hash is not None and content_hash(self.source, self.format) != self.hash:
            return "its contents changed, keeping its size and modification time"
        return None
