"""The engine: one thread owns the model, the KV cache and the scheduler.

Threads. The HTTP server's event loop validates requests and `submit`s them; the engine thread
loads the model, then loops: take new requests and cancellations from the inbox, run one
`EngineCore.step` (schedule, execute, update: the scheduler finds stop strings too, so a stopped
sequence frees its slot in the same step), turn its outputs into deltas, and hand the requests
their pieces through one `call_soon_threadsafe` per event loop. The model and the cache are
touched by this thread only.

Delivery. Both threads share the GIL, so every chunk the event loop sends is time the engine
does not compute. A streamed request's first tokens and endings are handed over at once, its
other tokens at most every `stream_interval` seconds, several per chunk under load (vLLM's
--stream-interval does the same by token count). A plain (non-streamed) request is handed its
choices when they end, and nothing before: its client reads nothing sooner. At each handover the
engine waits until the loop has run what it had ready (see `_deliver`): that is also when the
loop reads new requests.

Flow control. At most max_batch_size sequences run (one KV-cache slot each) and max_queue more
wait; a submission beyond that raises `Overloaded` (the API answers 503 with Retry-After).
`abort` (a client went away) ends a request's sequences at the start of the next step, freeing
their slots. `shutdown` ends every request in flight with an error and stops the thread.

Backpressure. A request may have at most `max_backlog` tokens generated and not yet taken by its
event-loop side (`RequestStream.get`; a streaming handler stops taking while its client does not
read). Past that its sequences pause, keeping their slots, until the backlog is down to half;
closing the connection aborts them. So a client that never reads costs a slot, not memory.

Failures. Every admitted request gets an answer: a row whose sampling raises ends its request
with an error and the batch goes on; a step that raises (e.g. out of memory) first delivers what
it had finished, then ends with an error the requests it was working on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import ModelSource, load_for_inference
from ..inference.quantize import DEFAULT_GROUP_SIZE
from ..inference.sampling import SamplingParams
from ..model import Transformer
from ..tokenizers import Tokenizer
from .config import ServeConfig
from .core import EngineCore
from .detokenizer import TextStream
from .scheduler import Sequence, Status, StepOutput, TokenLogprob

if TYPE_CHECKING:  # prometheus_client is the serve extra's; the engine runs without it
    from .metrics import Metrics

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how."""

    source: ModelSource | Path  # a model folder, or the source the server opened
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | str | None = None  # None: the loader's choice (as saved; bf16 on CUDA or to quantize)
    quantize: str | None = None  # "int8" or "int4": quantize a full-precision model as it loads
    group_size: int = DEFAULT_GROUP_SIZE  # int4's inputs per scale and zero
    draft: ModelSource | None = None  # a speculative-decoding draft model, loaded like the model (not quantized)


def load_model(spec: ModelSpec) -> Transformer:
    """The Transformer the engine serves, as `checkpoint.load_for_inference` loads it for decoding:
    in eval mode on `spec.device`, bf16 weights on a CPU prepacked for oneDNN."""
    return load_for_inference(spec.source, device=spec.device, dtype=spec.dtype, quantize=spec.quantize,
                              group_size=spec.group_size, decoding=True)


def load_draft(spec: ModelSpec) -> Transformer | None:
    """The draft model of `spec` (None without one), in the model's dtype policy, never quantized."""
    if spec.draft is None:
        return None
    return load_for_inference(spec.draft, device=spec.device, dtype=spec.dtype, decoding=True)


# --------------------------------------------------------------------------- requests and outputs


class EngineError(RuntimeError):
    """A request could not be served; `status` is the HTTP status the API answers with."""

    status = 500
    code = "internal_error"


class Overloaded(EngineError):
    status = 503
    code = "overloaded"


class NotReady(EngineError):
    status = 503
    code = "model_loading"


class ShuttingDown(EngineError):
    status = 503
    code = "shutting_down"


