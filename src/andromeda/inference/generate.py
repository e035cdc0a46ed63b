"""Autoregressive generation: prompts in, new tokens out, with a preallocated KV cache.

Shape letters: B batch, N prompt positions (after left padding), L new tokens, V vocabulary.

The loop is gpt-fast's: `prefill` runs the whole prompt through the model once, writing every
layer's keys and values into a `KVCache` (one slot per row); `decode_one` then feeds one token
per step, reading the cache and appending to it. Only the last position is projected to logits
(the prompt's other N - 1 rows of (N, V) logits are never formed). `cache_kv=False` instead
recomputes the whole prefix every step; it is the reference the cached path must match token for
token.

Ragged prompts are left-padded to a common length N; the padding is masked out of attention and
each row's positions count from its own first real token, so every row continues exactly as if
it were generated alone.

Context policy: a prompt of N tokens plus L new ones must fit in `max_seq_len` (N + L <=
max_seq_len), else a ValueError names both numbers. There is no sliding window.

Sampling (`sampling.sample`) applies temperature, top-k, top-p, min-p in that order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

from ..model import KVCache, Transformer, check_tokens
from .sampling import SamplingParams, filter_logits, sample

Prompts = Tensor | Sequence[Tensor] | Sequence[Sequence[int]]

__all__ = ["IncrementalDecoder", "Prompts", "SamplingParams", "decode_one", "filter_logits", "generate",
           "prefill", "recompute", "sample", "stream", "stream_text"]


@dataclass(frozen=True)
class _Plan:
    """A validated generation request: left-padded prompts and the stopping rule."""

    tokens: Tensor  # (B, N) long, left-padded
    key_mask: Tensor | None  # (B, N) True for real tokens; None when no row is padded
    seq_len: int
    params: SamplingParams
    stop_ids: Tensor | None  # (E,) ids that end a row
    pad_value: int
    cache_kv: bool
    generator: torch.Generator | None


def generate(
    net: Transformer,
    prompts: Prompts,
    seq_len: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eos_token: int | Sequence[int] | None = None,
    pad_value: int | None = None,
    cache_kv: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Sample `seq_len` new tokens after each prompt and return only them: (B, seq_len) long.

    prompts: a (B, N) tensor of ids, one 1-D prompt (then B = 1), or a list of 1-D prompts of
        different lengths (tensors or lists of ints), which are left-padded and masked.
    temperature, top_k, top_p, min_p: see `SamplingParams`; temperature=0 is greedy.
    eos_token: one id or several; a row that samples one keeps it and then stops: its later
        positions hold `pad_value`, which defaults to the (first) eos id, so decoding with a
        tokenizer that drops specials reads the same text. Generation ends as soon as every row
        has stopped; the result is still (B, seq_len).
    pad_value: the id that fills a stopped row; must be in [0, num_tokens).
    cache_kv: reuse keys/values through a KV cache (default), or recompute the prefix each step.
    generator: the source of randomness; None uses the global RNG, seeded by torch.manual_seed.
    callback: called with each step's new tokens (B,) as they are produced (in inference mode).

    Runs under torch.inference_mode with the net in eval mode, restoring its mode afterwards.
    Raises ValueError if N + seq_len exceeds max_seq_len.
    """
    plan = _plan(net, prompts, seq_len, temperature=temperature, top_k=top_k, top_p=top_p,
                 min_p=min_p, eos_token=eos_token, pad_value=pad_value, cache_kv=cache_kv,
                 generator=generator)
    # Allocated outside inference mode so callers get an ordinary tensor they may edit in place.
    out = torch.full((plan.tokens.shape[0], seq_len), plan.pad_value, dtype=torch.long,
                     device=plan.tokens.device)
    with _eval_mode(net), torch.inference_mode():
        for step, tokens in enumerate(_decode(net, plan)):
            out[:, step] = tokens
            if callback is not None:
                callback(tokens)
    return out


def stream(net: Transformer, prompts: Prompts, seq_len: int, **kwargs) -> Iterator[Tensor]:
    """Like `generate` (same arguments except `callback`), but yield each step's new tokens (B,)
    as soon as they are sampled. Stops early once every row has emitted an eos token.

    Arguments are checked now, not at the first `next()`. The net stays in eval mode until the
    iterator is exhausted or closed.
    """
    if "callback" in kwargs:
        raise TypeError("stream() yields each step's tokens itself; it takes no callback")
    plan = _plan(net, prompts, seq_len, **kwargs)
    return _stream(net, plan)


