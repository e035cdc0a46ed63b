"""The data pipeline under hostile inputs: compressed files that expand enormously are tokenised
in bounded memory, a file that changes while it is tokenised is refused with nothing cached, and
JSON nested beyond the parser's recursion limit fails naming its file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from andromeda.data import TokenStore, iter_texts, tokenize_corpus
from andromeda.data import blocks, formats, store, worker
from andromeda.data.formats import iter_jsonl
from andromeda.tokenizers import ByteTokenizer
from helpers import child_env

zstandard = pytest.importorskip("zstandard")

# --------------------------------------------------------------------------- compressed input

# Peak RSS grows by 16 MB tokenising this much as .txt and 35-45 MB compressed (by 180-880 MB when
# compressed input was decompressed a whole read block at a time); the process starts at ~280 MB,
# so the limit also keeps the peak within 1.5 times that of the .txt.
EXPANDED_MB = 160
GROWTH_LIMIT_MB = 96

_PEAK_RSS = """
import json, resource, sys
from andromeda.data import tokenize_corpus
from andromeda.tokenizers import ByteTokenizer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats = tokenize_corpus([sys.argv[1]], ByteTokenizer(), sys.argv[2], progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024, "bytes": stats.bytes}))
"""


def _compressed(path: Path, block: bytes, copies: int) -> Path:
    """``copies`` of ``block`` as ONE gzip member or zstd frame: a small file whose content only
    a reader that bounds its output can hold in little memory."""
    if path.name.endswith(".zst"):
        compressor = zstandard.ZstdCompressor(level=1).compressobj()
    else:
        compressor = zlib.compressobj(1, wbits=31)
    with open(path, "wb") as out:
        for _ in range(copies):
            out.write(compressor.compress(block))
        out.write(compressor.flush())
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux, bytes on macOS")
@pytest.mark.parametrize("name", ["big.txt.zst", "big.jsonl.gz"])
def test_compressed_input_is_tokenised_in_bounded_memory(tmp_path, name):
    if name.startswith("big.txt"):
        block = (b"the quick brown fox jumps over the lazy dog\n" * 24000)[: 1 << 20]
    else:
        line = json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 1400}) + "\n"
        block = line.encode() * 16  # ~1 MB
    path = _compressed(tmp_path / name, block, EXPANDED_MB)
    assert path.stat().st_size < 1 << 20  # read in one block: only the decompressor can bound it
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), str(tmp_path / "cache")],
                            env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    peak = json.loads(result.stdout)
    assert peak["bytes"] >= EXPANDED_MB * 0.9 * (1 << 20)  # it read everything
    assert peak["growth_mb"] < GROWTH_LIMIT_MB, peak


@pytest.mark.parametrize("name", ["bomb.txt.zst", "bomb.txt.gz"])
@pytest.mark.parametrize("pattern", [bytes(range(256)), b"\0"])  # b"\0": zstd's best case, RLE
def test_decompressed_blocks_are_bounded_and_exact(tmp_path, name, pattern):
    path = _compressed(tmp_path / name, pattern * ((1 << 20) // len(pattern)), 40)  # 40 MiB
    sizes, total = [], 0
    for block in blocks.raw_blocks(path, formats.data_format(path).compression):
        start = total % len(pattern)
        assert block == (pattern * (len(block) // len(pattern) + 2))[start:start + len(block)]
        sizes.append(len(block))
        total += len(block)
    assert total == 40 << 20
    assert max(sizes) <= 2 << 20  # twice blocks.BLOCK_BYTES


# --------------------------------------------------------------------------- files that change


def _rewrite_after_first_block(monkeypatch, target: Path, change):
    """Make the tokenizer's reader call ``change(target)`` after handing out its first block."""
    read = worker.raw_blocks

    def reading(path, *args, **kwargs):
        blocks = read(path, *args, **kwargs)
        yield next(blocks)
        if Path(path) == target:
            change(target)
        yield from blocks

    monkeypatch.setattr(blocks, "BLOCK_BYTES", 64)
    monkeypatch.setattr(worker, "raw_blocks", reading)


