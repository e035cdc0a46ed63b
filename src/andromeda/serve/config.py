"""`ServeConfig`: every option of `andromeda serve`, validated on construction, in one place.

Each field's help text is its metadata: `andromeda serve --help` builds its flags from these fields
(as `andromeda train` builds its own from `TrainConfig`), and the server, the engine, the
scheduler and the model runner all read their settings from one ServeConfig, so a default lives
here and nowhere else. The model to serve is not a field (`serve(checkpoint, config)`), nor how it
loads (`--quantize`, `--group-size`: the options every inference command shares).

Torch-free: `andromeda serve --help` answers before PyTorch loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..choices import DTYPE_NAMES, KV_CACHE_DTYPES, MAX_SPECULATIVE_TOKENS


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A field with its command-line help; in `kwargs` the flag's metavar, its choices, a `flag`
    spelled otherwise than the field (--no-prefix-cache), or cli=False for a field with no flag."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class ServeConfig:
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on; 0 picks a free one")
    max_batch_size: int = option(16, "sequences decoded together: the KV cache's slots", metavar="N")
    max_queue: int = option(256, "sequences that may wait for a slot; beyond them requests get 503", metavar="N")
    dtype: str | None = option(None, "weights and KV cache (default: as saved; bf16 on CUDA and when quantizing)",
                               choices=sorted(DTYPE_NAMES))
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on the API routes (/v1/*, /tokenize, "
                                       "/detokenize, /tokenizer_info; /health, /metrics and /openapi.json stay "
                                       "open); must not be empty (default: $ANDROMEDA_API_KEY)", metavar="KEY")
    served_model_name: str | None = option(None, "the model name clients send (default: the checkpoint folder's "
                                                 "name)", metavar="NAME")
    chat_template: str | None = option(None, "Jinja chat template (default: the checkpoint's, if it has one)",
                                       metavar="FILE")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    prefill_chunk: int = option(256, "prompt positions read per engine step, so a long prompt does not stall the "
                                     "running streams", metavar="N")
    stream_interval: float = option(0.02, "under load, send each stream's new tokens at most this often, several "
                                          "per event (first tokens and endings go at once; 0: every token as it "
                                          "comes)", metavar="SECONDS")
    window: int | None = option(None, "let sequences continue past the context, keeping a KV cache of the last W "
                                      "tokens (models with relative positions; default: max_tokens is clamped to "
                                      "the context)", metavar="W")
    sink_tokens: int = option(0, "with a sliding window, also keep the first S tokens (attention sinks)",
                              metavar="S")
    prefix_cache: bool = option(True, "read every prompt whole: do not reuse the prefix a free slot's KV cache "
                                      "shares with it (default: reuse, reported as "
                                      "usage.prompt_tokens_details.cached_tokens)", flag="--no-prefix-cache")
    speculative: str | None = option(None, "speculative decoding: ngram proposes the continuation of the latest "
                                           "earlier match of each sequence's last tokens in its prompt and output "
                                           "(prompt lookup), draft the tokens of a smaller model "
                                           "(--draft-checkpoint); one forward checks every row's proposals. Same "
                                           "greedy text, same sampling distribution", choices=["ngram", "draft"])
    draft_checkpoint: str | None = option(None, "the draft model of --speculative draft: a smaller full-precision "
                                                "checkpoint with the same tokenizer", metavar="DIR")
    num_speculative_tokens: int = option(4, "with --speculative: tokens proposed per row and step, at most; fewer, "
                                            "or none for a while, where few are accepted", metavar="K")
    kv_cache_dtype: str = option("auto", "what the KV cache stores: auto (the weights' dtype) or int8 (a scale per "
                                         "token and head: half the memory of bf16, more slots or longer contexts "
                                         "in the same memory; slower to read)", choices=list(KV_CACHE_DTYPES))
    threads: int | None = option(None, "torch intra-op threads (default: torch's choice less one, at least 1, "
                                       "leaving a core to the HTTP thread)", metavar="N")
    max_body_bytes: int | None = option(None, "refuse larger request bodies with 413 (default: 4 MiB, or 256 bytes "
                                              "per token of the model's context if that is more)", metavar="N")
    max_stream_backlog: int = option(1024, "tokens a request may have generated that its client has not read; "
                                           "beyond them its sequences pause (keeping their slots) until the "
                                           "client catches up", metavar="TOKENS")
    header_timeout: float = option(10.0, "close a connection whose request line and headers have not all arrived "
                                         "this long after it opened or its previous response ended",
                                   metavar="SECONDS")
    timeout_keep_alive: float = option(5.0, "close an idle keep-alive connection after this long",
                                       metavar="SECONDS")
    limit_concurrency: int | None = option(None, "answer 503 once this many connections or requests are open "
                                                 "(default: no limit; --max-queue already bounds the requests "
                                                 "that wait)", metavar="N")

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty, which would leave the API open to anyone; give a key, or leave "
                             "out --api-key (and ANDROMEDA_API_KEY) to serve without one")
        for name, low in (("max_batch_size", 1), ("max_queue", 0), ("prefill_chunk", 1), ("port", 0),
                          ("threads", 1), ("max_body_bytes", 1), ("max_stream_backlog", 1),
                          ("limit_concurrency", 1), ("sink_tokens", 0), ("window", 1),
                          ("num_speculative_tokens", 1)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{flag(name)} must be a whole number, got {value!r}")
            if value < low:
                raise ValueError(f"{flag(name)} must be >= {low}, got {value}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"--num-speculative-tokens must be <= {MAX_SPECULATIVE_TOKENS}, got "
                             f"{self.num_speculative_tokens}")
        if self.speculative not in (None, "ngram", "draft"):
            raise ValueError(f"--speculative must be ngram or draft, got {self.speculative!r}")
        if (self.speculative == "draft") != (self.draft_checkpoint is not None):
            raise ValueError("--speculative draft needs --draft-checkpoint DIR, and --draft-checkpoint goes with "
                             "--speculative draft only")
        if self.speculative is not None:
            if self.window is not None:
                raise ValueError("--speculative with --window: speculative decoding keeps every token in view; "
                                 "leave out one of them")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.port > 65535:
            raise ValueError(f"--port must be <= 65535, got {self.port}")
        if not (isinstance(self.stream_interval, (int, float)) and self.stream_interval >= 0):
            raise ValueError(f"--stream-interval must be >= 0 seconds, got {self.stream_interval!r}")
        for name in ("header_timeout", "timeout_keep_alive"):
            seconds = getattr(self, name)
            if not (isinstance(seconds, (int, float)) and seconds > 0):
                raise ValueError(f"{flag(name)} must be > 0 seconds, got {seconds!r}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.sink_tokens and self.window is None:
            raise ValueError(f"--sink-tokens {self.sink_tokens} needs --window: the sinks are the tokens a "
                             f"sliding window keeps for good")
        if self.window is not None and self.window < self.sink_tokens + 1:
            raise ValueError(f"--window {self.window} must be at least --sink-tokens + 1 = {self.sink_tokens + 1}: "
                             f"it holds the sink tokens plus at least one recent token")

    @property
    def slides(self) -> bool:
        """Sequences continue past the model's context, on a ring-buffer KV cache."""
        return self.window is not None

    def replace(self, **changes: Any) -> ServeConfig:
        return dataclasses.replace(self, **changes)


def flag(name: str) -> str:
    """The command-line flag of a ServeConfig field."""
    metadata = next(f.metadata for f in dataclasses.fields(ServeConfig) if f.name == name)
    return metadata.get("flag", "--" + name.replace("_", "-"))
