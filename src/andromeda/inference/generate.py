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

Context policy. A prompt of N tokens plus L new ones that fits in `max_seq_len` is generated
with every token in view. Past it, a model with learned absolute positions stops with a
ValueError naming both numbers; any other model slides: the KV cache becomes a ring buffer of the
last `window` tokens (default max_seq_len, the length the model was trained for), of which the
first `sink_tokens` stay for good (StreamingLLM's attention sinks, Xiao et al. 2023,
https://arxiv.org/abs/2309.17453). Positions keep counting, so ALiBi and xPos see the true
distances, and memory stays flat however long the generation. A `window` may also be asked for
explicitly. Within the window this is exactly normal generation. Past it, each cached key keeps
the context it was computed with (so the model reads further than the window in deeper
layers, as in StreamingLLM); `cache_kv=False` instead recomputes the window alone every step,
which equals the cached stream only for one-layer models.

Compiled decoding (`compile=True`): each decode step runs as one graph that torch.compile builds
once (mode "reduce-overhead": a CUDA graph on a GPU, as gpt-fast does), fed the step's cache
bookkeeping from outside (`KVCache.append(..., read_all=True)`): it reads the whole preallocated
cache, unwritten columns masked, so its shapes never change (capacity rounded up to
COMPILED_CAPACITY_MULTIPLE: similar lengths share a graph); the prefill stays eager. int8/int4
layers compile as `native`'s kernel ops, where the step saves most of eager's Python on a CPU.
On a CPU the graph's wrapper is C++ too (Inductor's `cpp_wrapper`, built apart from the kernels
at -O1, `CPU_STEP_OPTIONS`: a cold build of the 2.5 B int4 default about as long as with the
Python wrapper), which calls the ops and kernels with no Python between them: 5-7% faster steps.
Tokens equal eager decoding's. The first call compiles (tens of seconds).

Sampling (`sampling.sample`) applies temperature, top-k, top-p, min-p in that order. Penalties
(frequency, presence, repetition) come before it, from each row's `TokenCounts`, which exist only
when a penalty is set: without one the decoding loop does no extra work. Then `logit_bias`, then
a `constraint`'s grammar mask (`structured`: one matcher per row; a row whose grammar is complete
stops as at an eos).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

from ..choices import KV_CACHE_DTYPES
from ..model import KVCache, Transformer, check_tokens
from ..model.cache import check_window
from .kv_attention import decode_attention_for
from .native import decode_sdpa_for
from .packed import check_compilable
from .sampling import SamplingParams, TokenCounts, apply_logit_bias, filter_logits, penalize, sample
from .structured import GrammarMatcher, OutputConstraint, accept_tokens, apply_constraints, grammar_matcher

logger = logging.getLogger(__name__)

Prompts = Tensor | Sequence[Tensor] | Sequence[Sequence[int]]

__all__ = ["IncrementalDecoder", "Prompts", "SamplingParams", "compiled_decode_one", "decode_one", "filter_logits", "generate",
           "generation_cache", "prefill", "recompute", "sample", "stream", "stream_text"]


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
    window: int | None  # attention window (sinks included) with a ring-buffer cache; None: all tokens
    sink_tokens: int
    compile: bool  # decode steps as one compiled graph of fixed shapes
    constraint: tuple[OutputConstraint, object] | None  # with the tokenizer its grammar reads
    kv_dtype: str  # what the KV cache stores: "auto" (the compute dtype) or "int8"

    def matchers(self) -> list[GrammarMatcher] | None:
        """A fresh grammar matcher per row; None without a constraint."""
        return None if self.constraint is None else [grammar_matcher(*self.constraint) for _ in self.tokens]

    def token_counts(self, vocab: int) -> TokenCounts | None:
        """The penalties' per-row counts, seeded with the prompts; None when no penalty is set."""
        return TokenCounts(self.tokens, vocab, self.key_mask) if self.params.penalized else None


