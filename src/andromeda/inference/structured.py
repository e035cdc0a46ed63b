"""Constrained (structured) output: the next token is drawn only from those a grammar allows.

What may be asked for (`OutputConstraint`): a JSON schema (OpenAI's `response_format`
json_schema, vLLM's `structured_outputs.json`), any JSON object (`json_object`), a regular
expression that the whole output must match, one of a list of strings (`choice`), or a grammar
(Lark, or llama.cpp's GBNF). The grammar engine is llguidance (https://github.com/guidance-ai/llguidance,
the `structured` extra): a Rust Earley parser over a lexer, which computes the mask of allowed
tokens for a whole vocabulary in tens to hundreds of microseconds, takes byte-level BPE vocabularies
straight from a `tokenizer.json`, and can roll back accepted tokens (speculative decoding).

JSON is compact: no whitespace between JSON tokens (llguidance's `whitespace_flexible: false`),
so even an untrained model ends a schema of bounded strings within a few hundred tokens instead
of wandering through spaces and newlines.

Per sequence, a `GrammarMatcher` follows what was generated:

    matcher = grammar_matcher(constraint, tokenizer)    # compiled once per (tokenizer, constraint)
    logits = apply_constraints(logits, [matcher, None])  # (B, V): disallowed tokens at -inf
    ... sample ...
    matcher.accept(token)                                # after each sampled token
    if matcher.is_finished(): ...                        # grammar complete: end with "stop"

Only the tokenizer's eos may follow a complete grammar; ids the tokenizer does not have (the
model's vocabulary is often padded past it) are never allowed.

A batch's masks travel packed, as llguidance writes them: `grammar_bitmask` gives (B, ceil(V / 32))
int32 words, 32 tokens a word, and `apply_bitmask` unpacks them on the logits' device
(`apply_constraints` is the two; the server's runner calls them apart, once the forward is issued).
"""

from __future__ import annotations

import functools
import json
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INSTALL_HINT = "pip install -e '.[structured]' in the andromeda checkout (PyPI's andromeda is an unrelated project)"
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# JSON with no whitespace between tokens; the schema's own "x-guidance" options cannot undo it.
COMPACT_JSON = {"whitespace_flexible": False}
GRAMMARS_PER_TOKENIZER = 64  # compiled grammars kept per tokenizer (least recently used dropped)
VALIDATED_CONSTRAINTS = 256  # constraints whose validation (without a tokenizer) is remembered
_BITS = torch.ones((), dtype=torch.int32) << torch.arange(32, dtype=torch.int32)  # 1 << j, bit 31 the sign bit

__all__ = ["GrammarMatcher", "INSTALL_HINT", "OutputConstraint", "accept_tokens", "apply_bitmask",
           "apply_constraints", "grammar_bitmask", "grammar_matcher", "unpack_bitmask", "validate_constraint"]


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must be. Build one with the class methods; `source` is text (a schema as
    JSON, the choices as a JSON list), so equal requests are equal cache keys."""

    kind: str  # one of KINDS
    source: str

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> OutputConstraint:
        """Output that parses as JSON and validates against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise ValueError(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, Mapping):
            raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))  # key order kept: properties come out in it

    @classmethod
    def json_object(cls) -> OutputConstraint:
        """Output that is any JSON object."""
        return cls("json_object", "")

    @classmethod
    def regex(cls, pattern: str) -> OutputConstraint:
        """Output that the regular expression matches as a whole (Rust `regex` syntax: no
        look-around, no back-references)."""
        if not isinstance(pattern, str):
            raise ValueError(f"a regex must be a string, got {type(pattern).__name__}")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> OutputConstraint:
        """Output that is exactly one of `options`."""
        if isinstance(options, str) or not isinstance(options, Sequence) or not options:
            raise ValueError("choice must be a non-empty list of strings")
        if not all(isinstance(option, str) for option in options):
            raise ValueError(f"choice must be a list of strings, got {list(options)!r}")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, text: str) -> OutputConstraint:
        """Output in the language of a Lark grammar (`start: ...`) or a GBNF one (`root ::= ...`)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a grammar must be a non-empty string (Lark or GBNF)")
        return cls("grammar", text)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def definition(self) -> str:
        """llguidance's grammar definition of this constraint (not yet checked)."""
        llguidance = _llguidance()
        matcher = llguidance.LLMatcher
        if self.kind == "json_schema":
            return matcher.grammar_from_json_schema(self.source, overrides=COMPACT_JSON)
        if self.kind == "json_object":
            return matcher.grammar_from_json_schema({"type": "object"}, overrides=COMPACT_JSON)
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(self.source)))
        try:
            return llguidance.grammar_from("grammar", self.source)
        except ValueError as error:
            raise ValueError(f"invalid grammar: {error}") from None


