"""Proposers for speculative decoding: where the K guessed tokens that the target checks come from.

Both work on one sequence (a row) at a time, so a batched server step can hold one per row:

- `NgramProposer`: prompt lookup (Saxena 2023, https://github.com/apoorvumang/prompt-lookup-decoding;
  vLLM's `ngram` method). The last n tokens of the sequence (prompt + output so far) are looked up
  among its earlier tokens, n from `max_n` down to `min_n`; the most recent earlier occurrence wins,
  and the K tokens that followed it are proposed. No model: where the output copies its input
  (summaries, code edits, quoting), it proposes whole passages for free. Its proposals are a point
  mass (q(x) = 1), which the rejection rule in `speculative` treats as such.
- `DraftProposer`: a smaller model with the same vocabulary (Leviathan et al. 2023,
  https://arxiv.org/abs/2211.17192) runs K steps of its own decoding over its own KV cache and
  proposes what it drew, with the distributions q it drew them from. Its cache follows the row's
  accepted tokens by `KVCache.truncate`, as the target's does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..model import KVCache, Transformer
from .native import decode_sdpa_for
from .sampling import SamplingParams, filter_logits, greedy_tokens

DEFAULT_MAX_NGRAM = 4  # longest suffix looked up (vLLM's prompt_lookup_max)
DEFAULT_MIN_NGRAM = 2  # shortest one; a single token matches too often to be worth a verify step


class NgramProposer:
    """Prompt lookup for one sequence, with an index of its n-grams kept as the sequence grows.

    `propose(ids, k)` returns up to k ids that followed the most recent earlier occurrence of the
    longest suffix of `ids` (of `max_n` down to `min_n` tokens) found; [] if none occurs. `ids`
    is the whole sequence each time; it may only grow between calls (accepted tokens are appended,
    never taken back), so each call indexes only the n-grams ending in what is new: a call costs
    O(new tokens x n), not O(sequence), in pure Python.
    """

    def __init__(self, max_n: int = DEFAULT_MAX_NGRAM, min_n: int = DEFAULT_MIN_NGRAM) -> None:
        if isinstance(min_n, bool) or not isinstance(min_n, int) or min_n < 1 or not isinstance(max_n, int) \
                or max_n < min_n:
            raise ValueError(f"n-gram sizes must be integers with 1 <= min_n <= max_n, got min_n={min_n!r}, "
                             f"max_n={max_n!r}")
        self.max_n, self.min_n = max_n, min_n
        # n-gram -> the index right after its most recent occurrence that has a token after it
        self._follows: dict[tuple[int, ...], int] = {}
        self._next_end = 1  # the n-grams ending right before each index below this are in `_follows`

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        self._index(ids)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            start = self._follows.get(tuple(ids[len(ids) - n:]))
            if start is not None:
                return list(ids[start:start + k])
        return []

    def _index(self, ids: Sequence[int]) -> None:
        """Record the n-grams that end right before index `end`, for each new end < len(ids) (a
        token follows them there). The suffix itself ends at len(ids): it never finds itself."""
        if len(ids) < self._next_end:
            raise ValueError(f"NgramProposer follows one growing sequence: it has seen {self._next_end} tokens, "
                             f"this one has {len(ids)} (make a new proposer per sequence)")
        for end in range(self._next_end, len(ids)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._follows[tuple(ids[end - n:end])] = end
        self._next_end = max(self._next_end, len(ids))


class DraftProposer:
    """A draft model's proposals for the rows of a batch, one KV cache slot per row.

    `propose(slot, ids, k, params, generator)` feeds the slot's draft cache what it does not hold
    yet of `ids` (the sequence so far), then decodes k tokens: greedily (its argmax) when `params`
    is greedy, else sampled from its distribution after `params`' temperature and filters
    (penalties are left out: the rejection rule is exact for any q the proposals are drawn from).
    Returns the ids and their distributions q (k, V) fp32, None when greedy. After the target
    accepts some of them, the next call finds the longest prefix the cache shares with the new
    `ids` and truncates the slot there, so rejected tokens cost nothing further.
    """

    def __init__(self, net: Transformer, slots: int, capacity: int) -> None:
        weight = net.token_emb.weight
        self.net = net
        self.cache = KVCache(net.config, slots, capacity, dtype=weight.dtype, device=weight.device)
        self.cache.decode_sdpa = decode_sdpa_for(self.cache)  # the draft's one-token steps, on the CPU
        self._cached: list[list[int]] = [[] for _ in range(slots)]  # the ids each slot holds, by position

    def reset(self, slot: int) -> None:
        """Free `slot` for another sequence."""
        self.cache.reset([slot])
        self._cached[slot] = []

    def propose(self, slot: int, ids: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None = None) -> tuple[list[int], Tensor | None]:
        if k < 1:
            return [], None
        logits = self._feed(slot, list(ids))
        tokens, probs = [], []
        for i in range(k):
            if params.greedy:
                token = int(greedy_tokens(logits))
            else:
                q = filter_logits(logits[None], params).softmax(dim=-1)[0]  # (V,)
                token = int(torch.multinomial(q, 1, generator=generator))
                probs.append(q)
            tokens.append(token)
            if i < k - 1:
                logits = self._step(slot, [token])
        return tokens, (torch.stack(probs) if probs else None)

    def _feed(self, slot: int, ids: list[int]) -> Tensor:
        """Make the slot hold `ids`: keep the longest prefix it already shares with them (short of
        the last token, which is always fed for its logits), feed the rest: the next logits (V,)."""
        cached = self._cached[slot]
        limit = min(len(cached), len(ids) - 1)
        shared = limit if cached[:limit] == ids[:limit] else _shared_prefix(cached, ids, limit)
        self.cache.truncate(slot, shared)
        del cached[shared:]
        chunk = self.cache.max_new_positions
        for start in range(shared, len(ids), chunk):
            logits = self._step(slot, ids[start:start + chunk])
        return logits

    def _step(self, slot: int, tokens: list[int]) -> Tensor:
        """Append `tokens` to the slot at its next positions: the last one's next logits (V,)."""
        device = self.cache.valid.device
        batch = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        logits = self.net(batch, cache=self.cache, slots=[slot], logits_to_keep=1, validate=False)
        self._cached[slot].extend(tokens)
        return logits[0, -1]


def _shared_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many first ids `a` and `b` share, at most `limit`."""
    return next((i for i in range(limit) if a[i] != b[i]), limit)
