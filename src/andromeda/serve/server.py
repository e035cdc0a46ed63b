"""Running the server: the app under uvicorn, with the engine's lifecycle and signals.

    andromeda serve --checkpoint runs/demo [--host 127.0.0.1] [--port 8000] [--max-batch-size 16]
        [--max-queue 256] [--dtype fp32|bf16] [--api-key KEY] [--served-model-name NAME]
        [--chat-template FILE] [--device auto|cpu|cuda] [--max-body-bytes N]
        [--max-stream-backlog TOKENS] [--header-timeout S] [--timeout-keep-alive S] [--limit-concurrency N]

Start-up: the checkpoint's config, tokenizer and chat template are read first (a bad path fails
at once, exit 1); then the port is bound and answers /health with 503 while the engine thread
loads the weights; once both are up the URL is logged. SIGINT or SIGTERM: the port stops
accepting, every request in flight is ended (a stream gets an error event and [DONE], a waiting
plain request a 503), the engine thread stops, and the command returns 0.

Connections. A request head (request line and headers) must arrive whole within `header_timeout`
seconds of its first byte, and within MAX_HEAD_BYTES, or the connection is closed with a 408 or
431 (uvicorn has no such timeout, so a slow-loris client could hold connections open forever); a
connection that sends nothing is closed after `header_timeout` too. An idle keep-alive connection
is closed after `timeout_keep_alive` seconds (uvicorn's); `limit_concurrency` caps connections and
requests together (uvicorn answers 503 beyond it).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import torch

from ..checkpoint import DTYPES, check_load_request, load_checkpoint_tokenizer, open_model_source
from ..inference.quantize import DEFAULT_GROUP_SIZE
from ..model.cache import check_window
from ..parallel.environment import resolve_device
from .protocol import error_body

logger = logging.getLogger("andromeda.serve")

MAX_HEAD_BYTES = 64 * 1024  # a request line and headers together (h11 allows 16 KiB, nginx 32 KiB)


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
          max_queue: int = 256, dtype: str | None = None, api_key: str | None = None,
          served_model_name: str | None = None, chat_template: str | Path | None = None, device: str = "auto",
          prefill_chunk: int = 256, stream_interval: float = 0.02, threads: int | None = None,
          window: int | None = None, sink_tokens: int = 0, quantize: str | None = None,
          group_size: int = DEFAULT_GROUP_SIZE, max_body_bytes: int | None = None, max_stream_backlog: int = 1024,
          header_timeout: float = 10.0, timeout_keep_alive: float = 5.0, limit_concurrency: int | None = None,
          prefix_cache: bool = True) -> int:
    """Serve the checkpoint until SIGINT/SIGTERM; returns 0. Raises ValueError/OSError/RuntimeError
    naming the problem (bad option, missing checkpoint, port in use, weights that do not load)."""
    try:
        import httptools  # noqa: F401  (the HTTP parser whose callbacks time request heads)
        import uvicorn

        from .app import ServerContext, create_app
    except ImportError as error:
        raise RuntimeError(f"andromeda serve needs the serve extra ({error.name or error} is missing): "
                           f"pip install -e '.[serve]' in the andromeda checkout (PyPI's andromeda is an "
                           f"unrelated project)") from None
    from .chat_template import ChatTemplate, find_chat_template
    from .engine import Engine, ModelSpec
    from .metrics import Metrics

    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key is empty, which would leave the API open to anyone; give a key, or leave "
                         "out --api-key (and ANDROMEDA_API_KEY) to serve without one")
    for option, value, low in (("max-batch-size", max_batch_size, 1), ("max-queue", max_queue, 0),
                               ("prefill-chunk", prefill_chunk, 1), ("port", port, 0), ("threads", threads or 1, 1),
                               ("max-body-bytes", 1 if max_body_bytes is None else max_body_bytes, 1),
                               ("max-stream-backlog", max_stream_backlog, 1),
                               ("limit-concurrency", 1 if limit_concurrency is None else limit_concurrency, 1)):
        if value < low:
            raise ValueError(f"--{option} must be >= {low}, got {value}")
    if not stream_interval >= 0:
        raise ValueError(f"--stream-interval must be >= 0 seconds, got {stream_interval}")
    for option, seconds in (("header-timeout", header_timeout), ("timeout-keep-alive", timeout_keep_alive)):
        if not seconds > 0:
            raise ValueError(f"--{option} must be > 0 seconds, got {seconds}")
    if port > 65535:
        raise ValueError(f"--port must be <= 65535, got {port}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    # One core is left to the HTTP thread: an OpenMP team that shares its cores with it stalls at
    # every barrier the thread's work delays.
    torch.set_num_threads(threads if threads is not None else max(1, torch.get_num_threads() - 1))
    source = open_model_source(checkpoint)  # resolved and parsed here, once; the engine loads it
    folder, config = source.folder, source.config
    tokenizer = load_checkpoint_tokenizer(source)
    template_text = find_chat_template(source, chat_template)
    template = ChatTemplate(template_text) if template_text is not None else None
    target = resolve_device(device)
    name = served_model_name or Path(checkpoint).resolve().name
    check_load_request(source, quantize, group_size)  # now, not in the engine's thread
    spec = ModelSpec(source, target, dtype, quantize, group_size)  # the dtype policy: `load_for_inference`

    metrics = Metrics(name)
    if window is not None or sink_tokens:
        check_window(window, sink_tokens)
        if config.use_abs_pos_emb:
            raise ValueError("--window/--sink-tokens: a model with learned absolute positions cannot slide past "
                             "its max_seq_len")
    engine = Engine(spec, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                    prefill_tokens=prefill_chunk, stream_interval=stream_interval, metrics=metrics,
                    window=window, sink_tokens=sink_tokens, max_backlog=max_stream_backlog, prefix_cache=prefix_cache)
    ctx = ServerContext(engine, tokenizer, config, name, metrics, checkpoint=str(folder), chat_template=template,
                        api_key=api_key, max_body_bytes=max_body_bytes)
    server = _make_server(uvicorn.Config(create_app(ctx), host=host, port=port, log_level="warning",
                                         access_log=False, lifespan="on", timeout_graceful_shutdown=10,
                                         http=_http_protocol(header_timeout), ws="none",
                                         timeout_keep_alive=timeout_keep_alive, limit_concurrency=limit_concurrency),
                          on_exit=engine.shutdown)
    threading.Thread(target=_announce, args=(server, engine, name), name="andromeda-announce", daemon=True).start()
    logger.info("loading %s on %s", folder, target)
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except SystemExit as exit_:  # uvicorn exits when it cannot bind
        raise OSError(f"could not listen on {host}:{port} (is the port in use?)") from exit_
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.shutdown()
        engine.join(10.0)
    if engine.load_error is not None:
        raise RuntimeError(f"could not load the model from {folder}: {engine.load_error}")
    logger.info("andromeda serve: stopped")
    return 0


def _ignore(signum, frame) -> None:
    """Stands in for the default handlers while uvicorn runs: uvicorn re-raises the signal that
    stopped it once it has shut down, which must not kill the process (exit code 0)."""


def _make_server(config, on_exit):
    """A uvicorn.Server whose exit signal also ends the requests in flight, so streams end at
    once rather than when they would have finished. (Built here: uvicorn is an optional extra.)"""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            on_exit()
            super().handle_exit(sig, frame)

    return Server(config)


def _http_protocol(header_timeout: float):
    """uvicorn's httptools protocol with a deadline and a size cap on each request head (see the
    module docstring), kept with the parser's own callbacks: a head begins at its first byte
    (`on_message_begin`) and ends with its headers (`on_headers_complete`)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadTimeoutProtocol(HttpToolsProtocol):
        _head_timer = None
        _in_head = False  # a request head has begun and not ended
        _head_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._set_deadline()  # a connection that never sends a byte is closed too

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0
            self._set_deadline()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._cancel_deadline()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():  # all of `data` belongs to the head
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse(431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")

        def connection_lost(self, exc) -> None:
            self._cancel_deadline()
            super().connection_lost(exc)

        def _set_deadline(self) -> None:
            self._cancel_deadline()
            self._head_timer = self.loop.call_later(header_timeout, self._deadline_passed)

        def _cancel_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _deadline_passed(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._in_head:
                self._refuse(408, f"the request line and headers did not arrive within {header_timeout:g} s")
            elif self.cycle is None:  # not one byte since the connection opened
                self.transport.close()

        def _refuse(self, status: int, message: str) -> None:
            body = json.dumps(error_body(message, code="request_timeout" if status == 408 else
                                         "request_header_too_large")).encode()
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % (status, reason, len(body)))
            self.transport.write(head + body)
            self.transport.close()

    return HeadTimeoutProtocol


def _announce(server, engine, name: str) -> None:
    """Log the URL once the port is bound and the model is loaded; stop the server if the model
    fails to load."""
    while not (engine.ready.is_set() and server.started):
        if engine.load_error is not None:
            server.should_exit = True
            return
        if server.should_exit:
            return
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logger.info("andromeda serve: %s ready at http://%s:%d/v1 (max batch %d, context %d)", name, shown, port,
                engine.max_batch_size, engine.scheduler.config.max_seq_len)