@dataclass
class SequenceRequest:
    """One sequence to generate (a choice of a request), validated by the API."""

    index: int  # the choice's index in the response
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int | None = None  # None: a fresh random seed (still a generator of its own)
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    matcher: Any = None  # an inference.structured.GrammarMatcher: the output follows its grammar


@dataclass
class Delta:
    """What one step added to one choice."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with token_ids, when asked for
    offsets: list[int] = field(default_factory=list)  # each token's text offset in the completion
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop id that ended it
    cached_tokens: int | None = None  # with the end: prompt tokens reused from the prefix cache (Sequence's)


class RequestStream:
    """The event-loop side of a request: the deltas of all its choices, as they come."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self._items: list[Delta] = []
        self._event = asyncio.Event()
        self._error: EngineError | None = None
        self.taken = 0  # tokens handed to the reader so far (read by the engine's backpressure)
        self.paused = False  # set by the engine: its sequences wait for the reader to catch up
        self.wake: Callable[[], None] = _nothing  # tells the engine that the reader caught up

    def _put(self, deltas: list[Delta] | None, error: EngineError | None) -> None:  # on the loop
        if deltas:
            self._items.extend(deltas)
        if error is not None:
            self._error = error
        self._event.set()

    async def get(self) -> list[Delta]:
        """Every delta since the last call (waits for one); raises the engine's error, if any,
        once the deltas before it are taken."""
        while not self._items and self._error is None:
            await self._event.wait()
            self._event.clear()
        if self._items:
            items, self._items = self._items, []
            self.taken += sum(len(delta.token_ids) for delta in items)
            if self.paused:
                self.wake()
            return items
        raise self._error


class _Request:
    """The engine thread's view of a request in flight."""

    def __init__(self, request_id: str, stream: RequestStream, seqs: list[tuple[SequenceRequest, Sequence]],
                 streaming: bool = True) -> None:
        self.request_id = request_id
        self.stream = stream
        self.streaming = streaming  # its client reads tokens as they come (else: each choice at its end)
        self.held: list[Delta] = []  # a plain request's deltas until one of its choices ends
        self.choices = {seq: spec for spec, seq in seqs}
        self.unfinished = len(seqs)
        self.produced = 0  # tokens generated (stream.taken of them were taken)


def _nothing() -> None:
    pass


# --------------------------------------------------------------------------- the engine


