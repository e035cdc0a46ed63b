"""Data files as streams of documents, read piece by piece, with errors naming file and record.

=====================================  ====================================================
``.txt`` (``.txt.gz``, ``.txt.zst``)   the whole file is one document (UTF-8)
``.jsonl`` (``.gz``, ``.zst``),        one JSON object per line; the document is its
``.json.gz``, ``.json.zst``            ``text_field`` (a string); blank lines are skipped
``.parquet``                           the string column ``text_field``, one row a document
a ``datasets`` folder                  what ``Dataset.save_to_disk`` wrote (``state.json``
                                       and Arrow stream shards): the column ``text_field``
=====================================  ====================================================

Nothing is read whole: text in blocks of bounded size (``blocks.py``; compressed text too, however
far it expands), JSON lines one at a time, Parquet by row group and Arrow by record batch. Parquet and Arrow need ``pyarrow``, ``.zst`` needs ``zstandard`` (the
``data`` extra: ``pip install -e '.[data]'``); a missing one raises ``ImportError`` naming the ``pip install``.
A Hugging Face Hub style folder of ``.parquet`` or ``.jsonl.zst`` shards is read as its files.

Malformed input raises ``ValueError`` naming the file and the line (``path:12: ...``), row
(``path: row 7: ...``) or byte offset: invalid UTF-8 or JSON, a record without the field or with
a non-string one, a truncated or corrupt gzip/zstd stream, an unreadable Parquet or Arrow file.

Nothing here imports torch or the rest of Andromeda: tokenizer worker processes import it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .blocks import BLOCK_BYTES, OnProgress, decoded_blocks, raw_blocks, require
from .splitting import LINE, PieceCutter, SplitRule, first_cut, split_text

# Suffix -> (kind, compression). Longest suffixes first, so ".jsonl.gz" is not taken for ".gz".
_SUFFIXES = {
    ".jsonl.gz": ("jsonl", "gzip"), ".jsonl.zst": ("jsonl", "zstd"),
    ".json.gz": ("jsonl", "gzip"), ".json.zst": ("jsonl", "zstd"),
    ".txt.gz": ("text", "gzip"), ".txt.zst": ("text", "zstd"),
    ".jsonl": ("jsonl", None), ".txt": ("text", None), ".parquet": ("parquet", None),
}
DATA_SUFFIXES = tuple(_SUFFIXES)
DATASET_STATE = "state.json"  # marks a folder written by datasets' save_to_disk
DATASET_DICT = "dataset_dict.json"  # a DatasetDict: one save_to_disk folder per split


@dataclass(frozen=True)
class Format:
    kind: str  # "text", "jsonl", "parquet" or "dataset"
    compression: str | None = None  # "gzip", "zstd" or None


def data_format(path: Path) -> Format | None:
    """The format of a data file or ``datasets`` folder, or None if it is neither."""
    if path.is_dir():
        return Format("dataset") if (path / DATASET_STATE).is_file() else None
    name = path.name.lower()
    for suffix, (kind, compression) in _SUFFIXES.items():
        if name.endswith(suffix):
            return Format(kind, compression)
    return None


# --------------------------------------------------------------------------- JSON lines


def iter_jsonl(
    path: Path,
    text_field: str,
    compression: str | None = None,
    start: int = 0,
    end: int | None = None,
    on_progress: OnProgress | None = None,
) -> Iterator[str]:
    """The ``text_field`` of each line of ``path[start:end]`` (``start`` at a line start).

    Lines are split on ``"\\n"`` only: ``str.splitlines`` would also split on U+2028, which JSON
    allows unescaped inside strings.
    """
    local_line = 0

    def where() -> str:
        return f"{path}:{_line_number(path, compression, start, local_line)}"

    carry = b""
    for block in raw_blocks(path, compression, start, end, on_progress):
        lines = (carry + block).split(b"\n")
        carry = lines.pop()
        for raw in lines:
            local_line += 1
            if raw.strip():
                yield _json_text(raw, text_field, where)
    if carry:
        local_line += 1
        if carry.strip():
            yield _json_text(carry, text_field, where)


def _json_text(raw: bytes, text_field: str, where: Callable[[], str]) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where()}: not valid UTF-8: {error.reason}") from error
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where()}: invalid JSON: {error.msg} (column {error.colno})") from error
    except RecursionError as error:  # json's decoder recurses once per level of nesting
        raise ValueError(
            f"{where()}: invalid JSON: nested too deeply to parse; expected a JSON object with "
            f"a string field {text_field!r}"
        ) from error
    if not isinstance(record, dict):
        raise ValueError(
            f"{where()}: expected a JSON object with a string field {text_field!r}, "
            f"got {line.strip()[:80]!r}"
        )
    if text_field not in record:
        fields = ", ".join(map(repr, list(record)[:10])) or "none"
        raise ValueError(f"{where()}: the record has no field {text_field!r} (fields: {fields})")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(
            f"{where()}: field {text_field!r} is {type(text).__name__} {json.dumps(text)[:40]}, "
            f"expected a string"
        )
    return text


def _line_number(path: Path, compression: str | None, start: int, local_line: int) -> int:
    """The 1-based line number of the ``local_line``-th line after byte ``start`` (only
    computed for an error message, so counting the newlines before ``start`` is affordable)."""
    before = 0
    if start:
        before = sum(block.count(b"\n") for block in raw_blocks(path, compression, 0, start))
    return before + local_line


def line_chunks(path: Path, size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of about ``chunk_bytes`` covering ``path``, each ending just
    after a ``"\\n"`` (or at the end of the file), for reading JSON lines in parallel."""
    bounds = [0]
    with open(path, "rb") as file:
        while size - bounds[-1] > chunk_bytes:
            target = bounds[-1] + chunk_bytes
            file.seek(target)
            newline, scanned = -1, target
            while newline < 0:
                window = file.read(BLOCK_BYTES)
                if not window:
                    break
                newline = window.find(b"\n")
                if newline < 0:
                    scanned += len(window)
                else:
                    newline += scanned
            if newline < 0 or newline + 1 >= size:
                break
            bounds.append(newline + 1)
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:]))


