"""Serving: an OpenAI-compatible HTTP server with continuous batching (`andromeda serve`).

Split as vLLM splits it:

    config.py         ServeConfig: every serving option, validated once; `andromeda serve`'s flags come from it
    protocol.py       request schemas (validated), responses, stream chunks, OpenAI's error shape
    scheduler.py      plans each step (admit, prefix reuse, decode rows, a prefill chunk) and records its
                      results, the one place that decides a sequence is finished; plain Python, no tensors
    runner.py         the model runner: executes a plan (the step's tensors, the model, per-row sampling)
    core.py           EngineCore.step = schedule -> execute -> update (vLLM's EngineCore)
    engine.py         the thread that owns the engine core: inbox, steps, per-request streams, cancellation
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

import importlib

# Loaded on first use, so that `serve.config` (torch-free) imports without PyTorch: `andromeda
# serve --help` builds its flags from ServeConfig before torch loads.
_EXPORTS = {"Engine": "engine", "EngineCore": "core", "ModelRunner": "runner", "ModelSpec": "engine",
            "Scheduler": "scheduler", "Sequence": "scheduler", "SequenceRequest": "engine",
            "ServeConfig": "config", "load_model": "engine"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