def stream_text(
    net: Transformer,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    start_of_document: bool = True,
    **sampling,
) -> Iterator[str]:
    """Yield the text of a continuation of `prompt` piece by piece, as it is generated.

    `tokenizer` follows `andromeda.tokenizers.Tokenizer`; the other keywords are `generate`'s.
    Generation stops at the tokenizer's eos unless `eos_token` is given. With
    `start_of_document` (the default) the prompt is preceded by the eos id: training data
    separates documents with eos, so this tells the model the prompt opens a document (and lets
    an empty prompt mean "a new document"). The pieces join to the decoded continuation; a
    character split across tokens (UTF-8 bytes) is yielded only once complete.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = ([tokenizer.eos_id] if start_of_document else []) + tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty; pass text, or start_of_document=True")
    sampling.setdefault("eos_token", tokenizer.eos_id)
    stop = _as_ids(sampling["eos_token"], net.config.num_tokens, "eos_token")
    decoder = IncrementalDecoder(tokenizer)
    for tokens in stream(net, torch.tensor(ids), max_new_tokens, **sampling):
        token = int(tokens[0])
        if token in stop:
            break
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that never need to be taken back.

    Each push decodes the whole list (tokenizers may merge across token boundaries) and returns
    the new text, minus trailing U+FFFD: with byte-level vocabularies a multi-byte character
    arrives over several tokens, and its first bytes decode to U+FFFD until the rest arrive.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        return self._take(text)

    def flush(self) -> str:
        """The held-back rest (U+FFFD for bytes that never completed a character)."""
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, text: str) -> str:
        piece = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return piece


def prefill(net: Transformer, tokens: Tensor, positions: Tensor, key_mask: Tensor | None,
            cache: KVCache) -> Tensor:
    """Run the (B, N) prompt through the model in one pass, filling the cache: next logits (B, V)."""
    return net(tokens, positions, key_mask=key_mask, cache=cache, logits_to_keep=1, validate=False)[:, -1]


def decode_one(net: Transformer, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    """Feed one new (B, 1) token per row, appending to the cache: next logits (B, V)."""
    return net(tokens, positions, cache=cache, logits_to_keep=1, validate=False)[:, -1]


def recompute(net: Transformer, tokens: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
    """Next logits (B, V) from the whole (B, S) sequence, with no state kept between calls."""
    return net(tokens, positions, key_mask=key_mask, logits_to_keep=1, validate=False)[:, -1]


def prompt_positions(key_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """(B, N) positions of left-padded prompts: each row counts from its first real token (the
    padding before it sits at 0 and is masked out)."""
    if key_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@torch.inference_mode()
def _decode(net: Transformer, plan: _Plan) -> Iterator[Tensor]:
    """The decoding loop: yield each step's (B,) tokens; rows past their eos get `pad_value`.

    Decorating a generator with inference_mode applies it only while the generator runs, not in
    the caller's code between steps.
    """
    B, N = plan.tokens.shape
    L = plan.seq_len
    device = plan.tokens.device
    seq = torch.empty(B, N + L, dtype=torch.long, device=device)  # prompt, then new tokens
    seq[:, :N] = plan.tokens
    positions = torch.empty(B, N + L, dtype=torch.long, device=device)
    positions[:, :N] = prompt_positions(plan.key_mask, B, N, device)
    positions[:, N:] = positions[:, N - 1 : N] + torch.arange(1, L + 1, device=device)
    key_mask = None
    if plan.key_mask is not None:
        key_mask = torch.ones(B, N + L, dtype=torch.bool, device=device)
        key_mask[:, :N] = plan.key_mask
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = None
    if plan.cache_kv:
        # The last sampled token is never fed back, so N + L - 1 positions suffice.
        cache = KVCache(net.config, B, N + L - 1, dtype=_dtype(net), device=device)
        logits = prefill(net, plan.tokens, positions[:, :N], plan.key_mask, cache)
    else:
        logits = recompute(net, seq[:, :N], positions[:, :N], plan.key_mask)
    for step in range(L):
        tokens = sample(logits, plan.params, plan.generator)  # (B,)
        if plan.stop_ids is not None:
            tokens.masked_fill_(done, plan.pad_value)
            done |= torch.isin(tokens, plan.stop_ids)
        seq[:, N + step] = tokens
        yield tokens
        if step == L - 1 or (plan.stop_ids is not None and bool(done.all())):
            return
        end = N + step + 1
        if cache is not None:
            logits = decode_one(net, seq[:, end - 1 : end], positions[:, end - 1 : end], cache)
        else:
            logits = recompute(net, seq[:, :end], positions[:, :end],
                               None if key_mask is None else key_mask[:, :end])


def _stream(net: Transformer, plan: _Plan) -> Iterator[Tensor]:
    with _eval_mode(net):
        for tokens in _decode(net, plan):
            yield tokens.clone()  # an ordinary tensor, not an inference-mode one


@contextlib.contextmanager
def _eval_mode(net: Transformer) -> Iterator[None]:
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def _plan(
    net: Transformer,
    prompts: Prompts,
    seq_len: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eos_token: int | Sequence[int] | None = None,
    pad_value: int | None = None,
    cache_kv: bool = True,
    generator: torch.Generator | None = None,
) -> _Plan:
    """Check every argument and left-pad the prompts; raise TypeError/ValueError naming the fault."""
    config = net.config
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len (the number of new tokens) must be an integer >= 1, got {seq_len!r}")
    params = SamplingParams(temperature, top_k, top_p, min_p)
    device = net.token_emb.weight.device
    tokens, key_mask = _left_pad(prompts, config, device)
    if tokens.shape[1] + seq_len > config.max_seq_len:
        raise ValueError(
            f"prompt length {tokens.shape[1]} + seq_len {seq_len} = {tokens.shape[1] + seq_len} "
            f"exceeds max_seq_len={config.max_seq_len}; shorten the prompt or ask for fewer tokens"
        )
    stop_ids = None
    if eos_token is not None:
        stop = _as_ids(eos_token, config.num_tokens, "eos_token")
        stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
        pad_value = stop[0] if pad_value is None else pad_value
    pad_value = 0 if pad_value is None else pad_value
    _as_ids(pad_value, config.num_tokens, "pad_value")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}; "
                             f"create it with torch.Generator(device={str(device)!r})")
    return _Plan(tokens, key_mask, seq_len, params, stop_ids, int(pad_value), bool(cache_kv),
                 generator)


def _left_pad(prompts: Prompts, config, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(B, N) token ids and a (B, N) real-token mask (None if no row is padded) from any prompt form."""
    if isinstance(prompts, Tensor):
        if prompts.ndim == 1:
            prompts = prompts[None]
        if prompts.ndim != 2:
            raise ValueError(f"prompts must be a (batch, n) or (n,) tensor of token ids, or a list of "
                             f"1-D prompts; got a tensor of shape {tuple(prompts.shape)}")
        check_tokens(prompts, config)
        return prompts.to(device=device, dtype=torch.long), None
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a tensor of token ids or a list of 1-D prompts, got "
                        f"{type(prompts).__name__} (encode text with a tokenizer first)")
    if len(prompts) == 0:
        raise ValueError("prompts is an empty list; give at least one prompt")
    rows = []
    for i, row in enumerate(prompts):
        row = row if isinstance(row, Tensor) else torch.tensor(row)
        if row.ndim != 1:
            raise ValueError(f"prompts[{i}] must be 1-D token ids, got shape {tuple(row.shape)}")
        check_tokens(row[None], config)
        rows.append(row.to(device=device, dtype=torch.long))
    lengths = [len(row) for row in rows]
    N = max(lengths)
    tokens = torch.zeros(len(rows), N, dtype=torch.long, device=device)  # pad id 0, masked out
    key_mask = torch.zeros(len(rows), N, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        tokens[i, N - len(row) :] = row
        key_mask[i, N - len(row) :] = True
    return tokens, None if min(lengths) == N else key_mask


def _as_ids(value: int | Sequence[int] | Tensor, vocab: int, name: str) -> list[int]:
    """A list of token ids in [0, vocab) from one id, a sequence or a tensor of them."""
    if isinstance(value, Tensor):
        value = value.flatten().tolist()
    ids = [value] if not isinstance(value, Sequence) else list(value)
    if not ids or any(isinstance(i, bool) or not isinstance(i, Integral) for i in ids):
        raise TypeError(f"{name} must be a token id or a non-empty list of them, got {value!r}")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{name} {bad[0]} is out of range [0, {vocab})")
    return [int(i) for i in ids]


def _dtype(net: Transformer) -> torch.dtype:
    """The dtype activations (and so cached keys/values) have: that of the weights."""
    return net.token_emb.weight.dtype
