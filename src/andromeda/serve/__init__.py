"""Serving: an OpenAI-compatible HTTP server with continuous batching (`andromeda serve`).

Split as vLLM splits it:

    protocol.py       request schemas (validated), responses, stream chunks, OpenAI's error shape
    scheduler.py      continuous batching over the KV cache's slots: admit, chunked prefill, decode, evict
    engine.py         the thread that owns the model: inbox, steps, per-request streams, cancellation
    detokenizer.py    incremental detokenization, stop strings, how logprobs name tokens
    chat_template.py  messages to a prompt with the checkpoint's Jinja chat template
    prompts.py        requests to engine inputs: prompts rendered and tokenized (long ones off the event
                      loop), size and context checks, sampling parameters
    metrics.py        Prometheus metrics (a registry per app)
    app.py            the FastAPI routes: completions, chat, SSE, auth, body limit, health, metrics, tokenize
    server.py         uvicorn, request-head timeouts, signals and start-up: `serve(checkpoint, ...)`

The scheduler and the engine need torch only; app and server need the serve extra
(pip install -e '.[serve]' in the andromeda checkout: fastapi, uvicorn, prometheus_client, jinja2).
"""

from .engine import Engine, ModelSpec, SequenceRequest, load_model
from .scheduler import Scheduler, Sequence

__all__ = ["Engine", "ModelSpec", "Scheduler", "Sequence", "SequenceRequest", "load_model"]
