r"""Where a long text may be cut so that encoding the pieces gives the ids of encoding it whole.

A ``.txt`` file is one document, yet a 2 GB file cannot be decoded and encoded in one piece. It is
cut into pieces that are encoded separately and concatenated; the cut points are chosen so that
the concatenated ids equal those of a single encode of the whole text.

The rule, :data:`LINE`: cut at a position ``p`` where ``text[p - 1]`` is not whitespace and
``text[p]`` is — preferably the start of a whitespace run holding a line break, so a piece ends
just before its ``"\n"`` or ``"\r\n"`` (and any trailing spaces); failing that, before any
whitespace. Why this is exact:

- byte tokenizer: ids are the UTF-8 bytes, so any cut between characters is exact
  (:data:`BYTES` is :data:`LINE` plus "anywhere" for a text without whitespace).
- byte-level BPE (GPT-2's ``ByteLevel`` pre-tokenizer): the text is first split by the regex
  ``'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`` scanned
  left to right, and BPE merges never cross those pre-tokens. Every alternative that can match
  the non-whitespace ``text[p - 1]`` consists of non-whitespace characters (only an optional
  *leading* space), so the pre-token holding ``text[p - 1]`` ends exactly at ``p`` whether
  ``text[p]`` is whitespace or the end of the piece; no earlier pre-token looks further than
  ``text[p - 1]``; and the scan of the rest starts fresh at ``p`` in both cases. The
  pre-tokens, hence the ids, are identical. (Cutting *after* a newline is not exact: in
  ``"a  \nb"`` the whole text gives ``"  "`` + ``"\n"``, but ``"a  \n"`` alone gives
  ``"  \n"``; likewise ``"\r\n"``. tests/test_data_tokenize.py checks both claims.)

:func:`rule_for` grants the exact rule only to tokenizer.json files where the proof holds: a
``ByteLevel`` pre-tokenizer with the regex on and no prefix space; no normalizer, or NFC / NFD /
Lowercase (which never turn a non-space into a space nor compose across a space); and added
tokens that are all whitespace or all non-whitespace, none of the latter stripping the whitespace
to its right (see :func:`_byte_level_bpe`). GPT-2's, GPT-NeoX-20B's (NFC, and added tokens of
2-24 spaces) and :func:`train_bpe`'s tokenizers qualify. Any other tokenizer gets :data:`PARAGRAPH`: the same
kind of cut, preferably before a blank line — where tokenizers split anyway, though not
provably so (a SentencePiece ``Metaspace`` that prefixes "▁" to every input would differ at
each cut). Only texts longer than a piece (a quarter of a million characters) are cut, so
shorter documents are always encoded whole; a text without any whitespace is never cut.

Nothing here imports torch or the rest of Andromeda: tokenizer worker processes import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BYTES", "LINE", "PARAGRAPH", "SplitRule", "first_cut", "rule_for", "split_text"]


@dataclass(frozen=True)
class SplitRule:
    """Where texts may be cut: before the whitespace run holding a match of the first of
    ``preferred`` that matches nearby, failing that before any whitespace run. ``exact``: pieces
    provably encode to the whole text's ids (for the tokenizers :func:`rule_for` grants it to)."""

    name: str
    preferred: tuple[re.Pattern, ...]
    exact: bool
    anywhere: bool = False  # any character boundary is a cut (the byte tokenizer)


_LINE_BREAK = re.compile(r"\n")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
BYTES = SplitRule("bytes", (_LINE_BREAK,), exact=True, anywhere=True)
LINE = SplitRule("line", (_LINE_BREAK,), exact=True)
PARAGRAPH = SplitRule("paragraph", (_BLANK_LINE, _LINE_BREAK), exact=False)

_WHITESPACE_RUN = re.compile(r"\s+")
# Normalizers that map no non-space character to a space and compose nothing across a space.
_SAFE_NORMALIZERS = {"NFC", "NFD", "Lowercase"}


def _run_start(text: str, index: int, floor: int) -> int:
    """The start of the whitespace run around ``text[index]``, or -1 when that start is at or
    before ``floor`` (then the character before it is unknown or absent)."""
    p = index
    while p > floor and text[p - 1].isspace():
        p -= 1
    return p if p > floor else -1