def generate(
    net: Transformer,
    prompts: Prompts,
    seq_len: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token: int | Sequence[int] | None = None,
    pad_value: int | None = None,
    cache_kv: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[Tensor], None] | None = None,
    window: int | None = None,
    sink_tokens: int = 0,
    compile: bool = False,
    logit_bias: Mapping[int, float] | None = None,
    constraint: OutputConstraint | None = None,
    tokenizer=None,
    kv_cache_dtype: str = "auto",
) -> Tensor:
    """Sample `seq_len` new tokens after each prompt and return only them: (B, seq_len) long.

    prompts: a (B, N) tensor of ids, one 1-D prompt (then B = 1), or a list of 1-D prompts of
        different lengths (tensors or lists of ints), which are left-padded and masked.
    temperature, top_k, top_p, min_p: see `SamplingParams`; a temperature below 1e-5 (0 included)
        is greedy, as in vLLM.
    frequency_penalty, presence_penalty: OpenAI's, in [-2, 2], over each row's generated tokens;
        repetition_penalty: CTRL's (> 0, 1 = none), over its prompt and generated tokens. See
        `SamplingParams`; they apply before temperature and the filters (greedy included).
    eos_token: one id or several; a row that samples one keeps it and then stops: its later
        positions hold `pad_value`, which defaults to the (first) eos id, so decoding with a
        tokenizer that drops specials reads the same text. Generation ends as soon as every row
        has stopped; the result is still (B, seq_len).
    pad_value: the id that fills a stopped row; must be in [0, num_tokens).
    cache_kv: reuse keys/values through a KV cache (default), or recompute the prefix each step.
    generator: the source of randomness; None uses the global RNG, seeded by torch.manual_seed.
    callback: called with each step's new tokens (B,) as they are produced (in inference mode).
    window: attend to the last `window` tokens only (sinks included), with a ring-buffer KV
        cache; default None: all of them while N + seq_len fits in max_seq_len, else a window of
        max_seq_len (see the module docstring).
    sink_tokens: of the window, how many first tokens of each sequence stay in view for good
        (ignored while no window is needed).
    compile: run each decode step as one torch.compile'd graph of fixed shapes (CUDA graphs on
        a GPU; see the module docstring). Same tokens; the first call pays the compilation.
    logit_bias: OpenAI's {token id: bias in [-100, 100]}, added to the logits (see SamplingParams).
    constraint: every row's output follows it (an `OutputConstraint`: JSON schema, regex,
        choice, grammar); a row whose grammar is complete stops as at an eos. Needs `tokenizer`
        (the one the prompts were encoded with); eos_token then defaults to its eos.
    kv_cache_dtype: "auto" (keys and values in the weights' dtype) or "int8" (a scale per token
        and head: half the memory of bf16; see `model.cache`).

    Runs under torch.inference_mode with the net in eval mode, restoring its mode afterwards.
    Raises ValueError if N + seq_len exceeds max_seq_len for a model with learned absolute
    positions, or if the window is not at least sink_tokens + 1.
    """
    plan = _plan(net, prompts, seq_len, temperature=temperature, top_k=top_k, top_p=top_p,
                 min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                 repetition_penalty=repetition_penalty, eos_token=eos_token, pad_value=pad_value,
                 cache_kv=cache_kv, generator=generator, window=window, sink_tokens=sink_tokens,
                 compile=compile, logit_bias=logit_bias, constraint=constraint, tokenizer=tokenizer,
                 kv_cache_dtype=kv_cache_dtype)
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
    decoder=None,
    **sampling,
) -> Iterator[str]:
    """Yield the text of a continuation of `prompt` piece by piece, as it is generated.

    `tokenizer` follows `andromeda.tokenizers.Tokenizer`; the other keywords are `generate`'s.
    `decoder` turns tokens into text: an object with `push(token) -> str` and `flush() -> str`,
    by default an `IncrementalDecoder(tokenizer)`. One with a `stopped` attribute ends the
    generation as soon as it is set: the server's `TextStream`, which cuts the text right before
    a stop string.
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
    if sampling.get("constraint") is not None:
        sampling.setdefault("tokenizer", tokenizer)
    stop = _as_ids(sampling["eos_token"], net.config.num_tokens, "eos_token")
    decoder = IncrementalDecoder(tokenizer) if decoder is None else decoder
    for tokens in stream(net, torch.tensor(ids), max_new_tokens, **sampling):
        token = int(tokens[0])
        if token in stop:
            break
        piece = decoder.push(token)
        if piece:
            yield piece
        if getattr(decoder, "stopped", None) is not None:
            return
    tail = decoder.flush()
    if tail:
        yield tail


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that never need to be taken back.

    Each push decodes the ids since a recent cut (tokenizers may merge across token boundaries)
    and returns the new text, minus trailing U+FFFD: with byte-level vocabularies a multi-byte
    character arrives over several tokens, and its first bytes decode to U+FFFD until the rest
    arrive. Whenever everything decoded is complete, the ids before the last CONTEXT are
    dropped, so a push costs the same after a million tokens as after ten.
    """

    CONTEXT = 8  # ids kept before the undecided tail, for tokenizers whose decoding looks back

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # since the cut
        self.emitted = 0  # characters of decode(ids) already returned

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        complete = text.rstrip("\ufffd")
        piece = self._take(complete)
        if len(complete) == len(text) and len(self.ids) > 2 * self.CONTEXT:
            self.ids = self.ids[-self.CONTEXT :]
            self.emitted = len(self.tokenizer.decode(self.ids))
        return piece

    def flush(self) -> str:
        """The held-back rest (U+FFFD for bytes that never completed a character)."""
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, text: str) -> str:
        piece = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return piece