def text_chunks(
    path: Path, rule: SplitRule, chunk_bytes: int, window: int = 1 << 16
) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of about ``chunk_bytes`` covering a ``.txt`` file, each
    boundary a cut point of ``rule`` (``splitting.py``): encoding the ranges one by one gives the
    ids of encoding the file whole."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as file:
        while size - bounds[-1] > chunk_bytes:
            target = bounds[-1] + chunk_bytes
            cut = -1
            span = window
            while cut < 0:
                file.seek(target)
                raw = file.read(span)
                skip = 0
                while skip < min(3, len(raw)) and 0x80 <= raw[skip] < 0xC0:
                    skip += 1  # start at a character boundary
                text = raw[skip:].decode("utf-8", errors="surrogateescape")
                p = first_cut(text, rule, lo=1, window=len(text))
                if p > 0:
                    cut = target + skip + len(text[:p].encode("utf-8", errors="surrogateescape"))
                elif target + len(raw) >= size:
                    break  # no cut point before the end (no whitespace): the rest is one range
                else:
                    span *= 2
            if cut < 0 or cut >= size:
                break
            bounds.append(cut)
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:]))


# --------------------------------------------------------------------------- Parquet and Arrow


def _check_column(schema: Any, text_field: str, where: str) -> None:
    pa = require("pyarrow")
    index = schema.get_field_index(text_field)
    if index < 0:
        raise ValueError(f"{where}: no column {text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(index).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise ValueError(f"{where}: column {text_field!r} holds {kind}, expected strings")


def _column_texts(column: Any, text_field: str, where: str, first_row: int) -> list[str]:
    if column.null_count:
        row = first_row + column.is_null().to_pylist().index(True)
        raise ValueError(f"{where}: row {row}: {text_field!r} is null, expected a string")
    return column.to_pylist()


def parquet_row_groups(path: Path) -> list[int]:
    """The row count of each row group of a Parquet file."""
    metadata = _open_parquet(path).metadata
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def _open_parquet(path: Path) -> Any:
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file: {error}") from error


def iter_parquet(
    path: Path,
    text_field: str,
    row_groups: list[int] | None = None,
    on_progress: OnProgress | None = None,
    batch_rows: int = 1024,
) -> Iterator[str]:
    """The ``text_field`` of each row of the given row groups (default all), in order.
    ``on_progress`` gets the rows read so far."""
    pa = require("pyarrow")
    parquet = _open_parquet(path)
    _check_column(parquet.schema_arrow, text_field, str(path))
    metadata = parquet.metadata
    counts = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    groups = list(range(len(counts))) if row_groups is None else row_groups
    done = 0
    for group in groups:
        row = sum(counts[:group])
        try:
            batches = parquet.iter_batches(batch_size=batch_rows, row_groups=[group],
                                           columns=[text_field], use_threads=False)
            for batch in batches:
                texts = _column_texts(batch.column(0), text_field, str(path), row)
                row += len(texts)
                done += len(texts)
                yield from texts
                if on_progress is not None:
                    on_progress(done)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(
                f"{path}: row group {group} (rows {sum(counts[:group])}-"
                f"{sum(counts[:group + 1]) - 1}): cannot read: {error}"
            ) from error


def dataset_shards(folder: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder, in row order (as its ``state.json`` lists)."""
    state_path = folder / DATASET_STATE
    try:
        state = json.loads(state_path.read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise ValueError(
            f"{state_path}: not a datasets save_to_disk state file ({error!r}); expected "
            f'{{"_data_files": [{{"filename": "data-00000-of-00001.arrow"}}, ...]}}'
        ) from error
    shards = [folder / name for name in names]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise ValueError(f"{state_path} lists missing Arrow files: {', '.join(missing)}")
    return shards


def iter_arrow_stream(
    path: Path, text_field: str, on_progress: OnProgress | None = None
) -> Iterator[str]:
    """The ``text_field`` of each row of an Arrow IPC stream file (a ``save_to_disk`` shard),
    read one record batch at a time. ``on_progress`` gets the bytes read so far."""
    pa = require("pyarrow")
    row = 0
    try:
        with pa.OSFile(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            _check_column(reader.schema, text_field, str(path))
            for batch in reader:
                texts = _column_texts(batch.column(text_field), text_field, str(path), row)
                row += len(texts)
                yield from texts
                if on_progress is not None:
                    on_progress(source.tell())
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: cannot read Arrow data after row {row}: {error}") from error


# --------------------------------------------------------------------------- files and documents


def _supported() -> str:
    return ", ".join(DATA_SUFFIXES) + " files or datasets save_to_disk folders"


def _check_not_dataset_dict(folder: Path) -> None:
    if (folder / DATASET_DICT).is_file():
        splits = sorted(p.name for p in folder.iterdir() if (p / DATASET_STATE).is_file())
        raise ValueError(
            f"{folder} is a datasets DatasetDict with splits {', '.join(splits) or '(none)'}: "
            f"name one split's folder, e.g. {folder / (splits[0] if splits else 'train')}"
        )


def _files_under(path: Path, spec: str | Path, explicit: bool) -> list[Path]:
    """The data a matched path stands for: itself, or the data files and ``datasets`` folders
    below a folder (sorted; other files skipped, as folders often hold READMEs)."""
    if path.is_dir():
        _check_not_dataset_dict(path)
        if data_format(path) is not None:
            return [path]
        found, datasets = [], []
        for child in sorted(path.rglob("*")):
            if any(child.is_relative_to(d) for d in datasets):
                continue  # the Arrow shards and state files of a datasets folder
            if child.is_dir():
                _check_not_dataset_dict(child)
                if data_format(child) is not None:
                    datasets.append(child)
                    found.append(child)
            elif data_format(child) is not None:
                found.append(child)
        if not found and explicit:
            raise FileNotFoundError(f"data folder {spec!s} contains no data: expected {_supported()}")
        return found
    if data_format(path) is None:
        raise ValueError(f"unsupported data file {path} (from {str(spec)!r}): expected {_supported()}")
    return [path]


def resolve_data(specs: Iterable[str | Path]) -> list[Path]:
    """Expand data specs into a list of data files and folders, in the order given, without
    duplicates.

    Each spec is a data file, a ``datasets`` ``save_to_disk`` folder, a folder (every data file
    and ``datasets`` folder below it, recursively, sorted), or a glob pattern (``**`` allowed;
    matches sorted). Data files are those with a suffix in :data:`DATA_SUFFIXES`. A spec matching
    nothing raises ``FileNotFoundError``; a named or glob-matched file of another type raises
    ``ValueError`` (files of other types inside a folder are skipped, as folders often hold
    READMEs), as does a ``DatasetDict`` folder (name one of its splits).
    """
    import glob

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
                    f"folder, or a glob pattern matching {_supported()}"
                )
            found = [f for m in matches for f in _files_under(Path(m), spec, explicit=False)]
            if not found:
                raise FileNotFoundError(f"data spec {str(spec)!r} matches no {_supported()}")
        files.extend(found)
    unique: dict[Path, Path] = {}
    for file in files:
        unique.setdefault(file.resolve(), file)
    return list(unique.values())


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one data file or ``datasets`` folder, each whole (a ``.txt`` file is
    read into one string)."""
    fmt = data_format(path)
    if fmt is None:
        raise ValueError(f"unsupported data file {path}: expected {_supported()}")
    if fmt.kind == "text":
        yield "".join(text for _, text in decoded_blocks(raw_blocks(path, fmt.compression), path))
    elif fmt.kind == "jsonl":
        yield from iter_jsonl(path, text_field, fmt.compression)
    elif fmt.kind == "parquet":
        yield from iter_parquet(path, text_field)
    else:
        for shard in dataset_shards(path):
            yield from iter_arrow_stream(shard, text_field)


def iter_texts(
    paths: Iterable[str | Path], text_field: str = "text", max_chars: int | None = None
) -> Iterator[str]:
    """The documents of ``paths`` in order: a whole ``.txt`` file, the ``text_field`` of each
    JSON line, Parquet row or ``datasets`` row.

    With ``max_chars``, a document longer than that is yielded in pieces of about ``max_chars``
    characters, cut before a line break (see ``splitting.py``), and a ``.txt`` file is never
    held whole. Training a BPE on the pieces gives the same tokenizer, as the cuts fall between
    the pre-tokens the trainer counts.
    """
    for path in map(Path, paths):
        fmt = data_format(path)
        if max_chars is not None and fmt is not None and fmt.kind == "text":
            cutter, pieces = PieceCutter(LINE, max_chars), 0
            for _, text in decoded_blocks(raw_blocks(path, fmt.compression), path):
                for piece in cutter.feed(text):
                    pieces += 1
                    yield piece
            rest = cutter.finish()
            yield from rest if rest or pieces else [""]  # an empty file is an empty document
        elif max_chars is not None:
            for document in iter_documents(path, text_field):
                yield from split_text(document, LINE, max_chars)
        else:
            yield from iter_documents(path, text_field)