def first_cut(text: str, rule: SplitRule, lo: int, floor: int = 0, window: int = 1 << 16) -> int:
    """The first cut near ``lo``: the start of the first whitespace run holding a match of
    ``rule.preferred`` in ``text[lo : lo + window]``, else of the first whitespace run at
    or after ``lo`` (else ``lo`` itself if ``rule.anywhere``), provided the character before
    it, ``text[p - 1]``, is visible (``p > floor``) and not whitespace. A run may start before
    ``lo``. Returns -1 if there is none.

    ``str.isspace`` is a superset of the regex engine's ``\\s`` (Unicode White_Space), so a
    character it calls non-space is non-space for the pre-tokenizer too: the test is safe.
    """
    lo = max(lo, floor + 1)
    searches = [(pattern, lo + window) for pattern in rule.preferred]
    searches.append((_WHITESPACE_RUN, len(text)))
    for pattern, end in searches:
        for match in pattern.finditer(text, lo, end):
            p = _run_start(text, match.start(), floor)
            if p > 0:
                return p
    if rule.anywhere and lo < len(text):
        return lo
    return -1


def split_text(text: str, rule: SplitRule, piece_chars: int) -> list[str]:
    """``text`` cut by ``rule`` into pieces of at least ``piece_chars`` characters, cut at the
    first preferred point in the next quarter piece, else at the first whitespace (a piece is
    longer only where there is none). ``"".join`` of the result is ``text``."""
    pieces, start = [], 0
    window = max(piece_chars // 4, 1)
    while len(text) - start > piece_chars:
        p = first_cut(text, rule, start + piece_chars, floor=start, window=window)
        if p < 0:
            break
        pieces.append(text[start:p])
        start = p
    pieces.append(text[start:])
    return pieces


class PieceCutter:
    """:func:`split_text` for a stream: ``feed`` text as it is decoded, get the pieces that are
    complete; ``finish`` returns the rest. Used for ``.txt`` files read block by block."""

    def __init__(self, rule: SplitRule, piece_chars: int) -> None:
        self.rule, self.piece_chars = rule, piece_chars
        self.buffer = ""

    def feed(self, text: str) -> list[str]:
        self.buffer += text
        if len(self.buffer) <= self.piece_chars:
            return []
        pieces = split_text(self.buffer, self.rule, self.piece_chars)
        self.buffer = pieces.pop()  # the tail may continue in the next block
        return pieces

    def finish(self) -> list[str]:
        rest, self.buffer = self.buffer, ""
        return [rest] if rest else []


def rule_for(tokenizer_json: dict | None) -> SplitRule:
    """The split rule for a tokenizer: ``None`` means the byte tokenizer (:data:`BYTES`);
    otherwise the parsed ``tokenizer.json``, which gets :data:`LINE` only when the exactness
    argument of this module's docstring applies to it, else :data:`PARAGRAPH`."""
    if tokenizer_json is None:
        return BYTES
    return LINE if _byte_level_bpe(tokenizer_json) else PARAGRAPH


def _byte_level_bpe(config: dict) -> bool:
    normalizer = config.get("normalizer")
    normalizers = [] if normalizer is None else _flatten(normalizer, "normalizers")
    if any(n.get("type") not in _SAFE_NORMALIZERS for n in normalizers):
        return False
    pre_tokenizer = config.get("pre_tokenizer")
    steps = [] if pre_tokenizer is None else _flatten(pre_tokenizer, "pretokenizers")
    if len(steps) != 1:
        return False
    step = steps[0]
    if step.get("type") != "ByteLevel" or step.get("add_prefix_space", True) \
            or not step.get("use_regex", True):
        return False
    for token in config.get("added_tokens") or []:
        # Added tokens are matched before pre-tokenizing. One of only whitespace, or only
        # non-whitespace, cannot straddle a cut; but one that strips the whitespace after it
        # would reach across, and a whitespace token that must stand alone as a word would
        # match at the start of a piece but not after the non-space before the cut.
        spaces = [ch.isspace() for ch in token.get("content", "")]
        if any(spaces) and not all(spaces):
            return False
        if (token.get("rstrip") and not all(spaces)) or (token.get("single_word") and any(spaces)):
            return False
    return True


def _flatten(component: dict, key: str) -> list[dict]:
    """A normalizer or pre-tokenizer as a flat list of its steps (``Sequence`` unrolled)."""
    if component.get("type") == "Sequence":
        return [step for inner in component.get(key, []) for step in _flatten(inner, key)]
    return [component]
