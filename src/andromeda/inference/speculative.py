"""Speculative decoding: check K guessed tokens with one forward of the target, keep what it agrees with.

Shape letters: B rows, T = K + 1 positions verified per row, V vocabulary.

A decode step of a large model reads every weight to produce one token, so memory bandwidth caps
it; a forward over K + 1 positions reads them once too and costs little more. A proposer
(`proposers`: prompt lookup, or a draft model) guesses K tokens d1..dK; the target runs once over
[last token, d1..dK] from its KV cache and gives the next-token logits after each of them; the
row keeps the guesses the target agrees with plus one token of the target's own, then its cache
slot is cut back (`KVCache.truncate`) to what it kept. Every step therefore emits between 1 and
K + 1 tokens for one target forward.

Acceptance, per row (`accept_row`, or `accept_greedy` / `accept_sampled` directly):
- greedy: the longest prefix of the proposal equal to the target's argmax at each position, then
  the target's argmax after it: token for token what ordinary greedy decoding gives.
- sampling: the rejection rule of Leviathan et al. 2023 (https://arxiv.org/abs/2211.17192) and
  Chen et al. 2023 (https://arxiv.org/abs/2302.01318): accept d_i with probability
  min(1, p(d_i) / q(d_i)); at the first rejection draw from norm(max(0, p - q)) and stop; if all K
  are accepted draw one more from p. The emitted tokens are then distributed exactly as ordinary
  sampling from p. p is the target's distribution after the same penalties, temperature, top-k,
  top-p and min-p as ordinary sampling, the penalties counting the proposed tokens before each
  position; q is the draft's distribution, or a point mass (q(d_i) = 1) for prompt lookup.
  Seeded runs are reproducible but draw differently from ordinary sampling (other random numbers).

Adaptivity (`SpeculationPolicy`, one per row): K shrinks as the row's acceptance rate falls
(about one more token than the rate leads one to expect to be accepted), and below
MIN_ACCEPTANCE the row stops proposing for a while (1, 2, 4 ... 32 plain steps between tries), so
text that never repeats its input pays almost nothing. A row without a proposal takes a plain
one-token step (still through the same forward).

Limits: every token stays in view (the prompt plus the new tokens must fit in max_seq_len: no
sliding window); the eager forward (no torch.compile). `speculative_stream` prefills row by row
and verifies all unfinished rows in one batched forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..choices import MAX_SPECULATIVE_TOKENS
from ..model import KVCache, Transformer, check_tokens
from .kv_attention import decode_attention_for
from .native import decode_sdpa_for
from .proposers import DraftProposer, NgramProposer
from .sampling import SamplingParams, TokenCounts, filter_logits, greedy_tokens, penalize, sample

MIN_ACCEPTANCE = 0.3  # below this share of proposed tokens accepted, a row pauses its proposals
MAX_PAUSE = 32  # the longest run of plain steps between two tries

__all__ = ["MAX_SPECULATIVE_TOKENS", "SpeculationPolicy", "SpeculationStats", "accept_greedy", "accept_row",
           "accept_sampled", "check_draft", "check_num_speculative_tokens", "position_logits",
           "speculative_generate", "speculative_stream", "verify"]


# ----------------------------------------------------------------------------- acceptance (per row)


def accept_greedy(proposal: Sequence[int], target: Sequence[int]) -> list[int]:
    """The tokens a greedy row emits: the longest prefix of `proposal` (k ids) that equals the
    target's argmax `target` (k + 1 ids: after the last token, then after each proposed one),
    followed by the target's own next token. 1 to k + 1 ids."""
    accepted = 0
    while accepted < len(proposal) and proposal[accepted] == target[accepted]:
        accepted += 1
    return [*proposal[:accepted], int(target[accepted])]


