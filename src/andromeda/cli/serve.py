"""`andromeda serve`: an OpenAI-compatible HTTP server with continuous batching (see
`andromeda.serve`)."""

from __future__ import annotations

import argparse
import os

from ..choices import DTYPE_NAMES
from .common import add_inference_arguments, group_size_for

DESCRIPTION = ("Serve a checkpoint over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions "
               "(streamed or not), /v1/models, /health, /metrics, /tokenize, /detokenize. Needs the serve extra: "
               "pip install -e '.[serve]' in the andromeda checkout (PyPI's andromeda is an unrelated project).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, training run folder, quantized checkpoint or Hugging Face export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="sequences decoded together: the KV cache's slots (default 16)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="sequences that may wait for a slot; beyond them requests get 503 (default 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                        help="weights and KV cache (default: as saved; bf16 on CUDA and when quantizing)")
    parser.add_argument("--api-key", type=_api_key, default=os.environ.get("ANDROMEDA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on the API routes (/v1/*, /tokenize, /detokenize, "
                             "/tokenizer_info; /health, /metrics and /openapi.json stay open); must not be empty "
                             "(default: $ANDROMEDA_API_KEY)")
    parser.add_argument("--served-model-name", help="the model name clients send (default: the checkpoint "
                                                    "folder's name)")
    parser.add_argument("--chat-template", metavar="FILE",
                        help="Jinja chat template (default: the checkpoint's, if it has one)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="prompt positions read per engine step, so a long prompt does not stall the "
                             "running streams (default 256)")
    parser.add_argument("--stream-interval", type=float, default=0.02, metavar="SECONDS",
                        help="under load, send each stream's new tokens at most this often, several per event "
                             "(first tokens and endings go at once; 0: every token as it comes; default 0.02)")
    parser.add_argument("--window", type=int, metavar="W",
                        help="let sequences continue past the context, keeping a KV cache of the last W tokens "
                             "(models with relative positions; default: max_tokens is clamped to the context)")
    parser.add_argument("--sink-tokens", type=int, default=0, metavar="S",
                        help="with a sliding window, also keep the first S tokens (attention sinks)")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        help="read every prompt whole: do not reuse the prefix a free slot's KV cache shares "
                             "with it (default: reuse, reported as usage.prompt_tokens_details.cached_tokens)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's choice less one, at least 1, leaving a "
                             "core to the HTTP thread)")
    parser.add_argument("--max-body-bytes", type=int, metavar="N",
                        help="refuse larger request bodies with 413 (default: 4 MiB, or 256 bytes per token of "
                             "the model's context if that is more)")
    parser.add_argument("--max-stream-backlog", type=int, default=1024, metavar="TOKENS",
                        help="tokens a request may have generated that its client has not read; beyond them its "
                             "sequences pause (keeping their slots) until the client catches up (default 1024)")
    parser.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="close a connection whose request line and headers have not all arrived this long "
                             "after it opened or its previous response ended (default 10)")
    parser.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="SECONDS",
                        help="close an idle keep-alive connection after this long (default 5)")
    parser.add_argument("--limit-concurrency", type=int, metavar="N",
                        help="answer 503 once this many connections or requests are open (default: no limit; "
                             "--max-queue already bounds the requests that wait)")

    add_inference_arguments(parser, dtype=False)


def run(args: argparse.Namespace) -> int:
    from ..serve.server import serve

    return serve(args.checkpoint, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                 max_queue=args.max_queue, dtype=args.dtype, api_key=args.api_key,
                 served_model_name=args.served_model_name, chat_template=args.chat_template, device=args.device,
                 prefill_chunk=args.prefill_chunk, stream_interval=args.stream_interval, threads=args.threads,
                 window=args.window, sink_tokens=args.sink_tokens, quantize=args.quantize,
                 group_size=group_size_for(args.checkpoint, args.quantize, args.group_size),
                 max_body_bytes=args.max_body_bytes,
                 max_stream_backlog=args.max_stream_backlog, header_timeout=args.header_timeout,
                 timeout_keep_alive=args.timeout_keep_alive, limit_concurrency=args.limit_concurrency,
                 prefix_cache=args.prefix_cache)


def _api_key(value: str) -> str:
    """--api-key (or ANDROMEDA_API_KEY, which argparse passes here too): an empty key would turn
    authentication off without a word, so it is refused."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the key is empty (from --api-key or ANDROMEDA_API_KEY), which would "
                                         "leave the API open to anyone; give a key, or unset both to serve "
                                         "without one")
    return value