def validate_constraint(constraint: OutputConstraint) -> None:
    """Raise ValueError naming the problem if `constraint` cannot be compiled (an invalid schema,
    regex or grammar). No tokenizer needed: what a server checks when it parses a request. The
    verdicts of the last VALIDATED_CONSTRAINTS constraints are remembered."""
    problem = _problem(constraint)
    if problem:
        raise ValueError(problem)


@functools.lru_cache(maxsize=VALIDATED_CONSTRAINTS)
def _problem(constraint: OutputConstraint) -> str:
    """What is wrong with `constraint` ("" if nothing)."""
    try:
        definition = constraint.definition()
    except ValueError as error:
        return str(error)
    failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(definition)
    return _describe(constraint, messages[0]) if failed else ""


def _describe(constraint: OutputConstraint, message: str) -> str:
    what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(constraint.kind, constraint.kind)
    return f"invalid {what}: {message.strip()}"


class GrammarMatcher:
    """One sequence's place in its grammar: which tokens may come next, what it has accepted."""

    def __init__(self, matcher: Any, vocabulary: _Vocabulary) -> None:
        self._matcher = matcher  # an llguidance.LLMatcher
        self.vocabulary = vocabulary

    @property
    def eos_id(self) -> int:
        return self.vocabulary.eos_id

    def allowed(self, vocab: int) -> Tensor:
        """(vocab,) bool on the CPU: the tokens that may come next (ids past the tokenizer's never)."""
        return unpack_bitmask(self.vocabulary.bitmask([self._matcher]), vocab)[0]

    def apply(self, logits: Tensor) -> Tensor:
        """`logits` (V,) or (B, V), every row of them this sequence's, with disallowed tokens at -inf."""
        allowed = self.allowed(logits.shape[-1]).to(logits.device)
        return torch.where(allowed, logits, float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past a sampled token; ValueError if the grammar did not allow it."""
        if not self._matcher.consume_token(int(token)):
            error = self._matcher.get_error().split("\n<state>")[0]
            raise ValueError(f"token {int(token)} does not satisfy the grammar: {error}")

    def is_finished(self) -> bool:
        """Whether the grammar is complete: nothing but eos may follow, and the caller ends the
        sequence (finish reason "stop")."""
        return self._matcher.is_stopped()

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, in order, the grammar would accept from here (none are accepted):
        speculative decoding drops draft tokens past it before verifying them."""
        return self._matcher.validate_tokens([int(t) for t in tokens])

    def rollback(self, n: int) -> None:
        """Forget the last `n` accepted tokens (rejected speculative tokens)."""
        if n and not self._matcher.rollback(int(n)):
            raise ValueError(f"cannot roll back {n} tokens: {self._matcher.get_error()}")


def apply_constraints(logits: Tensor, matchers: Sequence[GrammarMatcher | None]) -> Tensor:
    """(B, V) `logits` with each row's disallowed tokens at -inf, row i following matchers[i]
    (None: no constraint). A new tensor; `logits` itself is unchanged. The masks of all rows
    are computed together (on llguidance's threads if the logits are not on the CPU)."""
    if len(matchers) != logits.shape[0]:
        raise ValueError(f"{len(matchers)} matchers for {logits.shape[0]} rows of logits")
    bitmask = grammar_bitmask(matchers, logits.shape[-1], parallel=logits.device.type != "cpu")
    return logits if bitmask is None else apply_bitmask(logits, bitmask)


def grammar_bitmask(matchers: Sequence[GrammarMatcher | None], vocab: int, parallel: bool = False) -> Tensor | None:
    """(B, ceil(vocab / 32)) int32 on the CPU: bit t % 32 of word t // 32 in row i is set where
    token t may come next under matchers[i] (every bit where matchers[i] is None, none for ids
    past the tokenizer's); None if no row has a matcher (`apply_bitmask` applies it). llguidance
    computes a row's mask without the GIL in a few microseconds (a byte or 16k-token vocabulary).
    `parallel`: the rows on llguidance's thread pool, for a model on an accelerator; on the CPU its
    threads take cores from the forward (in the server's 16-row steps on 2 cores: 150 us a step on
    the pool against 60 us one row after another, and the forward's matmuls slower)."""
    if all(m is None for m in matchers):
        return None
    words = (vocab + 31) // 32
    bitmask = None
    by_vocabulary: dict[int, list[int]] = {}
    for i, matcher in enumerate(matchers):
        if matcher is not None:
            by_vocabulary.setdefault(id(matcher.vocabulary), []).append(i)
    for group in by_vocabulary.values():
        vocabulary = matchers[group[0]].vocabulary
        filled = vocabulary.bitmask([matchers[i]._matcher for i in group], parallel)  # (R, the tokenizer's words)
        if len(group) == len(matchers) and filled.shape[1] == words:
            return filled  # every row one tokenizer's, as wide as the vocabulary: the common case
        if bitmask is None:
            bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)  # (B, W)
        rows = torch.zeros(len(group), words, dtype=torch.int32)  # no bits past the tokenizer's words
        n = min(words, filled.shape[1])
        rows[:, :n] = filled[:, :n]
        bitmask[group] = rows
    return bitmask


