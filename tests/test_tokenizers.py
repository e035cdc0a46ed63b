"""Tokenizers: exact round trips, tolerant decoding, BPE compression, and save/load identity."""

import json
import random

import pytest
import torch

from andromeda.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_bpe,
)

SAMPLE = "Fair is foul: naïve café, 日本語, emoji 🚀👩‍🔬, tabs\tand\r\nnewlines."


def _corpus(seed: int = 0, documents: int = 200) -> list[str]:
    """Repetitive English-like text, so a BPE has frequent pairs to merge."""
    rng = random.Random(seed)
    words = "the king queen shall thou thee lord love death night sword crown fair foul".split()
    return [" ".join(rng.choice(words) for _ in range(100)) + "." for _ in range(documents)]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe(_corpus(), vocab_size=300)


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(torch.tensor(ids)) == SAMPLE


def test_byte_tokenizer_specials_and_sizes():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    ids = tok.encode("ab")
    # Specials, and ids of a model vocabulary padded past 258, decode to nothing.
    assert tok.decode([tok.eos_id, *ids, tok.pad_id, 300]) == "ab"


def test_byte_decode_of_truncated_multibyte_character_does_not_raise():
    tok = ByteTokenizer()
    rocket = tok.encode("ok 🚀")  # the emoji is 4 bytes
    assert tok.decode(rocket[:-1]) == "ok \ufffd"
    assert tok.decode(rocket[:-3]) == "ok \ufffd"


def test_decode_rejects_batches_and_negative_ids():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative"):
        tok.decode([65, -1])


def test_bpe_round_trips_and_compresses(bpe):
    text = _corpus(seed=1, documents=1)[0]
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2
    # Byte-level: text never seen in training (non-ASCII, emoji) still round-trips.
    assert bpe.decode(bpe.encode(SAMPLE)) == SAMPLE
    assert bpe.vocab_size == 300
    assert bpe.eos_id != bpe.pad_id
    assert max(bpe.encode(SAMPLE)) < bpe.vocab_size


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_each_tokenizer_keeps_the_protocol_contract(bpe, kind):
    """What `Tokenizer` promises the rest of Andromeda, on behaviour: isinstance with a
    runtime_checkable Protocol only sees that the attribute names exist."""
    tok = ByteTokenizer() if kind == "byte" else bpe
    assert isinstance(tok.name, str) and tok.name
    assert 0 <= tok.eos_id < tok.vocab_size and 0 <= tok.pad_id < tok.vocab_size
    ids = tok.encode(SAMPLE)
    assert isinstance(ids, list) and all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)
    assert tok.eos_id not in ids and tok.pad_id not in ids  # no special tokens added
    # Specials decode to nothing; any ids a model can sample decode without raising.
    assert tok.decode([tok.eos_id, *ids, tok.pad_id]) == SAMPLE
    rng = random.Random(0)
    for _ in range(200):
        assert isinstance(tok.decode([rng.randrange(tok.vocab_size) for _ in range(rng.randrange(8))]), str)


def test_bpe_decode_of_truncated_multibyte_character_does_not_raise(bpe):
    ids = bpe.encode("🚀")
    assert len(ids) > 1  # never merged on this corpus, so split into byte tokens
    assert bpe.decode(torch.tensor(ids[:-1])) == "\ufffd"


def test_bpe_rejects_vocab_smaller_than_byte_alphabet():
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe(["abc"], vocab_size=100)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_save_load_round_trip_gives_identical_encodings(tmp_path, bpe, kind):
    tok = ByteTokenizer() if kind == "byte" else bpe
    save_tokenizer(tok, tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok)
    assert (loaded.name, loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (
        tok.name, tok.vocab_size, tok.eos_id, tok.pad_id,
    )
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)


def test_fingerprint_distinguishes_vocabularies(bpe):
    other = train_bpe(_corpus(seed=5), vocab_size=290)
    assert tokenizer_fingerprint(bpe) != tokenizer_fingerprint(other)
    assert tokenizer_fingerprint(bpe) != tokenizer_fingerprint(ByteTokenizer())


def test_load_tokenizer_from_folder_without_files_names_folder_and_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "tokenizer.json" in message and "tokenizer_config.json" in message


def test_load_tokenizer_rejects_unknown_config_type(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(ValueError, match="sentencepiece"):
        load_tokenizer(tmp_path)


def test_hf_tokenizer_pad_falls_back_to_eos(tmp_path):
    """A tokenizer.json with only <|endoftext|> pads with eos."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator(_corpus(documents=20), trainer=trainer)
    raw.save(str(tmp_path / "custom.json"))
    tok = build_tokenizer(str(tmp_path / "custom.json"))
    assert isinstance(tok, HFTokenizer)
    assert tok.name == "custom"
    assert tok.pad_id == tok.eos_id == 0


def test_hf_tokenizer_requires_endoftext(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models

    RawTokenizer(models.BPE()).save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        HFTokenizer.from_file(tmp_path / "bare.json")


def test_build_tokenizer_accepts_each_form(tmp_path, bpe):
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    trained = build_tokenizer("bpe", train_texts=lambda: _corpus(documents=50), vocab_size=280)
    assert isinstance(trained, HFTokenizer) and trained.vocab_size == 280
    save_tokenizer(bpe, tmp_path / "checkpoint")
    from_folder = build_tokenizer(str(tmp_path / "checkpoint"))
    from_file = build_tokenizer(tmp_path / "checkpoint" / "tokenizer.json")
    assert from_folder.encode(SAMPLE) == from_file.encode(SAMPLE) == bpe.encode(SAMPLE)
    save_tokenizer(ByteTokenizer(), tmp_path / "byte_checkpoint")
    assert isinstance(build_tokenizer(str(tmp_path / "byte_checkpoint")), ByteTokenizer)


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no train_texts"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match='"byte", "bpe"') as error:
        build_tokenizer("gpt2")
    assert "not an existing path" in str(error.value)
    with pytest.raises(ValueError, match="folder without a tokenizer"):
        build_tokenizer(str(tmp_path))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        build_tokenizer(str(tmp_path / "broken.json"))
