"""Training run folders: a run keeps its checkpoints in `RUN/checkpoints/step_000100/` and names
the newest in `RUN/latest`.

Every checkpoint is written into `RUN/checkpoints/.tmp-*`, fsynced, and only then renamed to its
final name, so a crash or `kill -9` at any moment leaves each earlier checkpoint whole: a `step_*`
folder exists only once it is complete.

Runs over several processes write the same folder: the model is consolidated at save time (rank 0
gathers the full state dict and writes `model.safetensors`), so loading for evaluation, generation
or `from_pretrained` is the same single-file read whatever trained it, while the optimizer state —
two thirds of the bytes — is written by every process in parallel, each its own shards, and is
resharded on load for any number of processes. The processes write into one staging folder
(`stage_checkpoint`) and rank 0 renames it once all are done (`commit_checkpoint`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..folders import TMP_PREFIX, fsync, replace_folder
from .files import finish_checkpoint_folder

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = TMP_PREFIX


# --------------------------------------------------------------------------- writing


def _check_keep(keep: int) -> None:
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint just written), got {keep}")


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint of `step` in the run `run_dir`."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:06d}"


def staging_folder(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place: one name that
    every process of a distributed run derives alike."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{_TMP_PREFIX}step_{step:06d}"


def stage_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Create the empty staging folder of `step` (replacing a leftover of an interrupted write)."""
    staging = staging_folder(run_dir, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit_checkpoint(run_dir: str | Path, step: int, keep: int, *,
                      pause: Callable[[str], None] | None = None) -> Path:
    """Fsync the complete staging folder of `step`, rename it to `step_{step:06d}`, point
    `RUN/latest` at it and delete all but the newest `keep` checkpoints; returns the folder.
    `pause`: a test hook, called with "before-rename:step_{step:06d}" just before the rename."""
    _check_keep(keep)
    root = Path(run_dir) / CHECKPOINTS_DIR
    staging, final = staging_folder(run_dir, step), checkpoint_folder(run_dir, step)
    finish_checkpoint_folder(staging)
    if pause is not None:
        pause(f"before-rename:{final.name}")
    replace_folder(staging, final)
    _write_latest(Path(run_dir), final)
    for old in step_checkpoints(run_dir)[:-keep]:
        # Renamed out of the step_* namespace first: a crash mid-delete leaves a .tmp-* folder,
        # never a step folder with files missing.
        trash = root / f"{_TMP_PREFIX}delete-{old.name}"
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def _write_latest(run_dir: Path, checkpoint: Path) -> None:
    """Point `RUN/latest` at `checkpoint`: written to a temporary file, then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}latest-", dir=run_dir)
    with os.fdopen(fd, "w") as out:
        out.write(f"{CHECKPOINTS_DIR}/{checkpoint.name}\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, run_dir / LATEST_FILE)
    fsync(run_dir)


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete the `.tmp-*` leftovers of writes that a crash interrupted; returns what was removed.

    Only call this while no other process writes to the run.
    """
    run_dir = Path(run_dir)
    leftovers = sorted((run_dir / CHECKPOINTS_DIR).glob(f"{_TMP_PREFIX}*")) if run_dir.is_dir() else []
    leftovers += sorted(run_dir.glob(f"{_TMP_PREFIX}latest-*")) if run_dir.is_dir() else []
    for path in leftovers:
        logger.warning("removing %s, left by an interrupted checkpoint write", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


# --------------------------------------------------------------------------- finding


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder `RUN/latest` names, else the highest `step_*` folder, else None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        named = pointer.read_text().strip()
        target = run_dir / named
        # Only this run's own step folders: a crafted `latest` ("../other/...", an absolute
        # path) must not make a resume continue another run's settings here.
        if re.fullmatch(rf"{CHECKPOINTS_DIR}/step_\d+", named) and target.is_dir():
            return target
        logger.warning("%s names %r, which is not one of this run's checkpoints; using the newest step folder",
                       pointer, named)
    checkpoints = step_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None