def prefill(net: Transformer, tokens: Tensor, positions: Tensor, key_mask: Tensor | None,
            cache: KVCache) -> Tensor:
    """Run the (B, N) prompt through the model, filling the cache: next logits (B, V). One pass,
    or passes of `cache.max_new_positions` tokens when the prompt is longer (a ring buffer takes
    only what fits beside its window; one xPos center covers 24k positions)."""
    chunk = cache.max_new_positions
    for start in range(0, tokens.shape[1], chunk):
        part = slice(start, start + chunk)
        mask = None if key_mask is None else key_mask[:, part]
        logits = net(tokens[:, part], positions[:, part], key_mask=mask, cache=cache, logits_to_keep=1,
                     validate=False)[:, -1]
    return logits


def decode_one(net: Transformer, tokens: Tensor, positions: Tensor | None, cache: KVCache) -> Tensor:
    """Append one new (B, 1) token per row (`positions` None: each slot's next): next logits (B, V)."""
    return net(tokens, positions, cache=cache, logits_to_keep=1, validate=False)[:, -1]


def compiled_decode_one(net: Transformer, tokens: Tensor, cache: KVCache) -> Tensor:
    """`decode_one` at each slot's next position, as one compiled graph: the cache's bookkeeping
    runs here, outside the graph, and every step has the same shapes (`read_all`)."""
    step = cache.append(None, None, None, tokens.shape[1], read_all=True)
    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
    return _compiled_step()(net, tokens, step)


def _forward_step(net: Transformer, tokens: Tensor, step) -> Tensor:
    return net(tokens, cache=step, logits_to_keep=1, validate=False)[:, -1]


# Inductor's options for the compiled step on a CPU: a C++ wrapper (no Python between the graph's
# calls), compiled apart from the kernels and at -O1: built with the kernels it takes their -O3
# and 2.5x the build time; at -O0 (its default) the 2.5 B int4 step was 1.3% slower (0.6 ms of its
# calls' bookkeeping) for a cold build ~6 s shorter.
CPU_STEP_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True,
                    "aot_inductor.compile_wrapper_opt_level": "O1"}