def accept_sampled(proposal: Sequence[int], p: Tensor, q: Tensor | None,
                   generator: torch.Generator | None = None) -> list[int]:
    """The tokens a sampling row emits under the rejection rule (module docstring).

    proposal: k ids; p: (k + 1, V) the target's probabilities at each position; q: (k, V) the
    distributions the proposals were drawn from, or None for a point mass on each (prompt
    lookup). Draws from `generator` (None: the global RNG). 1 to k + 1 ids."""
    k = len(proposal)
    index = torch.tensor(proposal, dtype=torch.long, device=p.device)
    p_x = p[:k].gather(1, index[:, None]).squeeze(1)  # (k,)
    q_x = torch.ones_like(p_x) if q is None else q.gather(1, index[:, None]).squeeze(1)
    u = torch.rand(k, generator=generator, device=p.device)
    rejected = (u * q_x >= p_x).nonzero()  # u < p/q accepts (q_x > 0: d_i was drawn from q)
    accepted = int(rejected[0]) if len(rejected) else k
    if accepted == k:
        residual = p[k]
    else:
        residual = p[accepted].clone()
        if q is None:
            residual[proposal[accepted]] = 0  # max(0, p - onehot)
        else:
            residual = (residual - q[accepted]).clamp(min=0)
        if not residual.sum() > 0:  # p <= q everywhere: then p = q and nothing is rejected but by rounding
            residual = p[accepted]
    last = torch.multinomial(residual / residual.sum(), 1, generator=generator)
    return [*proposal[:accepted], int(last)]


class _PositionCounts(NamedTuple):
    """What `penalize` reads, one row per verified position."""

    seen: Tensor  # (T, V) bool
    output: Tensor  # (T, V) int32


def position_logits(logits: Tensor, proposal: Sequence[int], params: SamplingParams,
                    counts: TokenCounts | None, row: int = 0) -> Tensor:
    """A row's verify logits (T, V), T = k + 1, with `params`' penalties applied as ordinary
    decoding would at each position: the counts of row `row` of `counts` (the sequence so far)
    plus the proposed tokens before that position. Unchanged (fp32) when no penalty is set."""
    if counts is None or not params.penalized:
        return logits.float()
    T, V = logits.shape
    extra = torch.zeros(T, V, dtype=torch.int32, device=logits.device)
    if proposal:
        before = torch.arange(1, len(proposal) + 1, device=logits.device)
        extra[before, torch.tensor(proposal, device=logits.device)] = 1
        extra = extra.cumsum(dim=0, dtype=torch.int32)  # position i: proposal[:i]
    output = counts.output[row : row + 1] + extra
    seen = counts.seen[row : row + 1] | (extra > 0)
    return penalize(logits, _PositionCounts(seen, output), params)


def accept_row(proposal: Sequence[int], logits: Tensor, params: SamplingParams, *,
               counts: TokenCounts | None = None, row: int = 0, q: Tensor | None = None,
               generator: torch.Generator | None = None) -> list[int]:
    """The tokens one row emits from its verify logits (k + 1, V): penalties per position
    (`position_logits`), then `accept_greedy` on the argmax when `params` is greedy, else
    `accept_sampled` on the filtered distributions. q: the draft's (k, V); None: a point mass."""
    logits = position_logits(logits, proposal, params, counts, row)
    if params.greedy:
        return accept_greedy(proposal, greedy_tokens(logits).tolist())
    p = filter_logits(logits, params).softmax(dim=-1)
    return accept_sampled(proposal, p, q, generator)


# ----------------------------------------------------------------------------- the verify forward