def _append(path: Path) -> None:
    with open(path, "ab") as file:
        file.write(b" and more text appended while it was read")


def _same_size_and_time(path: Path) -> None:
    stat = path.stat()
    path.write_bytes(path.read_bytes().upper())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as rsync -t or a restore does


@pytest.mark.parametrize("parts", ["one part", "several parts"])
@pytest.mark.parametrize("change", [_append, _same_size_and_time])
def test_a_file_changed_while_tokenised_is_an_error_and_nothing_is_cached(tmp_path, monkeypatch, change, parts):
    data = tmp_path / "data.txt"
    data.write_text("the original text of the file, long enough for several blocks. " * 8)
    steady = tmp_path / "steady.txt"
    steady.write_text("a file nobody touches")
    cache = tmp_path / "cache"
    if parts == "several parts":
        monkeypatch.setattr(store, "CHUNK_BYTES", 128)
    _rewrite_after_first_block(monkeypatch, data, change)
    with pytest.raises(ValueError, match=rf"{data} changed while it was being tokenized \(its "):
        tokenize_corpus([steady, data], ByteTokenizer(), cache, progress=False)
    manifests = [json.loads(p.read_text())["source"] for p in (cache / "files").glob("*.json")]
    assert manifests == [str(steady)]  # the unchanged file's entry only
    assert not list(cache.glob("corpus-*")) and not list(cache.rglob("*.tmp"))
    assert sorted(p.suffix for p in (cache / "files").iterdir()) == [".bin", ".json"]  # none of data.txt

    monkeypatch.undo()  # the file is left alone now: it is tokenised as it is
    rebuilt = TokenStore([data], ByteTokenizer(), cache)
    assert bytes(rebuilt.tokens[1:-1].astype(np.uint8)) == data.read_bytes()


def test_a_changed_datasets_folder_is_an_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dataset"
    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(str(folder))
    read = worker.iter_arrow_stream

    def reading(path, *args, **kwargs):
        (folder / "README.md").write_text("written while the shard was read")
        return read(path, *args, **kwargs)

    monkeypatch.setattr(worker, "iter_arrow_stream", reading)
    with pytest.raises(ValueError, match=rf"{folder} changed while it was being tokenized \(files of"):
        tokenize_corpus([folder], ByteTokenizer(), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "files").iterdir())


# --------------------------------------------------------------------------- deeply nested JSON

DEEP = "[" * 100_000


def test_deeply_nested_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "fine"}\n\n' + DEEP + "\n")
    with pytest.raises(ValueError, match=rf"{path}:3: invalid JSON: nested too deeply"):
        list(iter_jsonl(path, "text"))
    with pytest.raises(ValueError, match=rf"{path}:3: invalid JSON: nested too deeply"):
        list(iter_texts([path]))
    compressed = tmp_path / "deep.jsonl.zst"
    compressed.write_bytes(zstandard.ZstdCompressor().compress(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"{compressed}:3: invalid JSON: nested too deeply"):
        tokenize_corpus([compressed], ByteTokenizer(), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "files").glob("*.json"))


def test_deeply_nested_json_in_a_parallel_chunk_names_its_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(50)]
    path.write_text("\n".join(lines + [DEEP]) + "\n")
    start = path.read_bytes().index(b"\n", 100) + 1  # a chunk that starts mid-file
    with pytest.raises(ValueError, match=rf"{path}:51: invalid JSON: nested too deeply"):
        list(iter_jsonl(path, "text", start=start))


def test_deeply_nested_datasets_state_file_names_it(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "state.json").write_text(DEEP)
    with pytest.raises(ValueError, match=rf"{folder / 'state.json'}: not a datasets save_to_disk state"):
        list(iter_texts([folder]))


def test_a_deeply_nested_cache_file_is_rebuilt(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("some text")
    first = TokenStore([corpus], ByteTokenizer(), tmp_path / "cache")
    first.meta_path.write_text(DEEP)  # corrupt beyond parsing
    again = TokenStore([corpus], ByteTokenizer(), tmp_path / "cache")
    assert not again.from_cache and np.array_equal(again.tokens, first.tokens)
