"""The AutoRegressiveWrapper: the next-token loss over a Transformer, and generation from it.

The Transformer maps tokens to logits (or to the loss of given targets); this wrapper shifts a
sequence into inputs and targets, and hands generation to `andromeda.inference`, which owns
sampling and the KV cache's lifecycle.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config
from .inference.generate import generate, stream
from .model import Transformer, check_tokens


class LMOutput(NamedTuple):
    loss: Tensor  # scalar, mean next-token cross-entropy in nats
    logits: Tensor  # (B, T - 1, V): the predictions for tokens[:, 1:]


class AutoRegressiveWrapper(nn.Module):
    def __init__(self, net: Transformer) -> None:
        super().__init__()
        self.net = net

    @property
    def config(self) -> Config:
        return self.net.config

    def forward(self, tokens: Tensor, *, return_logits: bool = False) -> Tensor | LMOutput:
        """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1].

        `tokens` is (B, T) with 2 <= T <= max_seq_len + 1 (the inputs are the first T - 1).
        Returns the scalar loss, or `LMOutput(loss, logits)` with `return_logits=True`.
        """
        check_tokens(tokens, self.config, max_len=self.config.max_seq_len + 1)
        if tokens.shape[1] < 2:
            raise ValueError(f"the loss needs at least 2 tokens per sequence, got {tokens.shape[1]}")
        inputs, targets = tokens[:, :-1], tokens[:, 1:].long()
        if return_logits:
            logits = self.net(inputs, validate=False)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            return LMOutput(loss, logits)
        return self.net(inputs, targets=targets, validate=False)

    def generate(self, prompts, seq_len: int, **kwargs) -> Tensor:
        """Sample `seq_len` new tokens after each prompt; see `andromeda.inference.generate`."""
        return generate(self.net, prompts, seq_len, **kwargs)

    def stream(self, prompts, seq_len: int, **kwargs):
        """Yield each step's new tokens (B,) as they are sampled; see `inference.generate.stream`."""
        return stream(self.net, prompts, seq_len, **kwargs)