def verify(net: Transformer, cache: KVCache, slots: Sequence[int], rows: Sequence[Sequence[int]]) -> list[Tensor]:
    """One forward of the target over each row's [last token, proposal...] at its slot's next
    positions, writing their keys: the logits after each, a (len(row), V) tensor per row.

    Rows of different lengths are right-padded within the call: masked out, at the positions
    after the row's (with learned absolute positions, at most the last one), so `truncate` cuts
    the padding off with the rejected tokens. The caller truncates every slot to what its row
    kept, which must end before max_seq_len for such a model."""
    T = max(len(row) for row in rows)
    device = cache.valid.device
    tokens = torch.tensor([[*row, *[row[-1]] * (T - len(row))] for row in rows], dtype=torch.long, device=device)
    positions = key_mask = None
    if any(len(row) < T for row in rows):
        lengths = torch.tensor([len(row) for row in rows], device=device)[:, None]  # (B, 1)
        offsets = torch.arange(T, device=device)[None]  # (1, T)
        slot_index = torch.tensor(list(slots), dtype=torch.long, device=device)
        positions = cache.next_position[slot_index][:, None] + offsets  # (B, T)
        if net.config.use_abs_pos_emb:  # padding past the learned positions: at the last one
            positions = positions.clamp(max=net.config.max_seq_len - 1)
        key_mask = offsets < lengths
    logits = net(tokens, positions, key_mask=key_mask, cache=cache, slots=list(slots), logits_to_keep=T,
                 validate=False)  # (B, T, V)
    return [logits[i, : len(row)] for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------- adaptivity and counts


class SpeculationPolicy:
    """How many tokens one row proposes next (`k()`, 0 = a plain step), from its acceptance so far
    (`update`): see the module docstring."""

    def __init__(self, max_tokens: int, min_acceptance: float = MIN_ACCEPTANCE) -> None:
        check_num_speculative_tokens(max_tokens)
        self.max_tokens, self.min_acceptance = max_tokens, min_acceptance
        self.rate = 1.0  # moving average of the share of proposed tokens accepted; optimistic at first
        self._pause, self._backoff = 0, 1

    def k(self) -> int:
        if self._pause:
            self._pause -= 1
            return 0
        a = self.rate
        if a >= 0.95:
            return self.max_tokens
        # Propose one token more than the number a row with this rate expects to accept, a / (1 - a).
        return min(self.max_tokens, max(1, math.ceil(a / (1 - a)) + 1))

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.rate = 0.5 * self.rate + 0.5 * accepted / proposed
        if self.rate < self.min_acceptance:
            self._pause, self._backoff = self._backoff, min(2 * self._backoff, MAX_PAUSE)
            self.rate = self.min_acceptance  # the try after the pause decides with its own result
        elif accepted:
            self._backoff = 1


@dataclass
class SpeculationStats:
    """What a speculative generation did, summed over its rows."""

    proposed: int = 0  # tokens proposed and verified
    accepted: int = 0  # of them, accepted
    steps: int = 0  # target forwards per row: its prefill, then verify (or plain) steps
    tokens: int = 0  # tokens emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def describe(self) -> str:
        return (f"{self.accepted} of {self.proposed} proposed tokens accepted ({100 * self.acceptance_rate:.1f}%), "
                f"{self.tokens} tokens in {self.steps} target steps ({self.tokens / max(self.steps, 1):.2f} per step)")


def check_num_speculative_tokens(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"the number of speculative tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], "
                         f"got {k!r}")


def check_draft(target: Transformer, draft: Transformer, target_name: str = "the target model",
                draft_name: str = "the draft model") -> None:
    """Refuse a draft whose vocabulary differs from the target's: its ids would mean other tokens.
    (The command line also compares their tokenizer files.)"""
    if draft.config.num_tokens != target.config.num_tokens:
        raise ValueError(f"the draft model must have the target's vocabulary: {draft_name} has "
                         f"{draft.config.num_tokens} token ids, {target_name} {target.config.num_tokens}")
    if draft.token_emb.weight.device != target.token_emb.weight.device:
        raise ValueError(f"the draft model is on {draft.token_emb.weight.device}, the target on "
                         f"{target.token_emb.weight.device}; load both on one device")


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Plan:
    """A checked request: what every step of the loop reads."""

    net: Transformer
    draft: Transformer | None
    seq_len: int
    k_max: int
    adaptive: bool
    params: SamplingParams
    stops: frozenset[int]
    generator: torch.Generator | None
    stats: SpeculationStats
    kv_dtype: str = "auto"  # what the model's KV cache stores (the draft's keeps the compute dtype)


@dataclass
class _Row:
    """One sequence: its tokens, its proposal policy, and its penalties' counts."""

    ids: list[int]  # prompt and output so far
    prompt_len: int
    policy: SpeculationPolicy
    ngram: NgramProposer | None  # None with a draft model
    counts: TokenCounts | None  # None without penalties
    done: bool = False

    @property
    def produced(self) -> int:
        return len(self.ids) - self.prompt_len


def speculative_stream(
    net: Transformer,
    prompts: Sequence[Sequence[int]] | Tensor,
    seq_len: int,
    *,
    draft: Transformer | None = None,
    num_speculative_tokens: int = 4,
    adaptive: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    stats: SpeculationStats | None = None,
    kv_cache_dtype: str = "auto",
) -> Iterator[list[list[int]]]:
    """Generate up to `seq_len` new tokens after each prompt by speculative decoding; yield, after
    each target forward, the list of tokens every row gained (empty for a finished row).

    Proposals come from prompt lookup (`NgramProposer`), or from `draft` (a smaller model with the
    same vocabulary) when given. Sampling arguments and `eos_token` are `generate`'s: a row ends
    after a stop id or after seq_len tokens. `adaptive=False` always proposes K tokens. `stats`,
    when given, is filled in as the generation runs. Arguments are checked at the call.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, frequency_penalty, presence_penalty, repetition_penalty)
    check_num_speculative_tokens(num_speculative_tokens)
    rows = _prompt_rows(net, prompts)
    _check_length(net, rows, seq_len, "the model")
    if draft is not None:
        check_draft(net, draft)
        _check_length(draft, rows, seq_len, "the draft model")
    stops = frozenset() if eos_token is None else frozenset(_ids(eos_token, net.config.num_tokens))
    plan = _Plan(net, draft, seq_len, num_speculative_tokens, bool(adaptive), params, stops, generator,
                 stats if stats is not None else SpeculationStats(), kv_cache_dtype)
    return _speculate(plan, rows)


def speculative_generate(net: Transformer, prompts: Sequence[Sequence[int]] | Tensor, seq_len: int, *,
                         pad_value: int | None = None, **kwargs) -> Tensor:
    """`speculative_stream`'s tokens as `generate` returns them: (B, seq_len) long, the positions
    after a row's stop id holding `pad_value` (default: the first eos id, else 0)."""
    eos = kwargs.get("eos_token")
    if pad_value is None:
        pad_value = 0 if eos is None else _ids(eos, net.config.num_tokens)[0]
    outputs: list[list[int]] | None = None
    for gained in speculative_stream(net, prompts, seq_len, **kwargs):
        outputs = [[] for _ in gained] if outputs is None else outputs
        for out, tokens in zip(outputs, gained):
            out.extend(tokens)
    result = torch.full((len(outputs), seq_len), pad_value, dtype=torch.long)
    for i, out in enumerate(outputs):
        result[i, : len(out)] = torch.tensor(out, dtype=torch.long)
    return result


@torch.inference_mode()
def _speculate(plan: _Plan, prompts: list[list[int]]) -> Iterator[list[list[int]]]:
    """The loop, with the models in eval mode (their modes restored after)."""
    models = [net for net in (plan.net, plan.draft) if net is not None]
    was_training = [net.training for net in models]
    for net in models:
        net.eval()
    try:
        yield from _decode(plan, prompts)
    finally:
        for net, mode in zip(models, was_training):
            net.train(mode)


def _decode(plan: _Plan, prompts: list[list[int]]) -> Iterator[list[list[int]]]:
    net, params = plan.net, plan.params
    weight = net.token_emb.weight
    # Every token but the last is fed; a row padded to a longer row's proposal takes up to k_max more.
    capacity = max(map(len, prompts)) + plan.seq_len - 1 + plan.k_max
    cache = KVCache(net.config, len(prompts), capacity, dtype=weight.dtype, device=weight.device, kv_dtype=plan.kv_dtype)
    cache.decode_attention = decode_attention_for(cache)  # int8 on the CPU: a step with no proposal
    cache.decode_sdpa = decode_sdpa_for(cache)
    drafter = DraftProposer(plan.draft, len(prompts), capacity) if plan.draft is not None else None
    min_acceptance = MIN_ACCEPTANCE if plan.adaptive else 0.0
    rows = [_Row(list(ids), len(ids), SpeculationPolicy(plan.k_max, min_acceptance),
                 NgramProposer() if drafter is None else None,
                 TokenCounts(torch.tensor([ids], device=weight.device), net.config.num_tokens)
                 if params.penalized else None) for ids in prompts]
    first = []
    for slot, row in enumerate(rows):  # the prefill, row by row; the first token as `generate` draws it
        logits = _prefill(net, cache, slot, row.ids)
        if row.counts is not None:
            logits = penalize(logits, row.counts, params)
        first.append(_emit(plan, row, [int(sample(logits, params, plan.generator))]))
    yield first
    while not all(row.done for row in rows):
        active = [slot for slot, row in enumerate(rows) if not row.done]
        proposals = [_propose(plan, rows[slot], slot, drafter) for slot in active]
        logits = verify(net, cache, active, [[rows[slot].ids[-1], *proposal]
                                             for slot, (proposal, _) in zip(active, proposals)])
        gained = [[] for _ in rows]
        for slot, (proposal, q), row_logits in zip(active, proposals, logits):
            row = rows[slot]
            tokens = accept_row(proposal, row_logits, params, counts=row.counts, q=q, generator=plan.generator)
            row.policy.update(len(proposal), len(tokens) - 1)
            plan.stats.proposed += len(proposal)
            plan.stats.accepted += len(tokens) - 1
            gained[slot] = _emit(plan, row, tokens)
            cache.truncate(slot, len(row.ids) - 1)  # the cache holds every token but the last
        yield gained


def _propose(plan: _Plan, row: _Row, slot: int, drafter: DraftProposer | None) -> tuple[list[int], Tensor | None]:
    """A row's proposal and its q (None: greedy or a point mass): no more tokens than the row
    still needs after the target's own one."""
    k = min(row.policy.k(), plan.seq_len - row.produced - 1)
    if k < 1:
        return [], None
    if drafter is not None:
        return drafter.propose(slot, row.ids, k, plan.params, plan.generator)
    return row.ngram.propose(row.ids, k), None


def _emit(plan: _Plan, row: _Row, tokens: list[int]) -> list[int]:
    """Append a step's `tokens` to the row, up to its first stop id and seq_len: those appended."""
    kept = []
    for token in tokens[: plan.seq_len - row.produced]:
        kept.append(token)
        if token in plan.stops:
            break
    row.ids.extend(kept)
    row.done = row.produced >= plan.seq_len or (bool(kept) and kept[-1] in plan.stops)
    if row.counts is not None:
        for token in kept:  # one at a time: `add` counts one token per row
            row.counts.add(torch.tensor([token], device=row.counts.output.device))
    plan.stats.tokens += len(kept)
    plan.stats.steps += 1
    return kept


def _prefill(net: Transformer, cache: KVCache, slot: int, ids: list[int]) -> Tensor:
    """Run one prompt into its slot, in chunks the cache takes: the next logits (1, V)."""
    device = cache.valid.device
    for start in range(0, len(ids), cache.max_new_positions):
        tokens = torch.tensor([ids[start : start + cache.max_new_positions]], dtype=torch.long, device=device)
        logits = net(tokens, cache=cache, slots=[slot], logits_to_keep=1, validate=False)[:, -1]
    return logits


def _prompt_rows(net: Transformer, prompts) -> list[list[int]]:
    """Each prompt as a list of ids, checked against the model's vocabulary."""
    if isinstance(prompts, Tensor):
        prompts = [prompts] if prompts.ndim == 1 else list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a (B, N) tensor of token ids or a non-empty list of 1-D prompts "
                        "(encode text with a tokenizer first)")
    rows = []
    for i, row in enumerate(prompts):
        row = row if isinstance(row, Tensor) else torch.tensor(row, dtype=torch.long)
        if row.ndim != 1 or row.numel() == 0:
            raise ValueError(f"prompts[{i}] must be non-empty 1-D token ids, got shape {tuple(row.shape)}")
        check_tokens(row[None], net.config)
        rows.append(row.tolist())
    return rows


def _check_length(net: Transformer, rows: list[list[int]], seq_len: int, name: str) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len (the number of new tokens) must be an integer >= 1, got {seq_len!r}")
    total = max(map(len, rows)) + seq_len
    if total > net.config.max_seq_len:
        raise ValueError(f"speculative decoding keeps every token in view, with no sliding window: prompt length "
                         f"{max(map(len, rows))} + {seq_len} new tokens = {total} exceeds {name}'s max_seq_len="
                         f"{net.config.max_seq_len}; shorten the prompt, ask for fewer tokens, or decode without "
                         f"speculation")


def _ids(value: int | Sequence[int], vocab: int) -> list[int]:
    ids = [value] if isinstance(value, int) else [int(i) for i in value]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad or not ids:
        raise ValueError(f"eos_token must be a token id or a non-empty list of ids in [0, {vocab}), got {value!r}")
    return ids
