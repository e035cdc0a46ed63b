"""Token ids to text for a server: incremental decoding, stop strings, token display strings.

`TextStream` turns a sequence's new tokens into text pieces that are never taken back: the same
text `andromeda generate` prints (it decodes the continuation alone, holding back a character
whose bytes have not all arrived), cut right before the first stop string. Text that might be the
start of a stop string is held back until it no longer can be, so a stop string is never sent,
even when it spans several tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from functools import lru_cache

from ..tokenizers import ByteTokenizer, Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder yields for bytes that do not (yet) form a character


class TextStream:
    """Incremental detokenization of one sequence's continuation, with stop strings.

    Decodes a sliding window (vLLM's scheme): the tokens since the last clean cut, so each push
    costs a few tokens' decoding rather than the whole continuation's. Byte tokens go through
    Python's incremental UTF-8 decoder instead, which yields the same text (a character once its
    bytes are complete, U+FFFD for invalid ones) at a fraction of the cost.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self._bytes = codecs.getincrementaldecoder("utf-8")("replace") if isinstance(tokenizer, ByteTokenizer) else None
        self.ids: list[int] = []
        self._prefix = 0  # window start: the tokens before it are decoded for good
        self._read = 0  # tokens whose text has been taken
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # longest held-back tail
        self._pending = ""  # decoded, not released: might begin a stop string
        self.decoded = 0  # characters decoded so far (released, pending or cut by a stop string)
        self.stopped: str | None = None  # the stop string that ended the text

    def push(self, token: int) -> str:
        """Add one token; returns the text it releases ("" while a character or a possible stop
        string is incomplete). After a stop string, `stopped` is set and nothing more is released."""
        self.ids.append(token)
        if self._bytes is not None:  # ids past 255 (specials, unused rows) decode to nothing
            piece = self._bytes.decode(bytes((token,))) if token < 256 else ""
            return self._release(piece) if piece else ""
        window = self.tokenizer.decode(self.ids[self._prefix :])
        before = self.tokenizer.decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        if len(window) <= len(before) or window.endswith(REPLACEMENT):
            return ""  # a character is still incomplete
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(window[len(before) :])

    def flush(self) -> str:
        """Release everything held back (the sequence ended without a stop string); bytes that
        never formed a character come out as U+FFFD, as `andromeda generate` prints them."""
        if self.stopped is not None:
            return ""
        if self._bytes is not None:
            return self._release(self._bytes.decode(b"", final=True), final=True)
        window = self.tokenizer.decode(self.ids[self._prefix :])
        before = self.tokenizer.decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        self._prefix = self._read = len(self.ids)
        text = self._release(window[len(before) :], final=True)
        return text

    def _release(self, piece: str, final: bool = False) -> str:
        if self.stopped is not None:
            return ""
        self.decoded += len(piece)
        text = self._pending + piece
        if not self.stop:
            self._pending = ""
            return text
        hits = [(i, s) for s in self.stop if (i := text.find(s)) >= 0]
        if hits:
            cut, self.stopped = min(hits)
            self._pending = ""
            return text[:cut]
        keep = 0 if final else _stop_prefix_length(text, self.stop, self._hold)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]


def _stop_prefix_length(text: str, stop: Sequence[str], hold: int) -> int:
    """The length of the longest tail of `text` that begins some stop string."""
    for k in range(min(len(text), hold), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop):
            return k
    return 0


class TokenStrings:
    """How logprobs show a token: its text when it decodes to text on its own; else a name for
    the specials, `bytes:\\xNN` for a byte-level token that is part of a character (OpenAI's
    spelling), or `token_id:N` (vLLM's). Distinct ids get distinct strings, so the
    `top_logprobs` dictionaries never merge two tokens."""

    def __init__(self, tokenizer: Tokenizer, specials: dict[int, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.specials = specials or {}
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token: int) -> str:
        if token in self.specials:
            return self.specials[token]
        text = self.tokenizer.decode([token])
        if text and REPLACEMENT not in text:
            return text
        if isinstance(self.tokenizer, ByteTokenizer) and token < 256:
            return f"bytes:\\x{token:02x}"
        return f"token_id:{token}"

    def _bytes(self, token: int) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer) and token < 256:
            return [token]
        return list(self._text(token).encode("utf-8"))
