"""Evaluation: numbers equal to a direct computation, every token scored once, clear limits."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from andromeda import Andromeda
from andromeda.data import TokenStore
from andromeda.evaluation import evaluate
from andromeda.tokenizers import ByteTokenizer, train_bpe

TEXT = "Out, out, brief candle! Life's but a walking shadow, a poor player. — ¿Qué? " * 3


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Andromeda.from_config("tiny", max_seq_len=64).Andromeda


def _store(tmp_path, tokenizer) -> TokenStore:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return TokenStore([path], tokenizer, cache_dir=tmp_path / "cache")


def _direct_nats(model: Andromeda, tokens: np.ndarray, seq_len: int) -> float:
    """Sum of -log p(token | window prefix) over every token but the first, window by window."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start : start + seq_len + 1]
            logits = model(chunk[None, :-1])[0]
            total += float(F.cross_entropy(logits.double(), chunk[1:], reduction="sum"))
    return total


@pytest.mark.parametrize("seq_len, batch_size", [(16, 3), (64, 2)])
def test_bits_per_byte_equals_the_direct_computation(tmp_path, model, seq_len, batch_size):
    store = _store(tmp_path, ByteTokenizer())
    result = evaluate(model, store.tokens, seq_len, batch_size, store.num_bytes)
    nats = _direct_nats(model, store.tokens, seq_len)
    num_bytes = len(TEXT.encode("utf-8"))
    assert store.num_bytes == num_bytes
    assert result["tokens"] == len(store.tokens) - 1  # every token but the first, once
    assert result["loss"] == pytest.approx(nats / (len(store.tokens) - 1), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)


def test_bits_per_byte_counts_bytes_not_tokens_with_bpe(tmp_path, model):
    bpe = train_bpe([TEXT], vocab_size=258 + 30)
    store = _store(tmp_path, bpe)
    net = Andromeda.from_config("tiny", max_seq_len=64, num_tokens=320).Andromeda
    result = evaluate(net, store.tokens, 32, 4, store.num_bytes)
    assert len(store.tokens) < len(TEXT.encode("utf-8"))  # merges make fewer tokens than bytes
    nats = _direct_nats(net, store.tokens, 32)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)


def test_max_windows_scores_an_even_sample_and_scales_the_bytes(tmp_path, model):
    store = _store(tmp_path, ByteTokenizer())
    part = evaluate(model, store.tokens, 16, 4, store.num_bytes, max_windows=3)
    targets = len(store.tokens) - 1
    windows = -(-targets // 16)
    scored = 2 * 16 + targets - (windows - 1) * 16  # the first, the middle and the (shorter) last
    assert part["tokens"] == scored
    assert part["bytes"] == round(store.num_bytes * scored / targets)
    # nats / ln 2 / (bytes * scored / targets), with nats = loss * scored
    assert part["bits_per_byte"] == pytest.approx(part["loss"] * targets / math.log(2) / store.num_bytes, rel=1e-9)
    # The loss is that of exactly those windows: the first, the middle one and the last.
    ids = torch.from_numpy(np.asarray(store.tokens, dtype=np.int64))
    nats = 0.0
    with torch.no_grad():
        for index in (0, round((windows - 1) / 2), windows - 1):
            chunk = ids[index * 16 : index * 16 + 17]
            nats += float(F.cross_entropy(model(chunk[None, :-1])[0].double(), chunk[1:], reduction="sum"))
    assert part["loss"] == pytest.approx(nats / scored, rel=1e-5)


def test_evaluation_leaves_the_training_mode_alone(tmp_path, model):
    store = _store(tmp_path, ByteTokenizer())
    model.train()
    evaluate(model, store.tokens, 16, 4, store.num_bytes)
    assert model.training


def test_seq_len_beyond_max_seq_len_is_rejected(tmp_path, model):
    store = _store(tmp_path, ByteTokenizer())
    torch.manual_seed(0)
    absolute = Andromeda.from_config("tiny", max_seq_len=64, use_abs_pos_emb=True).Andromeda  # positions end at 64
    with pytest.raises(ValueError, match="evaluation seq_len 65 exceeds the model's max_seq_len 64"):
        evaluate(absolute, store.tokens, 65, 4, store.num_bytes)
    with pytest.raises(ValueError, match="num_bytes must be positive"):
        evaluate(model, store.tokens, 16, 4, 0)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_windows must be at least 1 .*got {bad}"):
            evaluate(model, store.tokens, 16, 4, store.num_bytes, max_windows=bad)


def test_progress_bar_counts_the_batches_on_stderr_and_changes_nothing(tmp_path, model, capsys):
    store = _store(tmp_path, ByteTokenizer())
    quiet = evaluate(model, store.tokens, 16, 4, store.num_bytes)
    assert capsys.readouterr().err == ""  # off by default: a library call (training) draws no bar
    shown = evaluate(model, store.tokens, 16, 4, store.num_bytes, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"eval seq_len 16: +0%.* 0/\d+ .*batch/s", err)
    assert shown == quiet
    evaluate(model, store.tokens, 16, 4, store.num_bytes, progress=None)  # stderr is no terminal here
    assert capsys.readouterr().err == ""
