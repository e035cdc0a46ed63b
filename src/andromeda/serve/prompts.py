"""From a validated request body to what the engine runs: prompts rendered and tokenized, checked
against the context, sampling parameters, stop ids, seeds.

Size. The body is capped by the app (`default_max_body_bytes`, 413 beyond it). A text prompt with
more characters than the context could hold at MAX_CHARS_PER_TOKEN characters a token is refused
before it is tokenized; a long text is rendered and tokenized on a worker thread, so the event
loop keeps answering (/health, streams) meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..inference.sampling import SamplingParams
from . import protocol
from .chat_template import ChatTemplateError
from .protocol import APIError

if TYPE_CHECKING:
    from .app import ServerContext, _Choice

# No tokenizer comes near this many characters per token over a whole prompt (byte-level BPEs
# average 3-5; their longest tokens are runs of a few dozen spaces or dashes).
MAX_CHARS_PER_TOKEN = 128
# A body may hold a context's worth of prompt this many times over (JSON escapes take up to 12
# bytes a character, a list of prompts several contexts), and at least the floor.
BODY_BYTES_PER_TOKEN = 256
MIN_BODY_BYTES = 4 << 20
# Texts longer than this are rendered and tokenized on a worker thread; shorter ones take
# microseconds, less than the trip to a thread.
INLINE_CHARS = 16_384

T = TypeVar("T")


def default_max_body_bytes(max_seq_len: int) -> int:
    """The request body limit when --max-body-bytes is not given: 4 MiB, more for long contexts."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_seq_len)


def check_model(ctx: ServerContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise APIError(f"the model '{model}' does not exist; this server serves '{ctx.model_name}'",
                       param="model", code="model_not_found")


async def off_loop_if_long(chars: int, work: Callable[[], T]) -> T:
    """`work()` here when `chars` is small, else on a worker thread."""
    return work() if chars <= INLINE_CHARS else await asyncio.to_thread(work)


async def encode(ctx: ServerContext, text: str, param: str, *, must_fit: bool = True) -> list[int]:
    """The text's token ids; `must_fit`: refuse at once a text far too long for the context."""
    context = ctx.config.max_seq_len
    if must_fit and len(text) > context * MAX_CHARS_PER_TOKEN:
        raise APIError(f"the prompt has {len(text)} characters, more than fit in the model's context of {context} "
                       f"tokens (at most {MAX_CHARS_PER_TOKEN} characters a token)", param=param,
                       code="context_length_exceeded")
    return await off_loop_if_long(len(text), lambda: _encode(ctx, text, param))


def _encode(ctx: ServerContext, text: str, param: str) -> list[int]:
    try:
        return ctx.tokenizer.encode(text)
    except (UnicodeError, ValueError, TypeError) as error:  # e.g. a lone surrogate (\ud800)
        raise APIError(f"invalid '{param}': the text cannot be tokenized ({type(error).__name__}: {error})",
                       param=param, code="invalid_value") from None


async def render_chat(ctx: ServerContext, messages: list[dict[str, Any]], add_generation_prompt: bool,
                      kwargs: dict[str, Any] | None) -> str:
    if ctx.chat_template is None:
        raise APIError("this model has no chat template, so /v1/chat/completions cannot render messages; "
                       "start the server with --chat-template FILE, or store one in the checkpoint with "
                       "`andromeda train --chat-template FILE` (kept as chat_template.jinja, listed in its manifest)",
                       param="messages", code="chat_template_missing")
    template = ctx.chat_template

    def render() -> str:
        try:
            return template.render(messages, add_generation_prompt=add_generation_prompt, **(kwargs or {}))
        except ChatTemplateError as error:
            raise APIError(str(error), param="messages", code="invalid_value") from None

    return await off_loop_if_long(sum(len(m["content"]) for m in messages), render)


def check_ids(ctx: ServerContext, ids: list[int], param: str) -> None:
    vocab = ctx.config.num_tokens
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(f"invalid '{param}': token id {bad} is outside the vocabulary [0, {vocab})",
                       param=param, code="invalid_value")


def budget(ctx: ServerContext, n_prompt: int, max_tokens: int | None, param: str) -> int:
    """New tokens a prompt of `n_prompt` tokens may get: max_tokens clamped to the context left
    (all of it when None). Raises 400 if the prompt itself does not fit."""
    context = ctx.config.max_seq_len
    limit = context if max_tokens == 0 else context - 1  # generating needs one position after it
    if n_prompt > limit:
        room = "" if max_tokens == 0 else f", which leaves room for at most {limit} before a new token"
        raise APIError(f"the prompt has {n_prompt} tokens, more than fit in the model's context of {context} "
                       f"tokens{room}", param=param, code="context_length_exceeded")
    left = context - n_prompt
    if max_tokens is None:
        return left
    # With --window the cache slides past the context: as many as asked.
    return max_tokens if ctx.engine.window is not None else min(max_tokens, left)


def sampling(ctx: ServerContext, body: protocol._Generation) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    repetition = 1.0 if body.repetition_penalty is None else body.repetition_penalty
    bias = body.token_bias
    check_ids(ctx, sorted(bias or ()), "logit_bias")
    return SamplingParams(temperature, body.top_k or None, body.top_p, body.min_p or None, body.frequency_penalty,
                          body.presence_penalty, repetition, bias)


async def matchers(ctx: ServerContext, body: protocol._Generation, count: int) -> list[Any]:
    """One grammar matcher per choice for the constraint the body asks for (`response_format`,
    `structured_outputs`), compiled off the event loop (a grammar compiled already is only
    copied: on the loop); [None] * count for free text. A constraint the grammar library cannot
    take is a 400 naming its field."""
    asked = body.output_constraint()
    if asked is None:
        return [None] * count
    constraint, param = asked
    from ..inference.structured import grammar_is_compiled, grammar_matcher

    def compile_all() -> list[Any]:
        return [grammar_matcher(constraint, ctx.tokenizer) for _ in range(count)]

    try:
        if grammar_is_compiled(constraint, ctx.tokenizer):
            return compile_all()
        return await asyncio.to_thread(compile_all)
    except ValueError as error:
        raise APIError(f"invalid '{param}': {error}", param=param, code="invalid_value") from None


def stop_ids(ctx: ServerContext, body: protocol._Generation) -> frozenset[int]:
    ids = set(body.stop_token_ids or ())
    check_ids(ctx, sorted(ids), "stop_token_ids")
    if not body.ignore_eos:
        ids.add(ctx.tokenizer.eos_id)
    return frozenset(ids)


def seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request draws from seed + i (vLLM's rule), so n choices differ."""
    return None if seed is None else (seed + index) % 2**64


def cached_tokens(choices: list[_Choice]) -> int:
    """usage.prompt_tokens_details.cached_tokens: per prompt (counted once, as prompt_tokens
    counts it; the choices of one prompt share its ids list), the most tokens one of its choices
    reused from the prefix cache; 0 for prompts that were not looked up (they needed the prompt's
    logprobs, or were only scored). OpenAI always sends the field."""
    most: dict[int, int] = {}
    for c in choices:
        most[id(c.prompt_ids)] = max(most.get(id(c.prompt_ids), 0), c.cached_tokens or 0)
    return sum(most.values())


def usage(prompt_tokens: int, choices: list[_Choice]) -> dict[str, Any]:
    """A response's usage: its prompts' tokens, the choices' new tokens, the cached tokens."""
    return protocol.usage(prompt_tokens, sum(len(c.token_ids) for c in choices), cached_tokens(choices))
