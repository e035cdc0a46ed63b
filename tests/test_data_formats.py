"""Data formats: each reads to the same documents as its plain-text equivalent, and every kind of
bad input fails with a message naming the file and the record (line, row or byte)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from andromeda.data import TokenStore, iter_texts, resolve_data, tokenize_corpus
from andromeda.data import store as store_module
from andromeda.tokenizers import ByteTokenizer, train_bpe

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

DOCS = ["first document\nwith two lines", "second: café ünïcödé 😀 \u2028 sep", "",
        "third\r\nwith CRLF\r\n", "x" * 3000]


def _jsonl(docs: list[str], **extra) -> bytes:
    return "".join(json.dumps({"text": d, **extra}, ensure_ascii=False) + "\n" for d in docs).encode()


def _zst(data: bytes, checksum: bool = False) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=checksum).compress(data)


def _dataset(path: Path, docs: list, shards: int = 2) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(
        str(path), num_shards=shards)
    return path


def _parquet(path: Path, table) -> Path:
    pq.write_table(table, path, row_group_size=2)  # several row groups
    return path


@pytest.fixture
def formats(tmp_path: Path) -> dict[str, Path]:
    """The same documents in every record format, and a text in every text format."""
    data = _jsonl(DOCS)
    half = len(data) // 2
    files = {
        ".jsonl": data, ".jsonl.gz": gzip.compress(data), ".jsonl.zst": _zst(data, checksum=True),
        ".json.gz": gzip.compress(data[:half]) + gzip.compress(data[half:]),  # two members
        ".json.zst": _zst(data[:half]) + _zst(data[half:]),  # two frames
    }
    paths = {}
    for suffix, content in files.items():
        paths[suffix] = tmp_path / f"docs{suffix}"
        paths[suffix].write_bytes(content)
    paths[".parquet"] = _parquet(tmp_path / "docs.parquet", pa.table({"text": DOCS, "n": range(5)}))
    paths["dataset"] = _dataset(tmp_path / "dataset", DOCS)
    return paths


def test_every_record_format_reads_the_same_documents(formats):
    for name, path in formats.items():
        assert list(iter_texts([path])) == DOCS, name


def test_every_record_format_tokenises_like_jsonl(formats, tmp_path):
    tok = ByteTokenizer()
    reference = TokenStore([formats[".jsonl"]], tok, cache_dir=tmp_path / "c").tokens.tolist()
    for name, path in formats.items():
        store = TokenStore([path], tok, cache_dir=tmp_path / "c")
        assert store.tokens.tolist() == reference, name
        assert store.num_documents == len(DOCS)
        assert store.num_bytes == sum(len(d.encode()) for d in DOCS)


def test_compressed_text_is_one_document(tmp_path):
    text = "ünïcödé line\r\n" * 500 + "no trailing newline"
    plain, gz, zst = tmp_path / "a.txt", tmp_path / "a.txt.gz", tmp_path / "a.txt.zst"
    plain.write_text(text, encoding="utf-8", newline="")
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    zst.write_bytes(_zst(plain.read_bytes()))
    assert list(iter_texts([plain])) == list(iter_texts([gz])) == list(iter_texts([zst])) == [text]
    stores = [TokenStore([p], ByteTokenizer(), cache_dir=tmp_path / "c") for p in (plain, gz, zst)]
    assert all(np.array_equal(s.tokens, stores[0].tokens) for s in stores)


def test_resolve_data_finds_every_format_and_dataset_folders(formats, tmp_path):
    (tmp_path / "notes.md").write_text("skipped")
    (tmp_path / "dict").mkdir()
    found = resolve_data([tmp_path])
    assert sorted(found) == sorted(formats.values())  # the dataset's own files are not listed
    assert resolve_data([formats["dataset"]]) == [formats["dataset"]]
    assert resolve_data([str(tmp_path / "*.j*")]) == sorted(
        p for s, p in formats.items() if s.startswith(".j"))


def test_a_dataset_dict_folder_asks_for_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits test, train: name one split"):
        resolve_data([tmp_path / "dd"])
    assert resolve_data([tmp_path / "dd" / "train"]) == [tmp_path / "dd" / "train"]


# --------------------------------------------------------------------------- bad input


def _raises(path: Path, pattern: str, field: str = "text") -> None:
    """Reading fails with `pattern`, both when iterating documents and when tokenising."""
    with pytest.raises(ValueError, match=pattern):
        list(iter_texts([path], text_field=field))
    with pytest.raises(ValueError, match=pattern):
        tokenize_corpus([path], ByteTokenizer(), path.parent / "cache", text_field=field,
                        num_proc=1, progress=False)


@pytest.mark.parametrize("suffix, compress", [
    (".jsonl", lambda b: b), (".jsonl.gz", gzip.compress), (".json.zst", _zst)])
@pytest.mark.parametrize("line, pattern", [
    (b'{"text": \n', r"invalid JSON"),
    (b'{"content": "x", "id": 1}\n', r"the record has no field 'text' \(fields: 'content', 'id'\)"),
    (b'{"text": 7}\n', r"field 'text' is int 7, expected a string"),
    (b'["text"]\n', r"expected a JSON object"),
    (b'{"text": "caf\xe9"}\n', r"not valid UTF-8"),
])
def test_bad_json_lines_name_file_and_line(tmp_path, suffix, compress, line, pattern):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(compress(b'{"text": "ok"}\n\n' + line + b'{"text": "after"}\n'))
    _raises(path, rf"bad{suffix}:3: {pattern}")


def test_bad_line_in_a_later_chunk_names_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 64)
    monkeypatch.setattr(store_module, "MIN_PARALLEL_BYTES", 0)
    path = tmp_path / "long.jsonl"
    path.write_bytes(_jsonl([f"document {i}" for i in range(40)]) + b'{"text": 1}\n')
    bpe = train_bpe([f"document {i}" for i in range(40)], vocab_size=270)  # runs in workers
    for num_proc in (1, 2):  # the error crosses the worker process boundary unchanged
        with pytest.raises(ValueError, match=r"long.jsonl:41: field 'text' is int"):
            tokenize_corpus([path], bpe, tmp_path / "cache", num_proc=num_proc, progress=False)
    assert not list((tmp_path / "cache").glob("corpus-*")) and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("suffix, compress", [(".jsonl.gz", gzip.compress), (".jsonl.zst", _zst)])
def test_truncated_compressed_stream(tmp_path, suffix, compress):
    path = tmp_path / f"cut{suffix}"
    data = compress(_jsonl([f"document {i} " * 20 for i in range(200)]))
    path.write_bytes(data[: len(data) // 2])
    _raises(path, rf"cut{suffix}: truncated \w+ stream: it ends inside a compressed member")


def test_corrupt_compressed_streams(tmp_path):
    data = _jsonl([f"document {i} " * 20 for i in range(200)])
    gz = bytearray(gzip.compress(data))
    gz[len(gz) // 2] ^= 0xFF
    (tmp_path / "flip.jsonl.gz").write_bytes(bytes(gz))
    _raises(tmp_path / "flip.jsonl.gz", r"flip.jsonl.gz: corrupt gzip stream after \d+ decompressed bytes")
    zst = bytearray(_zst(data, checksum=True))
    zst[-2] ^= 0xFF  # the content checksum
    (tmp_path / "flip.jsonl.zst").write_bytes(bytes(zst))
    _raises(tmp_path / "flip.jsonl.zst", r"flip.jsonl.zst: corrupt zstd stream")
    (tmp_path / "plain.json.zst").write_bytes(data)  # not compressed at all
    _raises(tmp_path / "plain.json.zst", r"plain.json.zst: corrupt zstd stream after 0 ")


def test_invalid_utf8_in_text_names_the_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 100)
    path = tmp_path / "latin1.txt"
    path.write_bytes(("line\n" * 50).encode() + "café".encode("latin-1") + b"\nmore\n")
    _raises(path, r"latin1.txt is not valid UTF-8 \(byte 253\)")
    gz = tmp_path / "latin1.txt.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    _raises(gz, r"latin1.txt.gz is not valid UTF-8 \(byte 253\)")


def test_bad_parquet_files_name_file_column_and_row(tmp_path):
    _raises(_parquet(tmp_path / "nocol.parquet", pa.table({"body": ["a"]})),
            r"nocol.parquet: no column 'text' \(columns: body\)")
    _raises(_parquet(tmp_path / "ints.parquet", pa.table({"text": [1, 2]})),
            r"ints.parquet: column 'text' holds int64, expected strings")
    _raises(_parquet(tmp_path / "null.parquet", pa.table({"text": ["a", "b", "c", None, "e"]})),
            r"null.parquet: row 3: 'text' is null")
    good = _parquet(tmp_path / "good.parquet", pa.table({"text": DOCS}))
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[:-30])
    _raises(tmp_path / "cut.parquet", r"cut.parquet: not a readable Parquet file")
    _raises(good, r"good.parquet: no column 'body'", field="body")


def test_bad_dataset_folders_name_the_shard_and_row(tmp_path):
    folder = _dataset(tmp_path / "nulls", ["a", "b", "c", None], shards=2)
    _raises(folder, r"data-00001-of-00002.arrow: row 1: 'text' is null")
    folder = _dataset(tmp_path / "cut", DOCS, shards=1)
    shard = folder / "data-00000-of-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    _raises(folder, r"data-00000-of-00001.arrow: cannot read Arrow data after row 0")


def test_a_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *args):
        if name.startswith("zstandard"):
            raise ImportError("No module named 'zstandard'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    (tmp_path / "a.jsonl.zst").write_bytes(_zst(_jsonl(["x"])))
    with pytest.raises(ImportError, match=r"pip install -e '\.\[data\]' in the andromeda checkout"):
        list(iter_texts([tmp_path / "a.jsonl.zst"]))
