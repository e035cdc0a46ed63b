"""The model core: configuration-driven modules with no knowledge of training, checkpoints, data,
processes or the command line.

    positions.py    ALiBi slopes and biases, rotary xPos tables
    attention.py    grouped-query attention with QK-norm; fused and reference paths
    cache.py        the per-slot KV cache
    fused.py        the feed-forward's lean backward and its shared workspace
    loss.py         the chunked fused linear cross-entropy
    transformer.py  LayerNorm, FeedForward, Block, Transformer; build_transformer, check_tokens
"""

from .cache import KVCache
from .loss import IGNORE_INDEX, linear_cross_entropy, projected_cross_entropy
from .transformer import Transformer, build_transformer, check_tokens

__all__ = ["IGNORE_INDEX", "KVCache", "Transformer", "build_transformer", "check_tokens",
           "linear_cross_entropy", "projected_cross_entropy"]