def unpack_bitmask(bitmask: Tensor, vocab: int) -> Tensor:
    """(B, W) int32 bitmask (`grammar_bitmask`) -> (B, vocab) bool, on the bitmask's device; ids
    past its 32 W bits are not allowed."""
    bits = _BITS.to(bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) & bits) != 0).flatten(1)  # (B, W, 32) -> (B, 32 W): token 32 w + j
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    return torch.cat([allowed, allowed.new_zeros(allowed.shape[0], vocab - allowed.shape[1])], dim=1)


def apply_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """(B, V) `logits` at -inf where the (B, W) int32 `bitmask` (`grammar_bitmask`) has the
    token's bit clear (a new tensor). The bitmask goes to the logits' device packed (32 tokens a
    word) and is unpacked there."""
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    # where, not masked_fill: several times faster on the CPU for a (16, 50k) batch
    return torch.where(allowed, logits, float("-inf"))


def accept_tokens(matchers: Sequence[GrammarMatcher | None], tokens: Tensor) -> Tensor:
    """Each row's matcher (None: no constraint) accepts its sampled token of (B,) `tokens`:
    (B,) bool, True where the grammar is now complete."""
    finished = [False] * len(matchers)
    for i, (matcher, token) in enumerate(zip(matchers, tokens.tolist())):
        if matcher is not None:
            matcher.accept(token)
            finished[i] = matcher.is_finished()
    return torch.tensor(finished, dtype=torch.bool)


def grammar_matcher(constraint: OutputConstraint, tokenizer) -> GrammarMatcher:
    """A fresh matcher for one sequence. `tokenizer` follows `andromeda.tokenizers.Tokenizer`
    (a Hugging Face one, or the byte tokenizer). The grammar is compiled once per tokenizer
    and constraint (the last GRAMMARS_PER_TOKENIZER are kept); ValueError if it cannot be."""
    vocabulary = _vocabulary(tokenizer)
    return GrammarMatcher(vocabulary.compiled(constraint).deep_copy(), vocabulary)


def grammar_is_compiled(constraint: OutputConstraint, tokenizer) -> bool:
    """Whether `grammar_matcher(constraint, tokenizer)` would find its grammar compiled already
    (then making a matcher is a copy of microseconds, not a compile of up to seconds)."""
    with _vocabularies_lock:
        vocabulary = _vocabularies.get(tokenizer)
    return vocabulary is not None and vocabulary.has(constraint)


