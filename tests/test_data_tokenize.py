"""Tokenising at corpus scale: pieces cut by the split rule encode exactly like the whole text;
worker processes give the same array as one process; and the per-file cache survives kill -9,
concurrent builders and other users' umasks."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, normalizers, pre_tokenizers

from andromeda.data import TokenStore, iter_texts, resolve_data, tokenize_corpus
from andromeda.data import pool
from andromeda.data import store as store_module
from andromeda.data.splitting import BYTES, LINE, PARAGRAPH, rule_for, split_text
from andromeda.tokenizers import ByteTokenizer, HFTokenizer, train_bpe

FRAGMENTS = [
    "word", "it's", "we'll", "café", "naïve", "e\u0301", "日本語", "🚀👩\u200d🔬", "1234", "3.14",
    "--", "!?", "<|endoftext|>", " ", "  ", "\t", "\u00a0", "\u3000", "\n", "\n\n", "\r\n",
    "  \n", " \r\n", "\n   \n", "\u2028", "x" * 70,
]


def _text(seed: int, length: int = 4000) -> str:
    """Text with every kind of boundary a cut could break: multi-byte characters, combining
    marks, CRLF, trailing spaces, blank and space-only lines, a special token; no final newline."""
    rng = random.Random(seed)
    parts = [rng.choice(FRAGMENTS) + rng.choice(["", " "]) for _ in range(length)]
    return "".join(parts).rstrip("\n") + " end"


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe([_text(s, 2000) for s in range(4)], vocab_size=600)


@pytest.fixture(scope="module")
def bpe_nfc(bpe) -> HFTokenizer:
    """GPT-NeoX-20B's shape: an NFC normalizer, and added tokens for runs of spaces."""
    tokenizer = HFTokenizer(type(bpe._tokenizer).from_str(bpe._tokenizer.to_str()), "bpe-nfc")
    tokenizer._tokenizer.normalizer = normalizers.NFC()
    tokenizer._tokenizer.add_tokens([AddedToken(" " * n, normalized=True) for n in range(2, 6)])
    return tokenizer


# --------------------------------------------------------------------------- exact cuts


@pytest.mark.parametrize("name", ["byte", "bpe", "bpe_nfc"])
@pytest.mark.parametrize("piece_chars", [5, 37, 300])
def test_cut_pieces_encode_like_the_whole_text(request, name, piece_chars):
    tokenizer = ByteTokenizer() if name == "byte" else request.getfixturevalue(name)
    rule = BYTES if name == "byte" else rule_for(json.loads(tokenizer._tokenizer.to_str()))
    assert rule.exact
    text = _text(seed=piece_chars)
    pieces = split_text(text, rule, piece_chars)
    assert "".join(pieces) == text and len(pieces) > len(text) // (piece_chars * 4)
    assert [i for piece in pieces for i in tokenizer.encode(piece)] == tokenizer.encode(text)


