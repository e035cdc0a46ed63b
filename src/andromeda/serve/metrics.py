"""Prometheus metrics of the server, named after vLLM's (`vllm:` becomes `andromeda_`).

Each app gets its own `CollectorRegistry`, so several servers (or tests) in one process never
share or collide on metrics. Latencies are per sequence (a request with n=2 counts twice);
recorded on the engine thread, which prometheus_client allows.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets in seconds: from a fast CPU decode step (a few ms) to a long request (minutes).
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class Metrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=_LATENCY, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram("andromeda_time_to_first_token_seconds",
                                             "Time from a request's arrival to its first new token.")
        self.inter_token_latency = histogram("andromeda_inter_token_latency_seconds",
                                             "Time between two consecutive new tokens of a sequence.")
        self.e2e_latency = histogram("andromeda_e2e_request_latency_seconds",
                                     "Time from a request's arrival to its last token.")
        self.queue_time = histogram("andromeda_request_queue_time_seconds",
                                    "Time a sequence waited for a free slot of the KV cache.")
        self.running = Gauge("andromeda_num_requests_running", "Sequences holding a slot of the KV cache.",
                             labels, registry=self.registry).labels(model_name)
        self.waiting = Gauge("andromeda_num_requests_waiting", "Sequences waiting for a slot.",
                             labels, registry=self.registry).labels(model_name)
        self.paused = Gauge("andromeda_num_requests_paused", "Sequences holding a slot but paused: their "
                            "client is --max-stream-backlog tokens behind.", labels,
                            registry=self.registry).labels(model_name)
        self.prompt_tokens = Counter("andromeda_prompt_tokens", "Prompt tokens read into the KV cache "
                                     "(or scored).", labels, registry=self.registry).labels(model_name)
        # vLLM's prefix_cache_queries / prefix_cache_hits: hits / queries is the hit rate.
        self.prefix_cache_queries = Counter("andromeda_prefix_cache_queries", "Prompt tokens looked up in the "
                                            "prefix cache (not with --no-prefix-cache, nor for prompt "
                                            "logprobs).", labels, registry=self.registry).labels(model_name)
        self.prefix_cache_hits = Counter("andromeda_prefix_cache_hits", "Prompt tokens found in the prefix "
                                         "cache: reused, not prefilled.", labels,
                                         registry=self.registry).labels(model_name)
        # vLLM's spec_decode_num_draft_tokens / _num_accepted_tokens: accepted / draft is the acceptance rate.
        self.spec_draft_tokens = Counter("andromeda_spec_decode_num_draft_tokens", "Tokens proposed by speculative "
                                         "decoding (--speculative) and verified.", labels,
                                         registry=self.registry).labels(model_name)
        self.spec_accepted_tokens = Counter("andromeda_spec_decode_num_accepted_tokens", "Proposed tokens the model "
                                            "accepted.", labels, registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("andromeda_generation_tokens", "Tokens generated.",
                                         labels, registry=self.registry).labels(model_name)
        self.iteration_tokens = Histogram("andromeda_iteration_tokens_total", "Tokens per engine step "
                                          "(prompt tokens read plus tokens generated).", labels,
                                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                                          registry=self.registry).labels(model_name)
        self.decode_batch_size = Histogram("andromeda_decode_batch_size", "Sequences decoded together in one "
                                           "engine step.", labels, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                           registry=self.registry).labels(model_name)
        self._success = Counter("andromeda_request_success", "Sequences finished, by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self._model_name = model_name

    def finished(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()