class _Vocabulary:
    """A tokenizer as llguidance sees it, with the grammars compiled for it."""

    def __init__(self, tokenizer) -> None:
        self.eos_id = int(tokenizer.eos_id)
        self.tokenizer = _ll_tokenizer(tokenizer)
        self.words = (self.tokenizer.vocab_size + 31) // 32  # int32 words of one bitmask
        self._compiled: OrderedDict[OutputConstraint, Any] = OrderedDict()
        self._lock = threading.Lock()

    def has(self, constraint: OutputConstraint) -> bool:
        with self._lock:
            return constraint in self._compiled

    def compiled(self, constraint: OutputConstraint) -> Any:
        """A matcher at the start of `constraint`'s grammar, to deep-copy (LRU-cached)."""
        with self._lock:
            if constraint in self._compiled:
                self._compiled.move_to_end(constraint)
                return self._compiled[constraint]
        validate_constraint(constraint)
        matcher = _llguidance().LLMatcher(self.tokenizer, constraint.definition(), log_level=0)
        if matcher.is_error():
            raise ValueError(_describe(constraint, matcher.get_error()))
        with self._lock:
            self._compiled[constraint] = matcher
            while len(self._compiled) > GRAMMARS_PER_TOKENIZER:
                self._compiled.popitem(last=False)
        return matcher

    def bitmask(self, matchers: list[Any], parallel: bool = False) -> Tensor:
        """(R, words) int32: bit t set where token t may come next, one row per llguidance matcher;
        `parallel`: on llguidance's thread pool."""
        words = torch.empty(len(matchers), self.words, dtype=torch.int32)  # llguidance writes every byte
        row_bytes = self.words * 4
        if parallel and len(matchers) > 1:
            _executor().unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], words.data_ptr(),
                                                row_bytes, len(matchers))
            return words
        start = words.data_ptr()
        for i, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(start + i * row_bytes, row_bytes)
        return words


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def _vocabulary(tokenizer) -> _Vocabulary:
    """The tokenizer's `_Vocabulary`, built once (about a second for a 50k vocabulary) and kept
    while the tokenizer lives."""
    with _vocabularies_lock:
        found = _vocabularies.get(tokenizer)
        if found is None:
            found = _vocabularies[tokenizer] = _Vocabulary(tokenizer)
        return found


def _ll_tokenizer(tokenizer) -> Any:
    """An llguidance.LLTokenizer for an Andromeda tokenizer, read from what its `save` writes:
    a `tokenizer.json` (Hugging Face), or the byte tokenizer's config."""
    llguidance = _llguidance()
    with tempfile.TemporaryDirectory(prefix="andromeda-structured-") as tmp:
        tokenizer.save(tmp)
        hf_file = Path(tmp) / "tokenizer.json"
        config_file = Path(tmp) / "tokenizer_config.json"
        if hf_file.is_file():
            return llguidance.LLTokenizer(hf_file.read_text(), eos_token=int(tokenizer.eos_id))
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("type") == "byte":
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary(tokenizer)),
                                      eos_token=int(tokenizer.eos_id))
    raise ValueError(f"constrained output needs a Hugging Face tokenizer or the byte tokenizer, got {tokenizer!r}")


class _ByteVocabulary:
    """The byte tokenizer in the form llguidance.TokenizerWrapper reads: ids 0-255 are bytes,
    the ids above them special tokens."""

    bos_token_id = None

    def __init__(self, tokenizer) -> None:
        self.eos_token_id = int(tokenizer.eos_id)
        self.special_token_ids = list(range(256, tokenizer.vocab_size))
        self.tokens = [bytes([i]) for i in range(256)] + [f"<|special_{i}|>".encode() for i in self.special_token_ids]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


@functools.cache
def _executor() -> Any:
    """llguidance's thread pool that computes a batch's masks in parallel."""
    return _llguidance().LLExecutor()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError(f"constrained output (JSON schema, regex, choice, grammar) needs llguidance: "
                          f"{INSTALL_HINT}") from None
    return llguidance
