"""Turning texts into id arrays, in the tokenizer worker processes or in the calling process.

An :class:`Encoder` is what a worker rebuilds from what :meth:`Tokenizer.save` wrote (the byte
tokenizer's ``{"type": "byte"}``, or a ``tokenizer.json``), so only files, never pickled objects,
cross the process boundary. Custom tokenizers — anything but Andromeda's own byte and Hugging Face
classes — encode in the calling process through their ``encode`` method.

Nothing here imports torch or the rest of Andromeda: tokenizer worker processes import it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .splitting import BYTES, SplitRule, rule_for

HF_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids ``0 .. vocab_size - 1`` (halves disk for <=64K)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class Encoder(Protocol):
    rule: SplitRule  # where long texts may be cut for this tokenizer

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The ids of each text, as integer arrays (any integer dtype)."""
        ...


class ByteEncoder:
    """The byte tokenizer: ids are the UTF-8 bytes."""

    rule = BYTES

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]


class HFEncoder:
    """A Hugging Face ``tokenizer.json``, encoded without special tokens (as ``HFTokenizer.encode``).

    Uses ``encode_batch_fast`` (tokenizers >= 0.20: no character offsets, about twice the speed
    of ``encode_batch``). ``serial=True`` sends one text per call, so the library's thread pool
    runs one encode at a time; worker processes instead disable that pool through the
    ``TOKENIZERS_PARALLELISM`` environment variable they are started with, and batch.
    """

    def __init__(self, path: str | Path, serial: bool) -> None:
        from tokenizers import Tokenizer

        text = Path(path).read_text(encoding="utf-8")
        self.tokenizer = Tokenizer.from_str(text)
        self.rule = rule_for(json.loads(text))
        self.serial = serial
        self._encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self.serial:
            encodings = [e for text in texts for e in self._encode([text], add_special_tokens=False)]
        else:
            encodings = self._encode(list(texts), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.uint32) for e in encodings]


class CallableEncoder:
    """Any tokenizer's ``encode(text) -> list[int]``, one text at a time, in this process."""

    def __init__(self, encode: Callable[[str], Sequence[int]], rule: SplitRule) -> None:
        self.encode, self.rule = encode, rule

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(self.encode(text), dtype=np.int64) for text in texts]


def load_encoder(directory: str | Path, serial: bool) -> ByteEncoder | HFEncoder:
    """The encoder for a tokenizer saved in ``directory`` by ``ByteTokenizer.save`` or
    ``HFTokenizer.save``."""
    directory = Path(directory)
    if (directory / HF_TOKENIZER_FILE).is_file():
        return HFEncoder(directory / HF_TOKENIZER_FILE, serial=serial)
    config = json.loads((directory / TOKENIZER_CONFIG_FILE).read_text())
    if config.get("type") == "byte":
        return ByteEncoder()
    raise ValueError(f"{directory} holds no tokenizer a worker can load: {config}")
