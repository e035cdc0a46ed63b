"""The token cache: an entry per input file, a concatenation per corpus, and :class:`TokenStore`.

Layout of a cache folder (default ``~/.cache/andromeda/tokens``)::

    .lock                          held (flock) by the one process building in the folder
    files/<key>.bin                token ids of one input file: doc eos doc eos ... doc eos
    files/<key>/part-00000.bin     or, for a file tokenised in several tasks, of each slice,
    files/<key>/part-00000.json    with its counts and what it was made from (after the .bin)
    files/<key>.json               the file's entry: its parts and counts; written last
    corpus-<key>.bin               eos + every file's parts in order: what training memory-maps
    corpus-<key>.json              its counts; written after the .bin

A file's key hashes its resolved path, size and modification time (for a ``datasets`` folder,
those of every file in it), the ``text_field`` (record formats only) and the tokenizer's name,
size, eos id and :func:`tokenizer_fingerprint`. So adding a file to a corpus tokenises that file
only; a changed file is tokenised again; a file that changes while it is read is an error, and
none of it is cached (``snapshot.py``); a killed run resumes with the parts it finished. Every
file is written under a temporary name and renamed into place, sidecar json after data, so a
json always describes complete data. Building takes the folder's lock: concurrent processes
(torchrun ranks, two jobs sharing a cache) wait for the builder, then find its entries, and a
new builder first deletes the temporaries killed ones left (the tokenizer's copy for the workers
included, which lives in the cache folder too; other ``*.tmp`` files are not ours and stay).

The corpus array is a copy of the parts (so the cache takes twice the tokens' size on disk), a
single ``np.memmap`` identical to what one pass over the documents would write: the same corpus
gives the same array, hence the same training batches, however it was tokenised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..folders import cache_root
from ..tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, tokenizer_fingerprint
from .atomic import create_new, read_json, remove_temporaries, temporary_path, write_json
from .encoding import (
    HF_TOKENIZER_FILE,
    ByteEncoder,
    CallableEncoder,
    Encoder,
    load_encoder,
    token_dtype,
)
from .formats import data_format, dataset_shards, line_chunks, parquet_row_groups, text_chunks
from .pool import run_in_workers
from .snapshot import SourceSnapshot
from .splitting import BYTES, PARAGRAPH, SplitRule, rule_for
from .worker import BATCH_CHARS, PIECE_CHARS, DocumentPause, run_task, task_identity

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent builders are not coordinated there
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
CHUNK_BYTES = 8 << 20  # a task: about this many bytes of a .txt/.jsonl file, or of Parquet
MIN_PARALLEL_BYTES = 1 << 20  # less input than this is tokenised in the calling process
LOCK_FILE = ".lock"
CACHE_SUBFOLDERS = ("files",)  # where the cache writes below its folder (`_FileEntry`)
TOKENIZER_COPY = "tokenizer"  # the workers' copy of the tokenizer: a temporary folder in the cache


def token_cache_dir(root: str | Path | None = None) -> Path:
    """Where token caches live: ``<root>/tokens``, ``root`` defaulting to :func:`cache_root`
    (as the ``--cache-dir`` of the command line means)."""
    return (Path(root).expanduser() if root is not None else cache_root()) / "tokens"


def default_num_proc() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class TokenizeStats:
    """What :func:`tokenize_corpus` did. ``bytes`` counts the UTF-8 text of the documents
    (compressed files count decompressed), ``tokenized_*`` only what this call encoded (the rest
    was cached), and ``mb_per_s`` is ``tokenized_bytes`` per second."""

    files: int
    documents: int
    tokens: int
    bytes: int
    tokenized_files: int
    tokenized_bytes: int
    seconds: float
    processes: int  # worker processes used; 0: tokenised in the calling process
    cache_path: Path

    @property
    def mb_per_s(self) -> float:
        return self.tokenized_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        cached = self.files - self.tokenized_files
        how = f"{self.processes} processes" if self.processes else "in this process"
        work = (f"tokenised {self.tokenized_bytes / 1e6:,.1f} MB in {self.seconds:.1f} s "
                f"({self.mb_per_s:.1f} MB/s, {how})" if self.tokenized_files else "all cached")
        return (f"{self.files} files ({self.tokenized_files} tokenised, {cached} cached), "
                f"{self.documents:,} documents, {self.tokens:,} tokens, {self.bytes:,} bytes; "
                f"{work}; {self.cache_path}")


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/.lock`` exclusively (``flock``; released by the kernel if we die)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            logger.info("waiting for %s, which is tokenising into %s", holder, directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _tokenizer_copy(directory: Path) -> Iterator[Path]:
    """An empty folder in the cache ``directory`` for the tokenizer's files (what worker processes
    load), deleted afterwards; a temporary by name, so a build after a kill deletes it too."""
    path = temporary_path(directory / TOKENIZER_COPY)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- per-file entries


class _FileEntry:
    """The cache entry of one input file (or ``datasets`` folder): its parts and manifest.

    A file tokenised in one task has a single part, ``files/<key>.bin``; a larger one has parts
    ``files/<key>/part-NNNNN.bin``, each with a ``.json`` sidecar so an interrupted run can
    keep the parts it finished. ``files/<key>.json``, written last, lists the parts.
    """

    def __init__(self, cache_dir: Path, snapshot: SourceSnapshot, identity: dict) -> None:
        self.source, self.format, self.snapshot = snapshot.source, snapshot.format, snapshot
        self.key = _digest(identity)
        self.files_dir = cache_dir / "files"
        self.manifest_path = self.files_dir / f"{self.key}.json"

    def read(self, itemsize: int) -> dict | None:
        """The manifest, if the entry is complete and its parts have the sizes it says."""
        manifest = read_json(self.manifest_path)
        if manifest is None or manifest.get("version") != FORMAT_VERSION:
            return None
        try:
            for name, tokens in manifest["parts"]:
                if (self.files_dir / f"{name}.bin").stat().st_size != tokens * itemsize:
                    return None
        except (OSError, KeyError, TypeError, ValueError):
            return None
        return manifest

    def plan(self, text_field: str, rule: SplitRule) -> list[dict]:
        """The tasks that tokenise this file, in order; each names its part."""
        source, fmt = str(self.source), self.format
        if fmt.kind == "dataset":
            tasks = [{"kind": "arrow", "path": str(shard), "text_field": text_field,
                      "weight": shard.stat().st_size} for shard in dataset_shards(self.source)]
        elif fmt.kind == "parquet":
            tasks = _parquet_tasks(self.source, text_field)
        elif fmt.compression is not None:
            tasks = [{"kind": fmt.kind, "path": source, "compression": fmt.compression,
                      "weight": self.source.stat().st_size}]
            if fmt.kind == "jsonl":
                tasks[0]["text_field"] = text_field
        elif fmt.kind == "jsonl":
            size = self.source.stat().st_size
            tasks = [{"kind": "jsonl", "path": source, "start": a, "end": b, "weight": b - a,
                      "text_field": text_field} for a, b in line_chunks(self.source, size, CHUNK_BYTES)]
        else:
            tasks = [{"kind": "text", "path": source, "start": a, "end": b, "weight": b - a}
                     for a, b in text_chunks(self.source, rule, CHUNK_BYTES)]
        if fmt.kind == "text":
            for task in tasks:
                task["final"] = task is tasks[-1]
        if len(tasks) == 1:
            tasks[0].update(part=str(self.files_dir / self.key), sidecar=False)
        for index, task in enumerate(tasks if len(tasks) > 1 else []):
            task.update(part=str(self.files_dir / self.key / f"part-{index:05d}"), sidecar=True)
        return tasks

    def finished_part(self, task: dict, itemsize: int) -> dict | None:
        """The counts of this task's part if an earlier run completed it, else None."""
        if not task["sidecar"]:
            return None
        part = Path(task["part"])
        sidecar = read_json(part.with_name(part.name + ".json"))
        if sidecar is None or sidecar.get("task") != task_identity(task):
            return None
        try:
            size = part.with_name(part.name + ".bin").stat().st_size
            return sidecar if size == sidecar["num_tokens"] * itemsize else None
        except (OSError, KeyError, TypeError):
            return None

    def check_unchanged(self, tasks: list[dict]) -> None:
        """Raise ValueError if the source changed while it was read, removing the parts read
        from it: a file restored to its old size and time would otherwise reuse them."""
        try:
            self.snapshot.check_unchanged()
        except ValueError:
            for task in tasks:
                part = Path(task["part"])
                for suffix in (".bin", ".json"):
                    part.with_name(part.name + suffix).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (self.files_dir / self.key).rmdir()  # the parts' folder, if it had several
            raise

    def write_manifest(self, tasks: list[dict], counts: dict[str, dict]) -> dict:
        """Write the entry's manifest from the ``counts`` of each task's part (keyed by part)."""
        totals = {"num_tokens": 0, "num_documents": 0, "num_bytes": 0}
        parts = []
        for task in tasks:
            part = counts[task["part"]]
            parts.append([Path(task["part"]).relative_to(self.files_dir).as_posix(),
                          part["num_tokens"]])
            for name in totals:
                totals[name] += part[name]
        manifest = {"version": FORMAT_VERSION, "source": str(self.source), "parts": parts, **totals}
        write_json(self.manifest_path, manifest)
        return manifest


