"""Sampling: how the next token is drawn from the logits.

Filters apply in the order temperature, top-k, top-p, min-p; each sees the distribution the
previous ones left. A temperature below `SAMPLING_EPS` (0 included) is greedy decoding and
ignores the filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Temperatures below this are greedy, as in vLLM (its _SAMPLING_EPS, 1e-5): dividing fp32 logits
# by a smaller one can overflow to inf (1e-300 turns every logit into +-inf, softmax into NaN and
# multinomial into an error), and the distribution it stands for is the argmax anyway.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn from the logits; validated on construction.

    temperature: divides the logits; below SAMPLING_EPS (0 included) means greedy (argmax), and
        then the filters do nothing.
    top_k: keep the k most likely tokens (Fan et al. 2018, https://arxiv.org/abs/1805.04833).
    top_p: nucleus sampling, keep the smallest set of most likely tokens whose probability reaches
        top_p (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751).
    min_p: keep tokens at least min_p times as likely as the most likely one (Nguyen et al. 2024,
        https://arxiv.org/abs/2407.01082).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")
        m = self.min_p
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1):
            raise ValueError(f"min_p must be in [0, 1] or None, got {m!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, top-p and min-p: (B, V) fp32 logits with the dropped ones at -inf.

    Ties at the top-k boundary are all kept. The most likely token always survives every filter.
    Greedy params keep only the most likely tokens (the limit of a vanishing temperature).
    """
    if params.greedy:
        logits = logits.float()
        return logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True), -math.inf)
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if params.top_k is not None and params.top_k < vocab:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly likelier tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= params.top_p, -math.inf)
        logits = logits.scatter(-1, order, sorted_logits)
    if params.min_p:
        probs = logits.softmax(dim=-1)
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
        logits = logits.masked_fill(probs < threshold, -math.inf)
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token id per row from (B, V) logits: (B,) long.

    Draws come from `generator`, or from the global RNG (`torch.manual_seed`) when it is None.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