class Engine:
    SEND_WAIT_S = 0.05  # the longest the engine waits for an event loop at a handover

    def __init__(self, spec: ModelSpec, tokenizer: Tokenizer, config: ServeConfig | None = None, *,
                 metrics: Metrics | None = None, loader: Callable[[ModelSpec], Transformer] = load_model) -> None:
        self.spec = spec
        self.serve_config = config = config or ServeConfig()
        self.window = config.window
        self.tokenizer = tokenizer
        self.max_batch_size = config.max_batch_size
        self.max_queue = config.max_queue
        self.stream_interval = config.stream_interval
        self.max_backlog = config.max_stream_backlog
        self.metrics = metrics
        self.loader = loader
        self.core: EngineCore | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._lock = threading.Condition()
        self._inbox: list[_Request] = []
        self._aborts: list[str] = []
        self._requests: dict[str, _Request] = {}  # engine thread only
        self._owner: dict[Sequence, _Request] = {}  # engine thread only
        self._in_flight = 0  # sequences submitted and not finished (guarded by _lock)
        self._paused: set[_Request] = set()  # requests whose reader fell max_backlog behind (engine thread)
        self._pending: dict[_Request, list[Delta]] = {}  # deltas not yet handed to the event loop
        self._urgent = False  # a pending delta holds a first token, an end or prompt logprobs
        self._streamed = False  # a pending delta is a streamed request's (handed over every stream_interval)
        self._delivered_at = 0.0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="andromeda-engine", daemon=True)
        self._ids = itertools.count()

    # ------------------------------------------------------------------ any thread

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, seqs: list[SequenceRequest], loop: asyncio.AbstractEventLoop,
               request_id: str | None = None, arrival: float | None = None, streaming: bool = True) -> RequestStream:
        """Queue a request's sequences; its deltas arrive on the returned stream (on `loop`): as
        they come when `streaming`, else each choice's at its end."""
        request_id = request_id or f"req-{next(self._ids)}"
        stream = RequestStream(request_id, loop)
        stream.wake = self._wake
        arrival = time.perf_counter() if arrival is None else arrival
        pairs = []
        for spec in seqs:
            seed = None if spec.params.greedy else spec.seed if spec.seed is not None else secrets.randbits(63)
            pairs.append((spec, Sequence(spec.prompt, spec.max_tokens, spec.params, seed, spec.stop_ids,
                                         spec.logprobs, spec.prompt_logprobs, TextStream(self.tokenizer, spec.stop),
                                         matcher=spec.matcher, arrival=arrival)))
        request = _Request(request_id, stream, pairs, streaming)
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if not self.ready.is_set():
                raise NotReady("the model is still loading; retry shortly")
            capacity = self.max_batch_size + self.max_queue
            if self._in_flight + len(seqs) > capacity:
                raise Overloaded(f"the server is at capacity ({self.max_batch_size} running and "
                                 f"{self.max_queue} queued sequences); retry later")
            self._in_flight += len(seqs)
            self._inbox.append(request)
            self._lock.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """End a request (its client went away): its slots are freed at the next step."""
        with self._lock:
            self._aborts.append(request_id)
            self._lock.notify()

    def _wake(self) -> None:
        """Have the engine look again at what it waits for (a paused stream's reader caught up)."""
        with self._lock:
            self._lock.notify()

    def shutdown(self) -> None:
        """End every request in flight with an error and stop the engine thread (returns at once)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            started = time.perf_counter()
            net = self.loader(self.spec)
            self.core = EngineCore(net, self.serve_config, draft=load_draft(self.spec))
            self._warm_up()
            logger.info("model loaded in %.1f s", time.perf_counter() - started)
        except BaseException as error:  # reported by the server, which then exits
            logger.error("could not load the model: %s", error)
            self.load_error = error
            return
        self.ready.set()
        try:
            self._loop()
        except BaseException as error:  # a bug: end every request rather than hang them
            logger.exception("the engine failed")
            self._fail_all(EngineError(f"the engine failed: {error}"))
            raise
        finally:
            self.ready.clear()

    def _warm_up(self) -> None:
        """One short request, so the first client does not pay for kernel selection."""
        eos = self.tokenizer.eos_id
        seq = Sequence([eos] * 3, 2, SamplingParams(0.0))
        self.core.add(seq)
        while self.core.has_work:
            self.core.step()
        self.core.stats = type(self.core.stats)()
        for tokens in self.core.scheduler.slot_tokens:  # no client's prompt: nothing to reuse or count
            tokens.clear()

    def _loop(self) -> None:
        core = self.core
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self._stopping or core.can_step
                           or self._caught_up()):
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            if stopping:
                self._requests.update({r.request_id: r for r in inbox})
                self._fail_all(ShuttingDown("the server is shutting down"))
                return
            for request in inbox:
                self._requests[request.request_id] = request
                try:
                    for seq in request.choices:
                        self._owner[seq] = request
                        core.add(seq)
                except ValueError as error:  # the API checks lengths first: a bug, but this request's alone
                    logger.exception("a request could not be queued")
                    self._fail(request, EngineError(f"the request could not be queued: {error}"))
            for request_id in aborts:
                request = self._requests.get(request_id)
                if request is not None:
                    for seq in request.choices:
                        if seq.status is not Status.FINISHED and self.metrics is not None:
                            self.metrics.finished("abort")
                        core.finish(seq, "abort")
                    self._retire(request)
                    self._pending.pop(request, None)
            if self._paused:
                self._resume_caught_up()
            if core.can_step:
                try:
                    self._step(self._pending)
                except Exception as error:  # e.g. out of memory: fail what it was doing, keep serving
                    logger.exception("an engine step failed")
                    self._fail_step(EngineError(f"generation failed: {error}"))
            now = time.perf_counter()
            due = self._streamed and now - self._delivered_at >= self.stream_interval
            if self._urgent or due or not core.can_step:
                self._deliver(self._pending)
                self._pending, self._urgent, self._streamed, self._delivered_at = {}, False, False, now
            if self.metrics is not None:
                self.metrics.running.set(len(core.running))
                self.metrics.waiting.set(len(core.waiting))
                self.metrics.paused.set(core.paused)

    def _step(self, deliveries: dict[_Request, list[Delta]]) -> None:
        """One engine-core step, its outputs turned into deltas. If the step raises, what it had
        produced before is still applied (then the error goes on to `_fail_step`)."""
        core = self.core
        stats = core.stats
        before = (stats.prefill_tokens, stats.decode_rows, stats.prefix_queries, stats.prefix_hits,
                  stats.draft_tokens, stats.accepted_tokens)
        try:
            outputs, failure = core.step(), None
        except Exception as error:
            outputs, failure = core.outputs, error
        self._record_step(outputs, before)
        self._apply(outputs, deliveries)
        if failure is not None:
            raise failure

    def _record_step(self, outputs: list[StepOutput], before: tuple[int, ...]) -> None:
        core, metrics = self.core, self.metrics
        if metrics is not None:
            metrics.prefix_cache_queries.inc(core.stats.prefix_queries - before[2])
            metrics.prefix_cache_hits.inc(core.stats.prefix_hits - before[3])
            metrics.spec_draft_tokens.inc(core.stats.draft_tokens - before[4])
            metrics.spec_accepted_tokens.inc(core.stats.accepted_tokens - before[5])
            prefilled = core.stats.prefill_tokens - before[0]
            decoded = core.stats.decode_rows - before[1]
            metrics.iteration_tokens.observe(prefilled + decoded)
            if decoded:
                metrics.decode_batch_size.observe(decoded)
            metrics.generation_tokens.inc(sum(out.token is not None for out in outputs))
            for seq in core.admitted:
                metrics.queue_time.observe(seq.admitted - seq.arrival)
                metrics.prompt_tokens.inc(len(seq.prompt))

    def _apply(self, outputs: list[StepOutput], deliveries: dict[_Request, list[Delta]]) -> None:
        """Turn a step's outputs into deltas (the scheduler has cut the text and decided which
        sequences ended) and pause the requests whose reader fell `max_backlog` tokens behind."""
        metrics = self.metrics
        now = time.perf_counter()
        deltas: dict[Sequence, Delta] = {}
        for out in outputs:
            seq = out.seq
            request = self._owner.get(seq)
            if request is None:  # its request already failed (another choice's row)
                continue
            if out.error is not None:
                self._fail_row(request, seq, out.error)
                continue
            delta = deltas.get(seq)
            if delta is None:
                delta = deltas[seq] = Delta(request.choices[seq].index)
                (deliveries.setdefault(request, []) if request.streaming else request.held).append(delta)
            self._streamed |= request.streaming
            if out.prompt_logprobs is not None:
                delta.prompt_logprobs = out.prompt_logprobs
                self._urgent |= request.streaming
            if out.token is not None:
                if out.offset == 0:  # until its first text is out: TTFT is not worth saving work on
                    self._urgent |= request.streaming
                self._observe_token(seq, now)
                delta.token_ids.append(out.token)
                request.produced += 1
                # (A plain request is read at its end: max_tokens bounds what it holds.)
                if request.streaming and request.produced - request.stream.taken >= self.max_backlog:
                    self._pause(request, seq)
                if out.logprob is not None:
                    delta.logprobs.append(out.logprob)
                delta.offsets.append(out.offset)
                delta.text += out.text
            if out.finished:
                self._urgent = True
                if request.held:  # a plain request: what its choices have so far, with this end
                    deliveries.setdefault(request, []).extend(request.held)
                    request.held = []
                delta.finish_reason = seq.finish_reason
                delta.stop_reason = None if seq.stop_reason == self.tokenizer.eos_id else seq.stop_reason
                delta.cached_tokens = seq.cached_tokens
                if metrics is not None:
                    metrics.e2e_latency.observe(now - seq.arrival)
                    metrics.finished(seq.finish_reason)
                request.unfinished -= 1
                if request.unfinished == 0:
                    self._retire(request)

    def _observe_token(self, seq: Sequence, now: float) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        if seq.last_token_time is None:
            metrics.time_to_first_token.observe(now - seq.arrival)
        else:
            metrics.inter_token_latency.observe(now - seq.last_token_time)
        seq.last_token_time = now

    def _pause(self, request: _Request, seq: Sequence) -> None:
        self.core.pause(seq)
        self._paused.add(request)
        request.stream.paused = True

    def _caught_up(self) -> bool:
        """A paused request's reader has taken all but half of the backlog (engine thread)."""
        low = self.max_backlog // 2
        return any(r.produced - r.stream.taken <= low for r in self._paused)

    def _resume_caught_up(self) -> None:
        low = self.max_backlog // 2
        for request in [r for r in self._paused if r.produced - r.stream.taken <= low]:
            self._paused.discard(request)
            request.stream.paused = False
            for seq in request.choices:
                self.core.resume(seq)

    def _retire(self, request: _Request) -> None:
        """Forget a request whose sequences have all finished."""
        self._paused.discard(request)
        if self._requests.pop(request.request_id, None) is None:
            return
        for seq in request.choices:
            self._owner.pop(seq, None)
        with self._lock:
            self._in_flight -= len(request.choices)

    def _fail_step(self, error: EngineError) -> None:
        """End the requests a failed step was working on: those holding a slot (the step failed
        over all of them), taken from the queue in it, or given an output not yet delivered."""
        core = self.core
        touched = [*core.running, *core.admitted, *(out.seq for out in core.outputs)]
        failed = {self._owner[seq] for seq in touched if seq in self._owner}
        for request in failed:
            self._fail(request, error)

    def _fail_row(self, request: _Request, seq: Sequence, reason: str) -> None:
        """A row could not be sampled: its request ends with an error, the batch goes on."""
        logger.error("sampling failed for %s: %s", request.request_id, reason)
        if self.metrics is not None:
            self.metrics.finished("error")
        self._fail(request, EngineError(f"sampling failed: {reason}"))

    def _fail_all(self, error: EngineError) -> None:
        for request in list(self._requests.values()):
            self._fail(request, error)

    def _fail(self, request: _Request, error: EngineError) -> None:
        if self.core is not None:
            for seq in request.choices:
                self.core.finish(seq, "abort")
        self._retire(request)
        self._send(request.stream, self._pending.pop(request, None), error)  # what it got, then the error

    def _deliver(self, deliveries: dict[_Request, list[Delta]]) -> None:
        """Hand the deltas to their event loops and wait until every loop serving a request has
        run what it had to do (sent them, read new requests), at most SEND_WAIT_S.

        The wait is how the loops get the GIL: a thread that waits for it while the engine
        releases and retakes it around every tensor operation can wait indefinitely (the
        engine takes it back first), so new requests would be read only when the engine idles.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, list[Delta]]]] = {
            request.stream.loop: [] for request in self._requests.values()}
        for request, deltas in deliveries.items():
            by_loop.setdefault(request.stream.loop, []).append((request.stream, deltas))
        handed = []
        for loop, items in by_loop.items():
            done = threading.Event()
            try:
                loop.call_soon_threadsafe(_put_all, items, done)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                continue
            handed.append(done)
        for done in handed:
            done.wait(self.SEND_WAIT_S)

    def _send(self, stream: RequestStream, deltas: list[Delta] | None, error: EngineError | None) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream._put, deltas, error)
        except RuntimeError:
            pass


def _put_all(items: list[tuple[RequestStream, list[Delta]]], done: threading.Event) -> None:
    for stream, deltas in items:
        stream._put(deltas, None)
    # Scheduled after the tasks just woken, so it runs once they have written their chunks.
    asyncio.get_running_loop().call_soon(done.set)
