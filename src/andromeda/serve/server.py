"""Running the server: the app under uvicorn, with the engine's lifecycle and signals.

    andromeda serve --checkpoint runs/demo [one flag per ServeConfig field: --port 8000 ...]

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

from ..checkpoint import (
    attach_lora,
    check_load_request,
    load_checkpoint_tokenizer,
    open_draft_source,
    open_model_source,
)
from ..inference.quantize import DEFAULT_GROUP_SIZE
from ..parallel.environment import resolve_device
from .config import ServeConfig
from .protocol import error_body

logger = logging.getLogger("andromeda.serve")

MAX_HEAD_BYTES = 64 * 1024  # a request line and headers together (h11 allows 16 KiB, nginx 32 KiB)


def serve(checkpoint: str | Path, config: ServeConfig | None = None, *, quantize: str | None = None,
          group_size: int = DEFAULT_GROUP_SIZE, lora: str | Path | None = None) -> int:
    """Serve the checkpoint as `config` says (default: ServeConfig()) until SIGINT/SIGTERM, with
    the LoRA adapter `lora` applied; returns 0. Raises ValueError/OSError/RuntimeError naming the
    problem (bad option, missing checkpoint, port in use, weights that do not load)."""
    config = config or ServeConfig()
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

    # One core is left to the HTTP thread: an OpenMP team that shares its cores with it stalls at
    # every barrier the thread's work delays.
    threads = config.threads
    torch.set_num_threads(threads if threads is not None else max(1, torch.get_num_threads() - 1))
    source = attach_lora(open_model_source(checkpoint), lora)  # resolved and checked here, once; the engine loads it
    folder, model_config = source.folder, source.config
    tokenizer = load_checkpoint_tokenizer(source)
    template_text = find_chat_template(source, config.chat_template)
    template = ChatTemplate(template_text) if template_text is not None else None
    target = resolve_device(config.device)
    name = config.served_model_name or Path(checkpoint).resolve().name
    check_load_request(source, quantize, group_size)  # now, not in the engine's thread
    draft = None
    if config.draft_checkpoint is not None:
        draft = open_draft_source(config.draft_checkpoint, source)
        if draft.config.use_abs_pos_emb and draft.config.max_seq_len < model_config.max_seq_len:
            raise ValueError(f"--draft-checkpoint {config.draft_checkpoint} has learned positions up to "
                             f"{draft.config.max_seq_len}, fewer than the model's context of "
                             f"{model_config.max_seq_len}: it could not follow long sequences")
    spec = ModelSpec(source, target, config.dtype, quantize, group_size, draft)  # the dtype policy: `load_for_inference`

    metrics = Metrics(name)
    if config.slides and model_config.use_abs_pos_emb:
        raise ValueError("--window/--sink-tokens: a model with learned absolute positions cannot slide past "
                         "its max_seq_len")
    engine = Engine(spec, tokenizer, config, metrics=metrics)
    ctx = ServerContext(engine, tokenizer, model_config, name, metrics, checkpoint=str(folder),
                        chat_template=template, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    server = _make_server(uvicorn.Config(create_app(ctx), host=config.host, port=config.port, log_level="warning",
                                         access_log=False, lifespan="on", timeout_graceful_shutdown=10,
                                         http=_http_protocol(config.header_timeout), ws="none",
                                         timeout_keep_alive=config.timeout_keep_alive,
                                         limit_concurrency=config.limit_concurrency),
                          on_exit=engine.shutdown)
    threading.Thread(target=_announce, args=(server, engine, name), name="andromeda-announce", daemon=True).start()
    logger.info("loading %s on %s", folder, target)
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except SystemExit as exit_:  # uvicorn exits when it cannot bind
        raise OSError(f"could not listen on {config.host}:{config.port} (is the port in use?)") from exit_
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
                engine.max_batch_size, engine.core.config.max_seq_len)