def test_cutting_after_a_newline_would_not_be_exact(bpe):
    """The test above has teeth: the obvious rule, cutting just after each line break, changes
    the ids of this text (e.g. "a  \\nb" is "  " + "\\n" whole but "  \\n" at the end of a piece)."""
    text = _text(seed=1)
    whole = bpe.encode(text)
    cuts = [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    naive = [t for a, b in zip([0, *cuts], [*cuts, len(text)]) for t in bpe.encode(text[a:b])]
    assert naive != whole


def test_which_tokenizers_get_the_exact_rule(bpe):
    config = json.loads(bpe._tokenizer.to_str())
    assert rule_for(None) is BYTES and rule_for(config) is LINE
    sequence = {**config, "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}]}}
    assert rule_for(sequence) is LINE
    spaces = {**config, "added_tokens": [{"content": "  ", "lstrip": True}, {"content": "<x>"}]}
    assert rule_for(spaces) is LINE  # GPT-NeoX-20B has added tokens of 2..24 spaces
    for change in [
        {"normalizer": {"type": "NFKC"}},  # may turn a non-space into a space
        {"normalizer": {"type": "Prepend", "prepend": "▁"}},
        {"pre_tokenizer": {**config["pre_tokenizer"], "add_prefix_space": True}},
        {"pre_tokenizer": json.loads(pre_tokenizers.Metaspace().__getstate__())},
        {"added_tokens": [{"content": "a\n", "rstrip": False}]},  # may straddle a cut
        {"added_tokens": [{"content": "<x>", "rstrip": True}]},  # would reach across one
        {"added_tokens": [{"content": "  ", "single_word": True}]},
    ]:
        assert rule_for({**config, **change}) is PARAGRAPH, change


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_large_text_file_is_tokenised_in_ranges_like_a_whole_encode(bpe, tmp_path, monkeypatch,
                                                                       num_proc):
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 500)
    monkeypatch.setattr(store_module, "PIECE_CHARS", 60)
    monkeypatch.setattr(store_module, "MIN_PARALLEL_BYTES", 0)
    path = tmp_path / "big.txt"
    path.write_bytes(_text(seed=7, length=3000).encode())
    text = path.read_bytes().decode()
    ranges = store_module.text_chunks(path, LINE, 500)
    assert len(ranges) > 10
    for tokenizer in (ByteTokenizer(), bpe):
        stats = tokenize_corpus([path], tokenizer, tmp_path / "cache", num_proc=num_proc,
                                progress=False)
        assert stats.processes == (2 if num_proc == 2 and tokenizer is bpe else 0)
        store = TokenStore([path], tokenizer, cache_dir=tmp_path / "cache", build=False)
        eos = tokenizer.eos_id
        assert store.tokens.tolist() == [eos, *tokenizer.encode(text), eos]
        assert store.num_bytes == len(text.encode()) and store.num_documents == 1


def test_bpe_trained_on_pieces_equals_bpe_trained_on_whole_files(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(_text(seed=10 + i, length=1500), encoding="utf-8")
    files = resolve_data([tmp_path])
    pieces = list(iter_texts(files, max_chars=100))
    assert len(pieces) > 30 and "".join(pieces) == "".join(iter_texts(files))
    whole = train_bpe(iter_texts(files), vocab_size=500)
    assert train_bpe(pieces, vocab_size=500)._tokenizer.to_str() == whole._tokenizer.to_str()


# --------------------------------------------------------------------------- parallel


def _mixed_corpus(root: Path) -> list[Path]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    zstandard = pytest.importorskip("zstandard")
    root.mkdir()
    (root / "a.txt").write_text(_text(seed=20, length=3000), encoding="utf-8")
    lines = "".join(json.dumps({"text": _text(seed=s, length=40)}) + "\n" for s in range(40))
    (root / "b.jsonl").write_text(lines)
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": [_text(seed=s, length=30) for s in range(30)]}),
                   root / "d.parquet", row_group_size=4)
    return resolve_data([root])


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_one_and_two_processes_give_identical_arrays(request, tmp_path, monkeypatch, name):
    tokenizer = ByteTokenizer() if name == "byte" else request.getfixturevalue("bpe")
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(store_module, "MIN_PARALLEL_BYTES", 0)
    files = _mixed_corpus(tmp_path / "data")
    arrays = []
    for num_proc in (1, 2):
        stats = tokenize_corpus(files, tokenizer, tmp_path / f"cache{num_proc}", num_proc=num_proc,
                                progress=False)
        # The byte tokenizer is disk-bound: it always runs in this process.
        assert stats.processes == (2 if num_proc == 2 and name == "bpe" else 0)
        assert (stats.files, stats.documents) == (4, 1 + 40 + 40 + 30)
        arrays.append(TokenStore(files, tokenizer, tmp_path / f"cache{num_proc}").tokens)
    assert np.array_equal(arrays[0], arrays[1])
    expected = [tokenizer.eos_id]
    for document in iter_texts(files):
        expected += [*tokenizer.encode(document), tokenizer.eos_id]
    assert arrays[0].tolist() == expected


def test_workers_import_neither_torch_nor_andromeda():
    script = pool._BOOTSTRAP.replace(".serve()", "") + (
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'andromeda')))")
    result = subprocess.run([sys.executable, "-c", script, str(Path(pool.__file__).parent)],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_dying_worker_raises_in_the_caller(bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "_BOOTSTRAP", "import sys\nsys.stdin.readline()\nsys.stdin.readline()\n"
                                            "print('worker trouble', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setattr(store_module, "MIN_PARALLEL_BYTES", 0)
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text("some text")
    with pytest.raises(RuntimeError, match=r"exited with code 3 while tokenizing .*[01].txt(.|\n)*worker trouble"):
        tokenize_corpus(resolve_data([tmp_path]), bpe, tmp_path / "cache", num_proc=2,
                        progress=False)


# --------------------------------------------------------------------------- the cache under stress


def _check_no_incomplete_entry(cache: Path) -> list[str]:
    """Every entry that looks complete (has its json) is; returns the sources of those."""
    complete = []
    for manifest_path in (cache / "files").glob("*.json"):
        manifest = json.loads(manifest_path.read_text())
        for name, tokens in manifest["parts"]:
            part = manifest_path.parent / f"{name}.bin"
            assert part.stat().st_size == tokens * 2, part
        complete.append(Path(manifest["source"]).name)
    for sidecar in (cache / "files").glob("*/part-*.json"):
        tokens = json.loads(sidecar.read_text())["num_tokens"]
        assert sidecar.with_suffix(".bin").stat().st_size == tokens * 2, sidecar
    return complete


@pytest.mark.parametrize("num_proc", [1, 2])
def test_kill_9_leaves_no_complete_looking_entry_and_a_rerun_finishes(bpe, tmp_path, num_proc):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("alpha " * 100)
    (data / "b.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(6)))
    (data / "c.txt").write_text("gamma " * 100)
    files = resolve_data([data])  # a.txt, b.jsonl, c.txt
    bpe.save(tmp_path / "tokenizer")
    tokenizer = HFTokenizer.from_file(tmp_path / "tokenizer" / "tokenizer.json")
    cache, marker = tmp_path / "cache", tmp_path / "paused"
    script = (
        "from andromeda.data import store, tokenize_corpus\n"
        "from andromeda.tokenizers import HFTokenizer\n"
        "store.MIN_PARALLEL_BYTES = 0\n"
        f"tokenizer = HFTokenizer.from_file({str(tmp_path / 'tokenizer' / 'tokenizer.json')!r})\n"
        f"tokenize_corpus({[str(f) for f in files]!r}, tokenizer, {str(cache)!r}, "
        f"num_proc={num_proc}, progress=False, tokenizer_pause={f'3:{marker}'!r})\n"
    )
    # The test hook, injected (worker processes get it as a plain setting): each tokenizing
    # process stops for good after its 3rd document: b.jsonl's 2nd (one process), or b.jsonl's
    # 3rd (two workers: a.txt and c.txt go to the other one).
    temp = tmp_path / "system-temp"  # the process's TMPDIR: a kill must leave nothing there
    temp.mkdir()
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                               env={**os.environ, "TMPDIR": str(temp)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, "the tokenizer finished or failed before pausing"
            assert time.monotonic() < deadline, "the tokenizer never paused"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the tokenizer and its workers
        process.wait()

    assert list(cache.rglob("*.tmp")), "b.jsonl's part was being written"
    assert not list(temp.iterdir())
    copies = [p for p in cache.glob("tokenizer.*.tmp") if (p / "tokenizer.json").is_file()]
    assert len(copies) == 1  # the tokenizer's files the workers load, in the cache
    assert not list(cache.glob("corpus-*"))
    complete = _check_no_incomplete_entry(cache)
    assert "b.jsonl" not in complete
    if num_proc == 1:
        assert complete == ["a.txt"]

    stats = tokenize_corpus(files, tokenizer, cache, num_proc=num_proc, progress=False)
    assert not list(cache.rglob("*.tmp"))  # the killed writer's leftovers are gone, the copy too
    assert stats.tokenized_files == 3 - len(complete)  # finished files were not redone
    fresh = TokenStore(files, tokenizer, tmp_path / "fresh")
    assert np.array_equal(TokenStore(files, tokenizer, cache, build=False).tokens, fresh.tokens)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_cache_files_honour_the_umask(bpe, tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(store_module, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 500)
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"text {i}")
    (tmp_path / "big.txt").write_text("a line of text\n" * 200)  # several parts, with sidecars
    cache = tmp_path / "cache"
    previous = os.umask(0o027)
    try:
        stats = tokenize_corpus(resolve_data([tmp_path]), bpe, cache, num_proc=num_proc,
                                progress=False)
    finally:
        os.umask(previous)
    assert stats.processes == (2 if num_proc == 2 else 0)
    modes = {p.relative_to(cache).as_posix(): p.stat().st_mode & 0o777 for p in cache.rglob("*")}
    assert len(modes) > 10
    assert all(mode == (0o750 if (cache / p).is_dir() else 0o640) for p, mode in modes.items()), modes


class SlowCountingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        time.sleep(0.05)  # long enough for the second builder to arrive while the first works
        return super().encode(text)


def test_concurrent_builders_tokenise_once(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"text {i}")
    files = resolve_data([tmp_path])
    tokenizer, results = SlowCountingTokenizer(), []
    builders = [threading.Thread(target=lambda: results.append(
        tokenize_corpus(files, tokenizer, tmp_path / "cache", progress=False))) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert tokenizer.calls == 4
    assert sorted(r.tokenized_files for r in results) == [0, 4]
    assert len({r.cache_path for r in results}) == 1


def test_stale_temporaries_are_removed_by_the_next_build(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    cache = tmp_path / "cache"
    (cache / "files").mkdir(parents=True)
    stale = [cache / "corpus-x.bin.999999-dead.tmp", cache / "files" / "k.json.1-beef.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    tokenize_corpus([tmp_path / "a.txt"], ByteTokenizer(), cache, progress=False)
    assert not any(p.exists() for p in stale)


def test_a_build_leaves_other_tmp_files_in_its_folder_alone(tmp_path):
    """A cache folder given by hand may hold files that are not the cache's: only names
    `temporary_path` gives, where the cache writes, are leftovers."""
    (tmp_path / "a.txt").write_text("text")
    cache = tmp_path / "cache"
    (cache / "files").mkdir(parents=True)
    (cache / "notes").mkdir()
    theirs = [cache / "draft.tmp", cache / "notes" / "x.bin.123-abc.tmp", cache / "files.tmp",
              cache / "files" / "plain.tmp"]
    for path in theirs:
        path.write_text("keep me")
    for folder in (cache / "backup.tmp", cache / "backup.77-beef.tmp"):  # not the tokenizer's copy
        folder.mkdir()
        (folder / "data.txt").write_text("keep me")
    stale = cache / "tokenizer.4242-0badcafe.tmp"  # a killed build's tokenizer copy
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{}")
    tokenize_corpus([tmp_path / "a.txt"], ByteTokenizer(), cache, progress=False)
    assert all(path.read_text() == "keep me" for path in theirs)
    assert (cache / "backup.tmp" / "data.txt").read_text() == "keep me"
    assert (cache / "backup.77-beef.tmp" / "data.txt").read_text() == "keep me"
    assert not stale.exists()