def _parquet_tasks(path: Path, text_field: str) -> list[dict]:
    """Consecutive row groups grouped into tasks of about CHUNK_BYTES of the file."""
    counts = parquet_row_groups(path)
    size, total_rows = path.stat().st_size, max(sum(counts), 1)
    tasks: list[dict] = []
    group: list[int] = []
    for index, rows in enumerate(counts):
        group.append(index)
        weight = size * sum(counts[g] for g in group) / total_rows
        if weight >= CHUNK_BYTES or index == len(counts) - 1:
            tasks.append({"kind": "parquet", "path": str(path), "row_groups": group,
                          "rows": sum(counts[g] for g in group), "weight": weight,
                          "text_field": text_field})
            group = []
    return tasks or [{"kind": "parquet", "path": str(path), "row_groups": [], "rows": 0,
                      "weight": size, "text_field": text_field}]


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- the corpus


class _Corpus:
    """The cache entries of a list of files under one tokenizer, and their concatenation."""

    def __init__(self, paths: Sequence[str | Path], tokenizer: Tokenizer,
                 cache_dir: str | Path | None, text_field: str) -> None:
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("TokenStore needs at least one data file; resolve_data gave none")
        self.tokenizer, self.text_field = tokenizer, text_field
        self.cache_dir = Path(cache_dir) if cache_dir is not None else token_cache_dir()
        self.dtype = token_dtype(tokenizer.vocab_size)
        tokenizer_id = [tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id,
                        tokenizer_fingerprint(tokenizer)]
        self.entries = []
        for path in self.paths:
            fmt = data_format(path)
            if fmt is None:
                raise ValueError(f"unsupported data file {path}")
            snapshot = SourceSnapshot(path, fmt)
            identity = {"version": FORMAT_VERSION, "source": snapshot.identity,
                        "tokenizer": tokenizer_id, "dtype": self.dtype.name}
            if fmt.kind != "text":  # .txt files have no fields
                identity["text_field"] = text_field
            self.entries.append(_FileEntry(self.cache_dir, snapshot, identity))
        key = _digest({"version": FORMAT_VERSION, "files": [e.key for e in self.entries]})
        self.token_path = self.cache_dir / f"corpus-{key}.bin"
        self.meta_path = self.cache_dir / f"corpus-{key}.json"

    def read_meta(self) -> dict | None:
        """The corpus entry's metadata, or None when it is missing or does not match its tokens."""
        meta = read_json(self.meta_path)
        if meta is None or not self.token_path.is_file():
            return None
        try:
            expected = meta["num_tokens"] * self.dtype.itemsize
        except (KeyError, TypeError):
            expected = -1
        if meta.get("dtype") != self.dtype.name or self.token_path.stat().st_size != expected:
            logger.warning("ignoring inconsistent token cache %s", self.meta_path)
            return None
        return meta

    def build(self, num_proc: int | None, progress: bool, tokenizer_pause: str | None = None) -> TokenizeStats:
        """Tokenise what the cache lacks and write the corpus entry, holding the build lock
        (`tokenizer_pause`: the test hook of `worker.DocumentPause`)."""
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"num_proc must be at least 1 (or None: every CPU), got {num_proc}")
        started = time.perf_counter()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with build_lock(self.cache_dir):
            removed = remove_temporaries(self.cache_dir, CACHE_SUBFOLDERS, [TOKENIZER_COPY])
            if removed:
                logger.info("removed %d temporary files of killed tokenizers in %s",
                            removed, self.cache_dir)
            try:
                tokenized, processes = self._tokenize_missing(num_proc, progress, tokenizer_pause)
                meta = self.read_meta() or self._write_corpus()
            finally:
                remove_temporaries(self.cache_dir, CACHE_SUBFOLDERS, [TOKENIZER_COPY])  # those of workers killed on an error
        stats = TokenizeStats(
            files=len(self.entries), documents=meta["num_documents"], tokens=meta["num_tokens"],
            bytes=meta["num_bytes"], tokenized_files=len(tokenized),
            tokenized_bytes=sum(m["num_bytes"] for m in tokenized.values()),
            seconds=time.perf_counter() - started, processes=processes,
            cache_path=self.token_path)
        logger.debug("%s", stats)  # `andromeda tokenize` prints it; library callers get it returned
        return stats

    def _tokenize_missing(self, num_proc: int | None, progress: bool,
                          tokenizer_pause: str | None) -> tuple[dict, int]:
        """Tokenise every file without a complete entry; returns ({key: manifest} of those,
        the number of worker processes used)."""
        itemsize = self.dtype.itemsize
        missing = {e.key: e for e in self.entries if e.read(itemsize) is None}
        if not missing:
            return {}, 0
        for entry in missing.values():
            entry.snapshot.before_reading()
        with _tokenizer_copy(self.cache_dir) as tokenizer_dir:
            self.tokenizer.save(tokenizer_dir)
            encoder, shippable = self._encoder(tokenizer_dir)
            plans = {key: entry.plan(self.text_field, encoder.rule) for key, entry in missing.items()}
            counts: dict[str, dict] = {}  # part -> its counts
            waiting: dict[str, int] = {}  # entry key -> parts still to tokenise
            tasks: list[dict] = []
            (self.cache_dir / "files").mkdir(exist_ok=True)
            for key, plan in plans.items():
                for task in plan:
                    finished = missing[key].finished_part(task, itemsize)
                    if finished is not None:
                        counts[task["part"]] = finished
                        continue
                    if task["sidecar"]:
                        Path(task["part"]).parent.mkdir(exist_ok=True)
                    tasks.append({**task, "id": len(tasks), "entry": key})
                    waiting[key] = waiting.get(key, 0) + 1
            done = {key: missing[key].write_manifest(plans[key], counts)
                    for key in missing.keys() - waiting.keys()}  # all parts survived a kill
            if not encoder.rule.exact and any(t["kind"] == "text" for t in tasks):
                logger.warning("tokenizer %r is not a byte or byte-level BPE tokenizer: .txt files "
                               "longer than %d characters are encoded in pieces cut at blank lines, "
                               "which may differ from encoding them whole at those cuts",
                               self.tokenizer.name, PIECE_CHARS)

            def on_done(task: dict, part_counts: dict) -> None:
                key = task["entry"]
                counts[task["part"]] = part_counts
                waiting[key] -= 1
                if not waiting[key]:
                    missing[key].check_unchanged(plans[key])
                    done[key] = missing[key].write_manifest(plans[key], counts)

            settings = {"tokenizer": str(tokenizer_dir), "dtype": self.dtype.name,
                        "eos": self.tokenizer.eos_id, "vocab_size": self.tokenizer.vocab_size,
                        "piece_chars": PIECE_CHARS, "batch_chars": BATCH_CHARS,
                        "tokenizer_pause": tokenizer_pause}  # a plain value: workers are other processes
            total = sum(t["weight"] for t in tasks)
            workers = min(num_proc or default_num_proc(), len(tasks))
            # Byte ids are the input bytes: one process copies them at disk speed, and workers
            # would only add their overhead (measured: 70 vs 35 MB/s on 1,248 small files).
            if isinstance(encoder, ByteEncoder) or not shippable or total < MIN_PARALLEL_BYTES:
                workers = 0
            workers = workers if workers > 1 else 0
            logger.info("tokenising %d files (%.1f MB, %d tasks) with %s into %s, %s",
                        len(missing), total / 1e6, len(tasks), self.tokenizer.name, self.cache_dir,
                        f"{workers} processes" if workers else "in this process")
            from tqdm.auto import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                      disable=not progress) as bar:
                if workers:
                    run_in_workers(tasks, settings, workers, on_done, bar.update)
                else:
                    pause = DocumentPause(tokenizer_pause)  # one for all tasks: it counts documents
                    for task in tasks:
                        reported = [0.0]

                        def on_progress(done: float, reported: list[float] = reported) -> None:
                            bar.update(done - reported[0])
                            reported[0] = done

                        part_counts = run_task(task, encoder, settings, on_progress, pause)
                        bar.update(task["weight"] - reported[0])
                        on_done(task, part_counts)
        return done, workers

    def _encoder(self, tokenizer_dir: Path) -> tuple[Encoder, bool]:
        """This process's encoder, and whether workers can rebuild the tokenizer from its files
        (only Andromeda's own classes: a subclass may change what ``encode`` does)."""
        tokenizer = self.tokenizer
        if type(tokenizer) in (ByteTokenizer, HFTokenizer):
            return load_encoder(tokenizer_dir, serial=True), True
        if isinstance(tokenizer, ByteTokenizer):
            rule = BYTES
        elif (tokenizer_dir / HF_TOKENIZER_FILE).is_file():
            rule = rule_for(json.loads((tokenizer_dir / HF_TOKENIZER_FILE).read_text()))
        else:
            rule = PARAGRAPH
        return CallableEncoder(tokenizer.encode, rule), False

    def _write_corpus(self) -> dict:
        """``eos`` + every file's parts, in order, as one array; json last."""
        itemsize = self.dtype.itemsize
        manifests = [entry.read(itemsize) for entry in self.entries]
        assert all(m is not None for m in manifests), "every file entry is complete here"
        tmp = temporary_path(self.token_path)
        try:
            with create_new(tmp) as out:
                out.write(np.array([self.tokenizer.eos_id], dtype=self.dtype).tobytes())
                for entry, manifest in zip(self.entries, manifests):
                    for name, _ in manifest["parts"]:
                        with open(entry.files_dir / f"{name}.bin", "rb") as part:
                            shutil.copyfileobj(part, out, 16 << 20)
            os.replace(tmp, self.token_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        meta = {
            "version": FORMAT_VERSION,
            "num_tokens": 1 + sum(m["num_tokens"] for m in manifests),
            "num_bytes": sum(m["num_bytes"] for m in manifests),
            "num_documents": sum(m["num_documents"] for m in manifests),
            "dtype": self.dtype.name,
            "tokenizer": self.tokenizer.name,
            "vocab_size": self.tokenizer.vocab_size,
            "files": [str(p) for p in self.paths],
            "entries": [e.key for e in self.entries],
        }
        write_json(self.meta_path, meta)
        return meta


# --------------------------------------------------------------------------- public API


def tokenize_corpus(
    files: Sequence[str | Path],
    tokenizer: Tokenizer,
    cache_dir: str | Path | None = None,
    *,
    num_proc: int | None = None,
    text_field: str = "text",
    progress: bool = True,
    tokenizer_pause: str | None = None,
) -> TokenizeStats:
    """Build the token cache of ``files`` (from :func:`resolve_data`) so that a
    :class:`TokenStore` of the same files, tokenizer, ``cache_dir`` and ``text_field`` only reads.

    Files already cached are skipped; the others are tokenised by ``num_proc`` worker processes
    (default: every CPU this process may use; 1: in this process), with a progress bar in bytes
    when ``progress``. The byte tokenizer, whose ids are the input bytes, always runs in this
    process (it is bound by the disk, not the CPU), as do tokenizers other than Andromeda's
    ``ByteTokenizer`` and ``HFTokenizer`` (workers rebuild the tokenizer from its saved files,
    which a subclass's ``encode`` would not survive) and inputs under a megabyte. Under torchrun, call it on local rank 0 while the other ranks wait (a
    barrier), then build the TokenStore everywhere. A malformed input raises ``ValueError``
    naming the file and record, before anything is written for that file. ``tokenizer_pause``
    is a test hook ("N:PATH", see ``worker.DocumentPause``; the command line passes it).
    """
    return _Corpus(files, tokenizer, cache_dir, text_field).build(num_proc, progress, tokenizer_pause)


class TokenStore:
    """Documents tokenised once into a memory-mapped array, cached on disk.

    Layout: ``eos doc_1 eos doc_2 eos ... doc_n eos``. Starting with eos means the first token,
    the only one an evaluator cannot predict, carries no text, so every byte counted in
    ``num_bytes`` is predicted; ending with eos teaches where documents stop.

    The array is the cache's corpus entry (see this module's docstring). If it is missing, the
    constructor builds it as :func:`tokenize_corpus` does (tokenising only the files not cached
    yet, with ``num_proc`` processes), unless ``build=False``: then it raises
    ``FileNotFoundError`` — for processes that waited for another to run ``tokenize_corpus``.
    ``tokenizer_pause``: the test hook of :func:`tokenize_corpus`.
    """

    FORMAT_VERSION = FORMAT_VERSION

    def __init__(
        self,
        paths: Sequence[str | Path],
        tokenizer: Tokenizer,
        cache_dir: str | Path | None = None,
        text_field: str = "text",
        *,
        num_proc: int | None = None,
        progress: bool = False,
        build: bool = True,
        tokenizer_pause: str | None = None,
    ) -> None:
        corpus = _Corpus(paths, tokenizer, cache_dir, text_field)
        self.paths, self.tokenizer, self.text_field = corpus.paths, tokenizer, text_field
        self.cache_dir, self.dtype = corpus.cache_dir, corpus.dtype
        self.token_path, self.meta_path = corpus.token_path, corpus.meta_path
        meta = corpus.read_meta()
        self.from_cache = meta is not None
        if meta is None:
            if not build:
                raise FileNotFoundError(
                    f"no token cache for these {len(self.paths)} files in {self.cache_dir} "
                    f"(expected {self.meta_path}); run tokenize_corpus (andromeda tokenize) first"
                )
            corpus.build(num_proc, progress, tokenizer_pause)
            meta = corpus.read_meta()
            assert meta is not None, f"{self.meta_path} was just written"
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
