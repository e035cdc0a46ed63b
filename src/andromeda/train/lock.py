"""One training process per run folder: an OS file lock held for the run's lifetime.

`fcntl.flock` on `RUN/.lock`: the kernel releases it when the holder exits however it exits
(kill -9 included), so a stale lock never blocks a new run. The holder writes its PID into the
file so a second `andromeda train` on the same `--out` can say who has it. On a network
filesystem flock may be local to each machine: keep concurrent runs on different `--out`s there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the lock of `run_dir` (created if needed) for the duration of the block; raise
    RunFolderInUse at once if another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunFolderInUse(f"{run_dir} is in use by another training process (PID {holder}); wait for "
                                 f"it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
