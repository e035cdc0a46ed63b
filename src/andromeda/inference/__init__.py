"""Inference: sampling, generation with a KV cache, weight-only quantization (`quantize`: int8,
int4) and bf16 Linears prepacked for oneDNN (`packed`)."""

from .generate import IncrementalDecoder, generate, stream, stream_text
from .packed import prepack, prepack_if_supported, unpack
from .sampling import SamplingParams, filter_logits, sample

__all__ = ["IncrementalDecoder", "SamplingParams", "filter_logits", "generate", "prepack", "prepack_if_supported",
           "sample", "stream", "stream_text", "unpack"]
