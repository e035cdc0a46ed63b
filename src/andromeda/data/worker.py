"""One unit of tokenisation (a task), and the loop of a tokenizer worker process.

A task is a JSON-able dict naming a slice of one input — a byte range of a ``.txt`` or
``.jsonl`` file, a whole compressed file, Parquet row groups, or an Arrow shard of a ``datasets``
folder — and the cache *part* it becomes: ``<part>.bin`` holding ``doc eos doc eos ...`` (a
``.txt`` range holds a piece of its file's one document, with the eos only after the last piece)
and, when the file has several parts, ``<part>.json`` with the counts, written after the ``.bin``
is complete so that a later run can keep the part.

Workers are fresh interpreters (``python -c``) that load this folder as a private package, so
they import neither torch nor the rest of Andromeda: they start in a tenth of a second, and
behave the same under every multiprocessing start method. They read tasks as JSON lines on
stdin and answer on stdout; see :mod:`andromeda.data.pool`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .atomic import create_new, temporary_path, write_json
from .blocks import decoded_blocks, raw_blocks
from .encoding import ByteEncoder, Encoder, load_encoder
from .formats import iter_arrow_stream, iter_jsonl, iter_parquet
from .splitting import PieceCutter, split_text

PIECE_CHARS = 1 << 18  # texts longer than this are cut (splitting.py) before encoding
BATCH_CHARS = 1 << 20  # characters per encode_batch call

Progress = Callable[[float], None]  # called with the task's input weight done so far


class PartWriter:
    """Token ids appended to a temporary file that becomes ``<part>.bin`` on :meth:`commit`."""

    def __init__(self, part: Path, dtype: np.dtype, vocab_size: int) -> None:
        self.path = part.with_name(part.name + ".bin")
        self.dtype, self.vocab_size = np.dtype(dtype), vocab_size
        self.tmp = temporary_path(self.path)
        self.file = create_new(self.tmp)
        self.num_tokens = 0

    def write(self, ids: np.ndarray) -> None:
        if ids.size and ids.dtype != np.uint8:  # bytes always fit
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"the tokenizer produced id {high if high >= 0 else low} outside "
                                 f"its vocab_size {self.vocab_size}")
        self.file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += ids.size

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class _Batcher:
    """Texts queued for one ``encode_batch`` call; ``eos`` written after each that ends a
    document."""

    def __init__(self, encoder: Encoder, writer: PartWriter, eos: int, batch_chars: int) -> None:
        self.encoder, self.writer, self.batch_chars = encoder, writer, batch_chars
        self.eos = np.array([eos], dtype=np.int64)
        self.texts: list[str] = []
        self.ends: list[bool] = []
        self.chars = 0

    def add(self, text: str, ends_document: bool) -> None:
        self.texts.append(text)
        self.ends.append(ends_document)
        self.chars += len(text)
        if self.chars >= self.batch_chars:
            self.flush()

    def end_document(self) -> None:
        """An eos after everything added or written so far."""
        if self.ends:
            self.ends[-1] = True
        else:
            self.writer.write(self.eos)

    def flush(self) -> None:
        if not self.texts:
            return
        for ids, ends in zip(self.encoder.encode_batch(self.texts), self.ends):
            self.writer.write(ids)
            if ends:
                self.writer.write(self.eos)
        self.texts, self.ends, self.chars = [], [], 0


class DocumentPause:
    """A test hook: with the setting ``"N:PATH"``, stop after the N-th document this tokenizing
    process finishes (its tokens flushed to the part's temporary file), create PATH and sleep,
    so a test can kill the tokenizer at a known point; with None, nothing. The setting is a plain
    string (``tokenize_corpus(..., tokenizer_pause=)``), which worker processes get in their
    settings; each process counts its own documents."""

    def __init__(self, setting: str | None = None) -> None:
        self.after: int | None = None
        self.marker = Path()
        if setting:
            count, _, marker = setting.partition(":")
            self.after, self.marker = int(count), Path(marker)
        self.documents = 0

    def document_done(self, batcher: _Batcher) -> None:
        self.documents += 1
        if self.after is not None and self.documents >= self.after:
            batcher.flush()
            batcher.writer.file.flush()
            self.marker.touch()
            while True:
                time.sleep(3600)


def run_task(task: dict, encoder: Encoder, settings: dict, progress: Progress,
             pause: DocumentPause | None = None) -> dict:
    """Tokenise ``task`` into its part; returns the part's counts (tokens, documents, bytes).

    ``settings``: ``dtype`` and ``vocab_size`` of the ids, ``eos`` id, and optionally
    ``piece_chars`` and ``batch_chars``. ``progress`` gets the task's weight done so far.
    ``pause``: this process's test hook (one for all its tasks: it counts documents).
    """
    pause = pause or DocumentPause()
    part = Path(task["part"])
    writer = PartWriter(part, np.dtype(settings["dtype"]), settings["vocab_size"])
    batcher = _Batcher(encoder, writer, settings["eos"], settings.get("batch_chars", BATCH_CHARS))
    piece_chars = settings.get("piece_chars", PIECE_CHARS)
    try:
        if task["kind"] == "text":
            documents, num_bytes = _encode_text(task, encoder, batcher, piece_chars, progress, pause)
        else:
            documents, num_bytes = 0, 0
            for text in _documents(task, progress):
                for piece, last in _pieces(text, encoder, piece_chars):
                    batcher.add(piece, ends_document=last)
                documents += 1
                num_bytes += len(text.encode("utf-8"))
                pause.document_done(batcher)
        batcher.flush()
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    counts = {"num_tokens": writer.num_tokens, "num_documents": documents, "num_bytes": num_bytes}
    if task.get("sidecar"):  # one part of several: kept if a later part fails or is killed
        write_json(part.with_name(part.name + ".json"), {**counts, "task": task_identity(task)})
    return counts


def task_identity(task: dict) -> dict:
    """What a part was made from; a part is reused only for the same identity."""
    return {k: v for k, v in task.items() if k not in ("id", "entry", "weight", "part")}


def _pieces(text: str, encoder: Encoder, piece_chars: int) -> Iterator[tuple[str, bool]]:
    pieces = [text] if isinstance(encoder, ByteEncoder) else split_text(text, encoder.rule, piece_chars)
    for i, piece in enumerate(pieces):
        yield piece, i == len(pieces) - 1


def _encode_text(
    task: dict, encoder: Encoder, batcher: _Batcher, piece_chars: int, progress: Progress, pause: DocumentPause
) -> tuple[int, int]:
    """A range of a ``.txt`` file: validated as UTF-8, cut into pieces, encoded."""
    path, start = Path(task["path"]), task.get("start", 0)
    blocks = raw_blocks(path, task.get("compression"), start, task.get("end"), progress)
    num_bytes = 0
    if isinstance(encoder, ByteEncoder):  # ids are the bytes: skip building strings
        for block, _ in decoded_blocks(blocks, path, start):
            batcher.writer.write(np.frombuffer(block, dtype=np.uint8))
            num_bytes += len(block)
    else:
        cutter = PieceCutter(encoder.rule, piece_chars)
        for block, text in decoded_blocks(blocks, path, start):
            num_bytes += len(block)
            for piece in cutter.feed(text):
                batcher.add(piece, ends_document=False)
        for piece in cutter.finish():
            batcher.add(piece, ends_document=False)
    if not task["final"]:
        return 0, num_bytes
    batcher.end_document()
    pause.document_done(batcher)
    return 1, num_bytes


def _documents(task: dict, progress: Progress) -> Iterable[str]:
    path, field = Path(task["path"]), task["text_field"]
    if task["kind"] == "jsonl":
        return iter_jsonl(path, field, task.get("compression"), task.get("start", 0),
                          task.get("end"), progress)
    if task["kind"] == "parquet":
        rows, weight = task["rows"], task["weight"]
        return iter_parquet(path, field, task["row_groups"],
                            lambda done: progress(weight * done / max(rows, 1)))
    if task["kind"] == "arrow":
        return iter_arrow_stream(path, field, progress)
    raise ValueError(f"unknown task kind {task['kind']!r}")


# --------------------------------------------------------------------------- worker process


def serve() -> None:
    """The worker loop: a settings line, then task lines, on stdin; replies on stdout."""
    # Replies get their own copy of stdout; fd 1 itself then points at stderr, so whatever a
    # library prints (from Python or native code) cannot corrupt them.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def send(message: dict) -> None:
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    settings = json.loads(sys.stdin.buffer.readline())
    encoder = load_encoder(settings["tokenizer"], serial=False)
    pause = DocumentPause(settings.get("tokenizer_pause"))
    parent = settings["parent"]
    for line in sys.stdin.buffer:
        task = json.loads(line)
        last = [0.0, time.monotonic()]

        def progress(done: float) -> None:
            if os.getppid() != parent:  # orphaned: the tokenizing process was killed
                os._exit(1)
            now = time.monotonic()
            if now - last[1] >= 0.2:
                send({"id": task["id"], "progress": done - last[0]})
                last[:] = [done, now]

        try:
            counts = run_task(task, encoder, settings, progress, pause)
        except Exception as error:  # reported to the parent, which raises it
            send({"id": task["id"], "error": str(error), "type": type(error).__name__,
                  "traceback": traceback.format_exc()})
            continue
        send({"id": task["id"], "done": counts, "progress": task["weight"] - last[0]})
