"""The HTTP API: OpenAI's completions and chat completions (plain or streamed as server-sent
events), models, health, Prometheus metrics, and vLLM's tokenize/detokenize.

Handlers validate everything before a request reaches the engine, so a bad request is answered
400 in OpenAI's error shape (never FastAPI's 422, never a 500) and cannot disturb the requests in
flight. A body larger than `max_body_bytes` is answered 413 (prompts.py has the other size
limits). A client that disconnects cancels its request, a stream or a plain one, as soon as the
connection closes.

Text prompts are encoded as `andromeda generate` encodes them: the eos id first (training data
separates documents with eos, so it marks the start of a document), then the text's tokens;
token-id prompts are used exactly as given. A prompt longer than the model's context is refused.
max_tokens is clamped to the context left after the prompt (the choice then ends with "length"),
unless the server runs with `--window` (models with relative positions): then sequences continue
past the context on a sliding-window KV cache and max_tokens is honoured. An absent max_tokens on
chat means the context left.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import Config
from ..tokenizers import EOS_TOKEN, PAD_TOKEN, Tokenizer
from . import prompts, protocol
from .chat_template import ChatTemplate
from .detokenizer import TextStream, TokenStrings
from .engine import Delta, Engine, EngineError, RequestStream, SequenceRequest
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .scheduler import TokenLogprob

logger = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # JSON has no -inf: lower log-probabilities are reported as this (as vLLM does)
RETRY_AFTER_S = 1


@dataclass
class ServerContext:
    """Everything the handlers share."""

    engine: Engine
    tokenizer: Tokenizer
    config: Config  # the model's: context length and vocabulary
    model_name: str
    metrics: Metrics
    checkpoint: str = ""
    chat_template: ChatTemplate | None = None
    api_key: str | None = None
    max_body_bytes: int | None = None  # None: prompts.default_max_body_bytes of the context
    created: int = field(default_factory=protocol.now)

    def __post_init__(self) -> None:
        if self.max_body_bytes is None:
            self.max_body_bytes = prompts.default_max_body_bytes(self.config.max_seq_len)
        specials = {self.tokenizer.eos_id: EOS_TOKEN}
        if self.tokenizer.pad_id != self.tokenizer.eos_id:
            specials[self.tokenizer.pad_id] = PAD_TOKEN
        self.token_strings = TokenStrings(self.tokenizer, specials)


# --------------------------------------------------------------------------- the app


def create_app(ctx: ServerContext) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not ctx.engine.alive and not ctx.engine.ready.is_set():
            ctx.engine.start()  # loads the model on its own thread while the port already answers
        try:
            yield
        finally:
            ctx.engine.shutdown()
            await asyncio.get_running_loop().run_in_executor(None, ctx.engine.join, 10.0)

    app = FastAPI(title="Andromeda", lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=SafeJSONResponse)
    app.state.ctx = ctx
    app.add_middleware(BodyLimitMiddleware, limit=ctx.max_body_bytes)
    if ctx.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=ctx.api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if ctx.engine.ready.is_set():
            return SafeJSONResponse({})
        status = "failed" if ctx.engine.load_error is not None else "loading"
        return SafeJSONResponse({"status": status}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = protocol.model_card(ctx.model_name, ctx.created, ctx.config.max_seq_len, ctx.checkpoint)
        return {"object": "list", "data": [card]}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """What lm-evaluation-harness's remote tokenizer reads (as vLLM serves it)."""
        return {"tokenizer_class": type(ctx.tokenizer).__name__, "eos_token": EOS_TOKEN, "bos_token": None,
                "pad_token": PAD_TOKEN, "model_max_length": ctx.config.max_seq_len,
                "chat_template": ctx.chat_template.source if ctx.chat_template else None}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        prompts.check_model(ctx, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of 'prompt' and 'messages'", param="prompt", code="invalid_value")
        if body.messages is not None:
            messages = [m.model_dump(exclude_none=True) | {"content": m.text()} for m in body.messages]
            text = await prompts.render_chat(ctx, messages, body.add_generation_prompt, None)
        else:
            text = body.prompt
        ids = await prompts.encode(ctx, text, "prompt", must_fit=False)  # counting needs no fit
        ids = ([ctx.tokenizer.eos_id] if body.add_special_tokens else []) + ids
        return {"count": len(ids), "max_model_len": ctx.config.max_seq_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        prompts.check_model(ctx, body.model)
        prompts.check_ids(ctx, body.tokens, "tokens")
        return {"prompt": ctx.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await _completions(ctx, body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await _chat_completions(ctx, body, raw)

    return app


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate echoed from a request becomes U+FFFD."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "replace")


class APIKeyMiddleware:
    """401 in OpenAI's shape for API routes without `Authorization: Bearer <key>` (plain ASGI,
    so streamed responses pass through untouched; health and metrics stay open)."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.PROTECTED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = protocol.error_body("invalid or missing API key: send the header "
                                           "'Authorization: Bearer <key>'", code="invalid_api_key")
                response = SafeJSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        message = f"the request body is larger than this server accepts ({limit} bytes; see --max-body-bytes)"
        super().__init__(413, message)
        self.body = protocol.error_body(message, code="request_too_large")


class BodyLimitMiddleware:
    """413 in OpenAI's shape for a body over `limit` bytes: before reading it when its
    Content-Length says so, else as soon as the bytes received pass the limit (a chunked body).

    (FastAPI's max_body_size answers the first case with a plain-text 413 of its own.) Raised
    from `receive` as an HTTPException, the error passes FastAPI's body parsing to the handler."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await SafeJSONResponse(BodyTooLarge(self.limit).body, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return SafeJSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        api = protocol.validation_error(list(error.errors()))
        return SafeJSONResponse(api.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        elif isinstance(error, BodyTooLarge):
            return SafeJSONResponse(error.body, status_code=413)
        else:
            message = str(error.detail)
        return SafeJSONResponse(protocol.error_body(message, code=None), status_code=error.status_code,
                                headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return SafeJSONResponse(protocol.error_body(f"internal server error: {type(error).__name__}",
                                                type="server_error"), status_code=500)


# --------------------------------------------------------------------------- the engine


def _submit(ctx: ServerContext, seqs: list[SequenceRequest], prefix: str, streaming: bool) -> RequestStream:
    try:
        return ctx.engine.submit(seqs, asyncio.get_running_loop(), request_id=f"{prefix}-{uuid.uuid4().hex}",
                                 streaming=streaming)
    except EngineError as error:
        raise APIError(str(error), status=error.status, type="server_error", code=error.code,
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None


# --------------------------------------------------------------------------- choices


class _Choice:
    """One choice's text, tokens and log-probabilities, accumulated from the engine's deltas."""

    def __init__(self, index: int, prompt_ids: list[int], prompt_text: str, echo: bool) -> None:
        self.index = index
        self.prompt_ids = prompt_ids
        self.echo = echo
        self.prefix = prompt_text if echo else ""  # the text before the completion
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.offsets: list[int] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cached_tokens: int | None = None  # prompt tokens reused from the prefix cache (with the end)

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.offsets += delta.offsets
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.cached_tokens = (delta.finish_reason, delta.stop_reason,
                                                                         delta.cached_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _merge(deltas: list[Delta]) -> dict[int, Delta]:
    """The deltas of one wake-up, one per choice (several steps' pieces joined)."""
    merged: dict[int, Delta] = {}
    for delta in deltas:
        into = merged.get(delta.index)
        if into is None:
            merged[delta.index] = Delta(delta.index, delta.text, list(delta.token_ids), list(delta.logprobs),
                                        list(delta.offsets), delta.prompt_logprobs, delta.finish_reason,
                                        delta.stop_reason, delta.cached_tokens)
            continue
        into.text += delta.text
        into.token_ids += delta.token_ids
        into.logprobs += delta.logprobs
        into.offsets += delta.offsets
        into.prompt_logprobs = delta.prompt_logprobs or into.prompt_logprobs
        if delta.finish_reason is not None:
            into.finish_reason, into.stop_reason, into.cached_tokens = (delta.finish_reason, delta.stop_reason,
                                                                         delta.cached_tokens)
    return merged


def _lp(value: float) -> float:
    return value if value >= MIN_LOGPROB and not math.isnan(value) else MIN_LOGPROB


def _completion_logprobs(ctx: ServerContext, entries: list[TokenLogprob | None], ids: list[int],
                         offsets: list[int], base: int) -> dict[str, Any]:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    text = ctx.token_strings.text
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for token, entry, offset in zip(ids, entries, offsets):
        tokens.append(text(token))
        text_offset.append(base + offset)
        if entry is None:  # the first prompt token: nothing came before it
            token_logprobs.append(None)
            top.append(None)
            continue
        _, logprob, alternatives = entry
        token_logprobs.append(_lp(logprob))
        alts = {text(i): _lp(lp) for i, lp in alternatives}
        alts.setdefault(text(token), _lp(logprob))  # the chosen token is always listed (as vLLM)
        top.append(alts)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}


def _chat_logprobs(ctx: ServerContext, entries: list[TokenLogprob], top_n: int) -> dict[str, Any]:
    text, raw = ctx.token_strings.text, ctx.token_strings.bytes
    content = []
    for token, logprob, alternatives in entries:
        content.append({"token": text(token), "logprob": _lp(logprob), "bytes": raw(token),
                        "top_logprobs": [{"token": text(i), "logprob": _lp(lp), "bytes": raw(i)}
                                         for i, lp in alternatives[:top_n]]})
    return {"content": content}


def _prompt_offsets(ctx: ServerContext, ids: list[int]) -> list[int]:
    """Each prompt token's text offset in the decoded prompt."""
    stream, offsets = TextStream(ctx.tokenizer), []
    for token in ids:
        offsets.append(stream.decoded)
        stream.push(token)
    return offsets


def _prompt_text(ctx: ServerContext, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else ctx.tokenizer.decode(prompt)


# --------------------------------------------------------------------------- completions


async def _completions(ctx: ServerContext, body: CompletionRequest, raw: Request) -> Response:
    body.check_unsupported()
    prompts.check_model(ctx, body.model)
    params = prompts.sampling(ctx, body)
    stop_ids = prompts.stop_ids(ctx, body)
    matchers = await prompts.matchers(ctx, body, len(body.prompt) * body.n)
    want_prompt_logprobs = body.echo and body.logprobs is not None
    inputs: list[tuple[list[int], str]] = []  # each prompt's ids and its text when echoed
    seqs: list[SequenceRequest] = []
    for p, prompt in enumerate(body.prompt):
        if isinstance(prompt, str):
            ids = [ctx.tokenizer.eos_id] + await prompts.encode(ctx, prompt, "prompt")
        else:
            prompts.check_ids(ctx, prompt, "prompt")
            ids = list(prompt)
        max_tokens = prompts.budget(ctx, len(ids), body.max_tokens, "prompt")
        inputs.append((ids, _prompt_text(ctx, prompt) if body.echo else ""))
        for i in range(body.n):
            seqs.append(SequenceRequest(p * body.n + i, ids, max_tokens, params, prompts.seed(body.seed, i),
                                        body.stop_strings, stop_ids, body.logprobs,
                                        body.logprobs if want_prompt_logprobs else None, matchers[p * body.n + i]))
    choices = [_Choice(s.index, *inputs[s.index // body.n], body.echo) for s in seqs]
    stream = _submit(ctx, seqs, "cmpl", bool(body.stream))
    meta = (stream.request_id, protocol.now(), ctx.model_name)
    prompt_tokens = sum(len(ids) for ids, _ in inputs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _completion_events(ctx, stream, choices, meta, body.logprobs is not None, include_usage,
                                    prompt_tokens)
        return EngineStreamingResponse(events, lambda: _abort_unfinished(ctx, stream, choices))
    await _collect(ctx, raw, stream, choices)
    out = []
    for c in choices:
        logprobs = _completion_choice_logprobs(ctx, c) if body.logprobs is not None else None
        out.append(protocol.completion_choice(c.index, c.prefix + c.text, logprobs, c.finish_reason,
                                              c.stop_reason))
    return SafeJSONResponse(protocol.completion(*meta, out, prompts.usage(prompt_tokens, choices)))


def _completion_choice_logprobs(ctx: ServerContext, c: _Choice) -> dict[str, Any]:
    result = _completion_logprobs(ctx, c.logprobs, c.token_ids, c.offsets, len(c.prefix))
    if c.echo and c.prompt_logprobs is not None:
        head = _completion_logprobs(ctx, c.prompt_logprobs, c.prompt_ids, _prompt_offsets(ctx, c.prompt_ids), 0)
        result = {key: head[key] + result[key] for key in result}
    return result


async def _completion_events(ctx: ServerContext, stream: RequestStream, choices: list[_Choice], meta: tuple,
                             logprobs: bool, include_usage: bool, prompt_tokens: int) -> AsyncIterator[bytes]:
    by_index = {c.index: c for c in choices}
    started: set[int] = set()
    while not all(c.finished for c in choices):
        try:
            deltas = await stream.get()
        except EngineError as error:
            yield _sse(protocol.error_body(str(error), type="server_error", code=error.code))
            break
        out = []
        for index, delta in _merge(deltas).items():
            c = by_index[index]
            c.add(delta)
            text, lp = delta.text, None
            if logprobs:
                lp = _completion_logprobs(ctx, delta.logprobs, delta.token_ids, delta.offsets, len(c.prefix))
            if index not in started:  # echo: the prompt comes first
                started.add(index)
                text = c.prefix + text
                if logprobs and c.echo and c.prompt_logprobs is not None:
                    head = _completion_logprobs(ctx, c.prompt_logprobs, c.prompt_ids,
                                                _prompt_offsets(ctx, c.prompt_ids), 0)
                    lp = {key: head[key] + lp[key] for key in lp}
            if text or delta.finish_reason is not None or (logprobs and delta.token_ids):
                out.append(protocol.completion_choice(index, text, lp, delta.finish_reason, delta.stop_reason))
        for choice in out:
            chunk = protocol.completion(*meta, [choice], None)
            if not include_usage:
                del chunk["usage"]
            yield _sse(chunk)
    else:
        if include_usage:
            yield _sse(protocol.completion(*meta, [], prompts.usage(prompt_tokens, choices)))
    yield b"data: [DONE]\n\n"


class EngineStreamingResponse(StreamingResponse):
    """Server-sent events of an engine request. However the response ends (finished, the client
    gone, the server stopping), `on_close` runs at once and the event generator is closed, so an
    unfinished request is aborted and its slot freed then, not whenever the generator is
    garbage-collected."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            await self.body_iterator.aclose()


def _abort_unfinished(ctx: ServerContext, stream: RequestStream, choices: list[_Choice]) -> None:
    if not all(c.finished for c in choices):
        _abort(ctx, stream)


def _abort(ctx: ServerContext, stream: RequestStream) -> None:
    ctx.engine.abort(stream.request_id)


def _sse(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8", "replace")


async def _collect(ctx: ServerContext, raw: Request, stream: RequestStream, choices: list[_Choice]) -> None:
    """Gather every choice to its end; abort if the client disconnects first."""
    by_index = {c.index: c for c in choices}

    async def gather() -> None:
        while not all(c.finished for c in choices):
            for delta in await stream.get():
                by_index[delta.index].add(delta)

    work = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():  # the client left (or this handler was cancelled)
            work.cancel()
            _abort(ctx, stream)
        gone.cancel()
    if not work.cancelled():
        try:
            work.result()
        except EngineError as error:
            raise APIError(str(error), status=error.status, type="server_error", code=error.code) from None
    else:
        raise APIError("the client disconnected", status=499, code="client_closed_request")


async def _disconnected(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------- chat


async def _chat_completions(ctx: ServerContext, body: ChatCompletionRequest, raw: Request) -> Response:
    body.check_unsupported()
    prompts.check_model(ctx, body.model)
    params = prompts.sampling(ctx, body)
    stop_ids = prompts.stop_ids(ctx, body)
    matchers = await prompts.matchers(ctx, body, body.n)
    text = await prompts.render_chat(ctx, body.rendered_messages(), body.add_generation_prompt,
                                     body.chat_template_kwargs)
    ids = [ctx.tokenizer.eos_id] + await prompts.encode(ctx, text, "messages")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = prompts.budget(ctx, len(ids), requested, "messages")
    top = body.top_logprobs or 0
    logprobs = top if body.logprobs else None
    seqs = [SequenceRequest(i, ids, max_tokens, params, prompts.seed(body.seed, i), body.stop_strings, stop_ids, logprobs,
                            matcher=matchers[i]) for i in range(body.n)]
    choices = [_Choice(i, ids, "", False) for i in range(body.n)]
    stream = _submit(ctx, seqs, "chatcmpl", bool(body.stream))
    meta = (stream.request_id, protocol.now(), ctx.model_name)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _chat_events(ctx, stream, choices, meta, logprobs, include_usage, len(ids))
        return EngineStreamingResponse(events, lambda: _abort_unfinished(ctx, stream, choices))
    await _collect(ctx, raw, stream, choices)
    out = [protocol.chat_choice(c.index, c.text, _chat_logprobs(ctx, c.logprobs, top) if body.logprobs else None,
                                c.finish_reason, c.stop_reason) for c in choices]
    return SafeJSONResponse(protocol.completion(*meta, out, prompts.usage(len(ids), choices),
                                            object="chat.completion"))


async def _chat_events(ctx: ServerContext, stream: RequestStream, choices: list[_Choice], meta: tuple,
                       logprobs: int | None, include_usage: bool, prompt_tokens: int) -> AsyncIterator[bytes]:
    by_index = {c.index: c for c in choices}

    def chunk(choice: dict[str, Any]) -> str:
        payload = protocol.completion(*meta, [choice], None, object="chat.completion.chunk")
        if not include_usage:
            del payload["usage"]
        return _sse(payload)

    for c in choices:  # OpenAI opens each choice with the role
        yield chunk(protocol.chat_chunk_choice(c.index, {"role": "assistant", "content": ""}, None, None))
    while not all(c.finished for c in choices):
        try:
            deltas = await stream.get()
        except EngineError as error:
            yield _sse(protocol.error_body(str(error), type="server_error", code=error.code))
            break
        for index, delta in _merge(deltas).items():
            by_index[index].add(delta)
            lp = _chat_logprobs(ctx, delta.logprobs, logprobs) if logprobs is not None else None
            if delta.text or (lp and lp["content"]):
                yield chunk(protocol.chat_chunk_choice(index, {"content": delta.text}, lp, None))
            if delta.finish_reason is not None:
                yield chunk(protocol.chat_chunk_choice(index, {}, None, delta.finish_reason, delta.stop_reason))
    else:
        if include_usage:
            payload = protocol.completion(*meta, [], prompts.usage(prompt_tokens, choices),
                                          object="chat.completion.chunk")
            yield _sse(payload)
    yield b"data: [DONE]\n\n"
