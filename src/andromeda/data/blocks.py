"""A data file's bytes in blocks of bounded size: a byte range of a plain file, or the whole
decompressed content of a gzip or zstd file however far it expands, and their UTF-8 text.

Errors name the file and the byte offset: invalid UTF-8, a truncated or corrupt gzip/zstd stream.
``zstandard`` is optional (the ``data`` extra): :func:`require` says how to install it.

Nothing here imports torch or the rest of Andromeda: tokenizer worker processes import it.
"""

from __future__ import annotations

import codecs
import importlib
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

BLOCK_BYTES = 1 << 20  # read size for text and JSON lines
# Compressed input is decompressed a piece at a time, pieces small enough that one call returns at
# most 32 MiB: deflate expands at most 1032:1, zstd 32768:1 (a 4-byte RLE block holds 128 KiB).
# Text gives a few KiB a piece; 4 times smaller zstd pieces would decompress 25% slower.
FEED_BYTES = {"gzip": 32 << 10, "zstd": 1 << 10}

EXTRA_HINT = "pip install -e '.[data]' in the andromeda checkout (PyPI's andromeda is an unrelated project)"

OnProgress = Callable[[int], None]  # called with the input bytes consumed so far


def require(module: str) -> Any:
    """Import an optional dependency, or raise an ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"reading this data needs the {module.split('.')[0]} package: {EXTRA_HINT}"
        ) from error


def raw_blocks(
    path: Path,
    compression: str | None = None,
    start: int = 0,
    end: int | None = None,
    on_progress: OnProgress | None = None,
) -> Iterator[bytes]:
    """The bytes of ``path[start:end]``, or of its decompressed content, in blocks of at most
    twice ``BLOCK_BYTES`` however far the input expands (a 25 KB ``.zst`` may hold 839 MB).

    Compressed files may hold several members (gzip) or frames (zstd), as ``cat`` of two
    compressed files does. A stream that ends inside a member, fails its checksum or is not
    gzip/zstd at all raises ``ValueError`` naming the file and the decompressed offset reached.
    """
    with open(path, "rb") as file:
        if compression is None:
            yield from _plain_blocks(file, start, end, on_progress)
        else:
            yield from _decompressed_blocks(file, path, compression, on_progress)


def _plain_blocks(
    file: BinaryIO, start: int, end: int | None, on_progress: OnProgress | None
) -> Iterator[bytes]:
    file.seek(start)
    remaining = (end if end is not None else float("inf")) - start
    while remaining > 0:
        block = file.read(int(min(BLOCK_BYTES, remaining)))
        if not block:
            break
        remaining -= len(block)
        if on_progress is not None:
            on_progress(file.tell() - start)
        yield block


def _decompressor(compression: str) -> Any:
    if compression == "gzip":
        return zlib.decompressobj(wbits=31)  # 31: gzip header and CRC-32 trailer checked
    return require("zstandard").ZstdDecompressor().decompressobj()


def _decompressed_blocks(
    file: BinaryIO, path: Path, compression: str, on_progress: OnProgress | None
) -> Iterator[bytes]:
    corrupt: tuple[type[BaseException], ...] = (zlib.error,)
    if compression == "zstd":
        corrupt = (require("zstandard").ZstdError,)
    produced = 0
    try:
        for block in _members(file, compression):
            produced += len(block)
            if on_progress is not None:
                on_progress(file.tell())
            yield block
    except EOFError as error:
        raise ValueError(
            f"{path}: truncated {compression} stream: it ends inside a compressed member, "
            f"after {produced} decompressed bytes"
        ) from error
    except corrupt as error:
        raise ValueError(
            f"{path}: corrupt {compression} stream after {produced} decompressed bytes: {error}"
        ) from error


def _members(file: BinaryIO, compression: str) -> Iterator[bytes]:
    """The members (gzip) or frames (zstd) of ``file`` one after another, decompressed from
    pieces of FEED_BYTES; EOFError if the input ends inside one.

    Bounded output needs bounded input: these decompressors return all that their input expands
    to. zstandard's ``stream_reader`` bounds its output instead, but ends a truncated frame
    silently as if it were complete; ``gzip.open`` reads 12% slower.
    """
    feed_bytes = FEED_BYTES[compression]
    decompressor, inside = _decompressor(compression), False  # inside: fed since a member ended
    pending: list[bytes] = []
    pending_bytes = 0
    while block := file.read(BLOCK_BYTES):
        view = memoryview(block)
        for at in range(0, len(view), feed_bytes):
            piece = view[at:at + feed_bytes]
            while piece:
                out = decompressor.decompress(piece)
                inside, pending_bytes = True, pending_bytes + len(out)
                pending.append(out)
                if decompressor.eof:  # a member ended; more may follow
                    piece, inside = decompressor.unused_data, False
                    decompressor = _decompressor(compression)
                else:
                    piece = b""
            if pending_bytes >= BLOCK_BYTES:
                yield from _in_blocks(b"".join(pending))
                pending, pending_bytes = [], 0
    if inside:
        raise EOFError(f"the input ends inside a {compression} member")
    yield from _in_blocks(b"".join(pending))


def _in_blocks(data: bytes) -> Iterator[bytes]:
    """``data`` in blocks of at most twice BLOCK_BYTES (copied into pieces only if longer)."""
    if len(data) <= 2 * BLOCK_BYTES:
        if data:
            yield data
        return
    for at in range(0, len(data), BLOCK_BYTES):
        yield data[at:at + BLOCK_BYTES]


def decoded_blocks(blocks: Iterable[bytes], path: Path, offset: int = 0) -> Iterator[tuple[bytes, str]]:
    """``(block, text)`` pairs: each block with the characters it completes, decoded as UTF-8.

    Invalid UTF-8 raises ``ValueError`` naming the file and the byte offset (counted from the
    start of the file, ``offset`` being where ``blocks`` start).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    position = offset
    for block in blocks:
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(block)
        except UnicodeDecodeError as error:
            raise _utf8_error(path, position - pending + error.start, error) from error
        position += len(block)
        yield block, text
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        pending = len(decoder.getstate()[0])
        raise _utf8_error(path, position - pending + error.start, error) from error


def _utf8_error(path: Path, offset: int, error: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path} is not valid UTF-8 (byte {offset}): {error.reason}")