@functools.cache
def _compiled_step() -> Callable:
    """The compiled step, made once: torch.compile keeps its graphs per model and shape. On a
    GPU, mode "reduce-overhead" (CUDA graphs); on a CPU, CPU_STEP_OPTIONS."""
    on_cpu = torch.compile(_forward_step, fullgraph=True, dynamic=False, options=CPU_STEP_OPTIONS)
    elsewhere = torch.compile(_forward_step, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def step(net: Transformer, tokens: Tensor, cache_step) -> Tensor:
        return (on_cpu if tokens.device.type == "cpu" else elsewhere)(net, tokens, cache_step)

    return step


def recompute(net: Transformer, tokens: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
    """Next logits (B, V) from the whole (B, S) sequence, with no state kept between calls."""
    return net(tokens, positions, key_mask=key_mask, logits_to_keep=1, validate=False)[:, -1]


def prompt_positions(key_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """(B, N) positions of left-padded prompts: each row counts from its first real token (the
    padding before it sits at 0 and is masked out)."""
    if key_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)


# Compiled decoding rounds a cache's capacity up to a multiple of this, so that generations of
# similar lengths reuse one graph (each distinct shape compiles anew).
COMPILED_CAPACITY_MULTIPLE = 256

# Prompt tokens per prefill pass of a sliding-window generation: the ring buffer holds this many
# entries beside the window, so that the first token of a pass still sees its whole window.
WINDOW_PREFILL_CHUNK = 512


def generation_cache(net: Transformer, batch: int, prompt_len: int, new: int, window: int | None,
                     sink_tokens: int = 0, *, compiled: bool = False, kv_dtype: str = "auto") -> KVCache:
    """The KV cache `generate` uses: N + L - 1 positions per row (the last sampled token is
    never fed back), or with a window, a ring buffer of the window plus room for one prefill pass.
    `compiled`: sized for the compiled decode step (capacity rounded up), with its tensors'
    addresses marked static so a CUDA graph may write them in place."""
    dtype, device = _dtype(net), net.token_emb.weight.device
    if window is None:
        capacity = prompt_len + new - 1
        if compiled:
            capacity = -(-capacity // COMPILED_CAPACITY_MULTIPLE) * COMPILED_CAPACITY_MULTIPLE
        cache = KVCache(net.config, batch, capacity, dtype=dtype, device=device, kv_dtype=kv_dtype)
    else:
        chunk = min(prompt_len, WINDOW_PREFILL_CHUNK)
        cache = KVCache(net.config, batch, window + chunk - 1, dtype=dtype, device=device, window=window,
                        sink_tokens=sink_tokens, kv_dtype=kv_dtype)
    if compiled:
        for tensor in cache.storage:
            torch._dynamo.mark_static_address(tensor)
    else:  # an int8 cache on the CPU: decode steps read it with the kernel where it runs
        cache.decode_attention = decode_attention_for(cache)
    cache.decode_sdpa = decode_sdpa_for(cache)  # on the CPU: decode steps attend with the fused kernel
    return cache


@torch.inference_mode()
def _decode(net: Transformer, plan: _Plan) -> Iterator[Tensor]:
    """The decoding loop: yield each step's (B,) tokens; rows past their eos get `pad_value`.

    The cached loop holds nothing that grows with the number of new tokens. Decorating a
    generator with inference_mode applies it only while the generator runs, not in the
    caller's code between steps.
    """
    if not plan.cache_kv:
        yield from _decode_recomputing(net, plan)
        return
    B, N = plan.tokens.shape
    device = plan.tokens.device
    positions = prompt_positions(plan.key_mask, B, N, device)
    cache = generation_cache(net, B, N, plan.seq_len, plan.window, plan.sink_tokens, compiled=plan.compile,
                             kv_dtype=plan.kv_dtype)
    logits = prefill(net, plan.tokens, positions, plan.key_mask, cache)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    counts, matchers = plan.token_counts(net.config.num_tokens), plan.matchers()
    for step in range(plan.seq_len):
        tokens = _next_tokens(logits, plan, done, counts, matchers)
        yield tokens
        if step == plan.seq_len - 1 or (plan.stop_ids is not None and bool(done.all())):
            return
        if plan.compile:
            logits = compiled_decode_one(net, tokens[:, None], cache)
        else:
            logits = decode_one(net, tokens[:, None], None, cache)


def _decode_recomputing(net: Transformer, plan: _Plan) -> Iterator[Tensor]:
    """The reference loop: every step runs the model over the whole sequence so far, or with a
    window over its sinks and last window - sinks tokens, at their true positions."""
    B, N = plan.tokens.shape
    L = plan.seq_len
    device = plan.tokens.device
    seq = torch.empty(B, N + L, dtype=torch.long, device=device)  # prompt, then new tokens
    seq[:, :N] = plan.tokens
    positions = torch.empty(B, N + L, dtype=torch.long, device=device)
    positions[:, :N] = prompt_positions(plan.key_mask, B, N, device)
    positions[:, N:] = positions[:, N - 1 : N] + torch.arange(1, L + 1, device=device)
    key_mask = torch.ones(B, N + L, dtype=torch.bool, device=device)
    if plan.key_mask is not None:
        key_mask[:, :N] = plan.key_mask
    done = torch.zeros(B, dtype=torch.bool, device=device)
    counts, matchers = plan.token_counts(net.config.num_tokens), plan.matchers()
    end = N
    for step in range(L):
        logits = recompute(net, *_in_view(seq[:, :end], positions[:, :end], key_mask[:, :end], plan))
        tokens = _next_tokens(logits, plan, done, counts, matchers)
        seq[:, end] = tokens
        yield tokens
        if plan.stop_ids is not None and bool(done.all()):
            return
        end += 1


def _in_view(tokens: Tensor, positions: Tensor, key_mask: Tensor, plan: _Plan) -> tuple[Tensor, Tensor, Tensor | None]:
    """The tokens a recomputing step reads, left-padded: all of them, or the sinks and the last
    window - sinks real tokens of each row."""
    if plan.window is not None:
        last = positions[:, -1:]  # (B, 1) the newest position of each row
        sinks = plan.sink_tokens
        key_mask = key_mask & ((positions < sinks) | (positions > last - (plan.window - sinks)))
        # Keep the selected columns in order, left-padded: a stable sort puts False first.
        keep = int(key_mask.sum(dim=1).max())
        order = torch.sort(key_mask.int(), dim=1, stable=True).indices[:, -keep:]  # (B, keep)
        tokens, positions, key_mask = (t.gather(1, order) for t in (tokens, positions, key_mask))
    return tokens, positions, None if bool(key_mask.all()) else key_mask


def _next_tokens(logits: Tensor, plan: _Plan, done: Tensor, counts: TokenCounts | None,
                 matchers: list[GrammarMatcher] | None = None) -> Tensor:
    """Sample each row's next token (B,), after the penalties when `counts` are kept (which are
    then updated), the logit bias and the grammar of each row still going; rows that have
    stopped get `pad_value`, and `done` is updated in place."""
    if counts is not None:
        logits = penalize(logits, counts, plan.params)
    logits = apply_logit_bias(logits, plan.params)
    live = None if matchers is None else [None if d else m for m, d in zip(matchers, done.tolist())]
    if live is not None:
        logits = apply_constraints(logits, live)
    tokens = sample(logits, plan.params, plan.generator)  # (B,)
    if counts is not None:
        counts.add(tokens)
    if plan.stop_ids is not None:
        tokens.masked_fill_(done, plan.pad_value)
        done |= torch.isin(tokens, plan.stop_ids)
    if live is not None:
        done |= accept_tokens(live, tokens).to(done.device)
    return tokens


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
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token: int | Sequence[int] | None = None,
    pad_value: int | None = None,
    cache_kv: bool = True,
    generator: torch.Generator | None = None,
    window: int | None = None,
    sink_tokens: int = 0,
    compile: bool = False,
    logit_bias: Mapping[int, float] | None = None,
    constraint: OutputConstraint | None = None,
    tokenizer=None,
    kv_cache_dtype: str = "auto",
) -> _Plan:
    """Check every argument and left-pad the prompts; raise TypeError/ValueError naming the fault."""
    config = net.config
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len (the number of new tokens) must be an integer >= 1, got {seq_len!r}")
    params = SamplingParams(temperature, top_k, top_p, min_p, frequency_penalty, presence_penalty, repetition_penalty,
                            logit_bias)
    params.check_vocab(config.num_tokens)
    if constraint is not None:
        if not isinstance(constraint, OutputConstraint):
            raise TypeError(f"constraint must be an OutputConstraint (e.g. OutputConstraint.json_schema(schema)), "
                            f"got {type(constraint).__name__}")
        if tokenizer is None:
            raise ValueError("a constraint needs the tokenizer its grammar is read with: pass tokenizer=")
        grammar_matcher(constraint, tokenizer)  # compiles it now: an invalid grammar fails here
        eos_token = tokenizer.eos_id if eos_token is None else eos_token
    if compile and not cache_kv:
        raise ValueError("compile=True compiles the KV-cached decode step; it needs cache_kv=True")
    device = net.token_emb.weight.device
    tokens, key_mask = _left_pad(prompts, config, device)
    if compile:
        check_compilable(net, rows=tokens.shape[0])
    window = _window(config, tokens.shape[1], seq_len, window, sink_tokens)
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
                 generator, window, sink_tokens, bool(compile), None if constraint is None else (constraint, tokenizer),
                 _kv_dtype(kv_cache_dtype))


def _kv_dtype(name: str) -> str:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return name


def _window(config, prompt_len: int, seq_len: int, window: int | None, sink_tokens: int) -> int | None:
    """The attention window of a request (None: every token in view); see the module docstring."""
    total = prompt_len + seq_len
    if config.use_abs_pos_emb and total > config.max_seq_len:
        raise ValueError(
            f"prompt length {prompt_len} + seq_len {seq_len} = {total} exceeds max_seq_len={config.max_seq_len}, "
            f"where this model's learned absolute positions end; shorten the prompt or ask for fewer tokens"
        )
    check_window(window, sink_tokens if window is not None else 0)
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an integer >= 0, got {sink_tokens!r}")
    if window is None and total > config.max_seq_len:
        window = config.max_seq_len
        check_window(window, sink_tokens)
        logger.info("generating past max_seq_len=%d: sliding window of %d tokens (%d sinks)", config.max_seq_len,
                    window, sink_tokens)
    return window


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
