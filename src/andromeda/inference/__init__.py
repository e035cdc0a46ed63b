"""Inference: sampling, generation with a KV cache, and weight-only quantization."""

from .generate import IncrementalDecoder, generate, stream, stream_text
from .sampling import SamplingParams, filter_logits, sample

__all__ = ["IncrementalDecoder", "SamplingParams", "filter_logits", "generate", "sample", "stream",
           "stream_text"]
