"""The scheduler: which sequences run this step, in which KV-cache slots, with which tokens; and,
once the model runner has run the plan, what became of each sequence. Plain Python, no tensors.

The engine core (`core.EngineCore`) repeats vLLM's `EngineCore.step` (SGLang's
`get_next_batch_to_run` / `run_batch` / `process_batch_result`):

    plan = scheduler.schedule()            # this module: admit, decode rows, a prefill chunk
    result = runner.execute(plan)          # runner.py: tensors, the model, sampling
    outputs = scheduler.update(plan, result)   # this module: tokens recorded, sequences finished

The cache holds `max_batch_size` slots, one running sequence each (llama.cpp's server slots;
vLLM's scheduler without paging). Each `schedule`

1. admits waiting sequences, oldest first, into free slots: with the prefix cache, the free slot
   whose cached tokens share the longest prefix with the prompt (llama.cpp's slot choice), which
   keeps that prefix so only the rest is prefilled; otherwise the slot freed longest ago, reset
   (the previous occupant's keys are never read);
2. plans one batched decode call: one new token for every sequence whose prompt is in the cache;
3. plans one batched prefill call over the next chunks of the prompts still being read, at most
   `prefill_chunk` positions in all, so a long prompt is read over several steps while the
   running streams keep decoding (Sarathi's chunked prefill, https://arxiv.org/abs/2308.16369),
   and rows beyond the first only within `prefill_chunk`^2 query-key pairs, so the rests of
   prompts over long reused prefixes are read one per call (`_prefill_shape`).

First tokens first. A step's outputs reach the clients when the whole step ends, and the runner
makes the decode call before the prefill call. So when this step's chunk ends a prompt (a first
token comes out of it), the decode call is put off to the next step, which runs it alone: the new
sequence's first token comes without waiting for a decode call over every other stream, and those
streams get their token when the mixed step would have given it (after the same chunk and decode
call, plus one step's bookkeeping), with the new sequence already in that call (SGLang runs
prefill batches before decode batches for the same reason). A decode call is never put off twice
in a row.

`update` is the one place that decides a sequence is finished: a stop id (eos among them), a
stop string (its `TextStream` cuts the text right before it), `max_tokens`, or a row the runner
could not sample ("error"); a finished sequence frees its slot at once.

Prefix reuse. A freed slot keeps its keys and values; the scheduler remembers the token ids they
hold (`slot_tokens`: the prompt and all output tokens but the last, which never entered the
cache). A new prompt reuses at most len(prompt) - 1 of them, so its last token is always
prefilled (its logits give the first new token), and none when it wants the prompt's logprobs
(they need a forward over the whole prompt). Whether the cache can keep exactly positions 0..n-1
(a wrapped ring buffer or a moved xPos center cannot) and still fit the rest is the cache's
answer (`SlotCache.keep_prefix`); if not, the slot is reset and the prompt read whole. A step
that raises forgets what its slots hold (`forget_running`).

Forks. A running sequence's slot is a prefix source too: when one holds a longer prefix of a new
prompt than any free slot, the new sequence takes the free slot freed longest ago and the prefix
is copied into it (`SlotCache.copy_prefix`, nanochat's prefill-once). A prompt that a sequence
still prefilling will soon hold at least half of waits at the head of the queue until it does,
so a request's n choices, or concurrent requests sharing a long system prompt, read it once.
Slots are whole sequences, not blocks: a shared prefix is copied, not shared in place (that would
take a paged cache, vLLM's blocks or SGLang's radix tree, with attention reading through a block
table).

A sequence can be `pause`d (its client is not reading its stream): it keeps its slot but is left
out of decode calls until `resume`; `can_step` says whether a step would do anything.

Prefill rows in one call share a length T. A prompt longer than T is read T positions at a time;
a prompt whose rest is shorter is left-padded to T in its last chunk (the padding is masked out of
attention and keeps the real tokens' positions), so each sequence is padded at most once, by fewer
than `prefill_chunk` positions: a slot holds max_seq_len + prefill_chunk entries.

With a `window` (models with relative positions), sequences continue past the context as
`generate` does: each slot is a ring buffer of the last `window` tokens, positions keep counting.

Everything here runs on the engine's thread; nothing is thread-safe.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..inference.proposers import NgramProposer
from ..inference.sampling import SamplingParams
from ..inference.speculative import SpeculationPolicy
from .config import ServeConfig

# A token's log-probability with the most likely alternatives: (id, logprob, [(id, logprob)]).
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"  # holds a slot, prompt partly in the cache
    DECODE = "decode"  # prompt in the cache, generating
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One prompt being continued: a choice of a request (a request with n=2 has two)."""

    prompt: list[int]
    max_tokens: int  # new tokens at most; with learned absolute positions len(prompt) + max_tokens <= max_seq_len
    params: SamplingParams
    seed: int | None = None  # the seed of its own random generator (sampled rows); None for greedy
    stop_ids: frozenset[int] = frozenset()  # a sampled id in here ends the sequence (and is kept)
    logprobs: int | None = None  # with each new token, its logprob and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (a full forward)
    text: Any = None  # a detokenizer.TextStream: the text so far and the stop strings; None: ids only
    matcher: Any = None  # an inference.structured.GrammarMatcher: the runner masks what it does not allow
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # when it left the queue
    last_token_time: float | None = None  # the engine's bookkeeping, for latency metrics
    # State, written by the scheduler.
    status: Status = Status.WAITING
    paused: bool = False  # left out of decode calls, keeping its slot
    slot: int | None = None
    computed: int = 0  # prompt tokens in the cache
    output: list[int] = field(default_factory=list)
    # Prompt tokens found in its slot's cache at admission, not prefilled (0 with the prefix
    # cache off); None if the prompt was not looked up (scoring, prompt logprobs: a full forward).
    cached_tokens: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop id (not eos) that ended it
    speculation: Speculation | None = None  # with --speculative, from its admission

    @property
    def remaining_prompt(self) -> int:
        return len(self.prompt) - self.computed


@dataclass(eq=False)
class Speculation:
    """How many tokens a sequence proposes next (`SpeculationPolicy`, from its acceptance so far)
    and, for prompt lookup, its `NgramProposer` (which indexes its tokens as they grow; None with
    a draft model, whose proposals the runner makes)."""

    policy: SpeculationPolicy
    proposer: NgramProposer | None = None
    ids: list[int] = field(default_factory=list)  # the sequence's tokens, prompt then output, as they grow

    def tokens(self, seq: Sequence) -> list[int]:
        """`seq`'s prompt and output as one list, extended by the new output tokens only (a
        proposer reads the whole sequence every step: no copy of it per step)."""
        if not self.ids:
            self.ids.extend(seq.prompt)
        self.ids.extend(seq.output[len(self.ids) - len(seq.prompt):])
        return self.ids


# --------------------------------------------------------------------------- plans and results


@dataclass
class Admission:
    """A sequence taken from the queue into `slot`, whose first `kept` positions it reuses
    (0: the slot was reset). The runner starts the slot's per-sequence state (its generator)."""

    seq: Sequence
    slot: int
    kept: int = 0


@dataclass
class Batch:
    """One forward call: row b appends `tokens[b]` at `positions[b]` to slot `seqs[b].slot`
    (`key_mask[b]` False at padding; None: no padding). `sample`: the rows that get a new token."""

    seqs: list[Sequence]
    tokens: list[list[int]]
    positions: list[list[int]]
    key_mask: list[list[bool]] | None
    sample: list[int]
    proposals: list[list[int]] | None = None  # a decode call's guesses per row ([]: none): verify them
    draft_k: list[int] | None = None  # with a draft model: how many tokens each row's draft proposes

    def add_proposals(self, proposals: list[list[int]], max_seq_len: int) -> None:
        """Append each row's proposal after its last token, the rows right-padded to one length
        (padding masked, at the positions after the row's, where the cut back to what the row
        keeps drops it; learned absolute positions end at max_seq_len - 1: padding stays there)."""
        T = 1 + max(map(len, proposals))
        for row, proposal in enumerate(proposals):
            start, pad = self.positions[row][0], T - 1 - len(proposal)
            self.tokens[row] = [self.tokens[row][0], *proposal] + [self.tokens[row][0]] * pad
            self.positions[row] = [min(start + i, max_seq_len - 1) for i in range(T)]
        self.key_mask = [[True] * (1 + len(p)) + [False] * (T - 1 - len(p)) for p in proposals]
        self.proposals = proposals

    @property
    def slots(self) -> list[int]:
        return [seq.slot for seq in self.seqs]


@dataclass
class StepPlan:
    admitted: list[Admission] = field(default_factory=list)
    scored: list[Sequence] = field(default_factory=list)  # want prompt logprobs: a full forward each
    decode: Batch | None = None
    prefill: Batch | None = None

    @property
    def empty(self) -> bool:
        return not (self.scored or self.decode or self.prefill)


@dataclass
class StepResult:
    """What the runner computed, filled as it goes (so a step that raises keeps what it did)."""

    prompt_logprobs: dict[Sequence, list[TokenLogprob | None]] = field(default_factory=dict)
    tokens: dict[Sequence, list[int]] = field(default_factory=dict)  # 1 + the proposals accepted
    logprobs: dict[Sequence, TokenLogprob] = field(default_factory=dict)
    errors: dict[Sequence, str] = field(default_factory=dict)  # rows whose sampling raised


@dataclass
class StepOutput:
    """What one step produced for one sequence."""

    seq: Sequence
    token: int | None = None  # the new token, None if the step only read prompt
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None for the first prompt token
    text: str = ""  # the text the token released (with a TextStream), up to a stop string
    offset: int = 0  # characters of text before the token's
    finished: bool = False
    error: str | None = None  # why the row could not be sampled (it then ends with "error")


@dataclass
class SchedulerStats:
    steps: int = 0
    decode_calls: int = 0
    decode_rows: int = 0
    prefill_calls: int = 0
    prefill_positions: int = 0  # padded positions computed by prefill calls
    prefill_tokens: int = 0  # real prompt tokens among them
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries)
    prefix_hits: int = 0  # of them, tokens found cached and not prefilled (vLLM's prefix_cache_hits)
    draft_tokens: int = 0  # tokens proposed by speculation and verified (vLLM's spec_decode_num_draft_tokens)
    accepted_tokens: int = 0  # of them, accepted (vLLM's spec_decode_num_accepted_tokens)


class SlotCache(Protocol):
    """What the scheduler asks of the KV cache when it places a sequence (the runner's)."""

    def reset(self, slot: int) -> None:
        """Empty `slot` for a new sequence."""

    def keep_prefix(self, slot: int, n: int, room: int) -> bool:
        """Cut `slot` to its first n positions if that can be done exactly and `room` more entries
        then fit; False (the slot to be reset) otherwise."""

    def copy_prefix(self, src: int, dst: int, n: int, room: int) -> bool:
        """Make `dst` hold the first n positions of `src` (which is left as it was) if that can be
        done exactly and `room` more entries then fit; False (dst to be reset) otherwise."""


# --------------------------------------------------------------------------- the scheduler


class Scheduler:
    """Plans each step over the cache's slots and records what the steps produced."""

    def __init__(self, config: ServeConfig, cache: SlotCache, max_seq_len: int) -> None:
        self.config = config
        self.cache = cache
        self.max_seq_len = max_seq_len
        self.prefill_tokens = config.prefill_chunk
        self.free: list[int] = list(range(config.max_batch_size))  # the slot freed longest ago first
        # The token ids each slot's cache holds from position 0, for the free slots (a running
        # slot's entry is stale until its sequence finishes).
        self.slot_tokens: list[list[int]] = [[] for _ in range(config.max_batch_size)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.paused = 0  # how many of them are paused
        self.stats = SchedulerStats()
        self.admitted: list[Sequence] = []  # the sequences the last plan took from the queue
        self.decode_put_off = False  # the last plan left its decode call to this one (first tokens first)
        self._suspect: set[int] = set()  # slots whose cache a failed step may have left half written

    # ------------------------------------------------------------------ bookkeeping

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def can_step(self) -> bool:
        """A step would compute something: a running sequence is not paused, or a waiting one can
        be admitted."""
        return len(self.running) > self.paused or bool(
            self.waiting and (self.free or self.waiting[0].max_tokens == 0))

    def add(self, seq: Sequence) -> None:
        span = len(seq.prompt) + (0 if self.config.slides else seq.max_tokens)
        if not seq.prompt or span > self.max_seq_len:
            raise ValueError(f"a sequence needs 1..max_seq_len ({self.max_seq_len}) positions, "
                             f"got a prompt of {len(seq.prompt)} and max_tokens {seq.max_tokens}")
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (any state) and free its slot now."""
        if seq.status is Status.FINISHED:
            return
        self.resume(seq)
        if seq.status is Status.WAITING:
            if seq in self.waiting:  # (not when a step failed as it admitted the sequence)
                self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.free.append(seq.slot)
            self.slot_tokens[seq.slot] = self._held_tokens(seq)
            self._suspect.discard(seq.slot)
            seq.slot = None
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def pause(self, seq: Sequence) -> None:
        """Leave a decoding `seq` out of the next steps (it keeps its slot and its cache)."""
        if seq.status is Status.DECODE and not seq.paused:
            seq.paused = True
            self.paused += 1

    def resume(self, seq: Sequence) -> None:
        if seq.paused:
            seq.paused = False
            self.paused -= 1

    def forget_running(self) -> None:
        """A step raised: what the running sequences' slots hold is unknown, so none is reused."""
        self._suspect.update(seq.slot for seq in self.running)

    def _held_tokens(self, seq: Sequence) -> list[int]:
        """The tokens `seq`'s slot holds, positions 0 on: the prompt read so far, then every
        output token but the last (each is fed by the next decode call). After a failed decode
        call the slot may hold one more, which leaving it out keeps correct (a shorter prefix)."""
        if seq.slot in self._suspect:  # a step raised while it held the slot
            return []
        return seq.prompt[: seq.computed] + seq.output[:-1] if seq.computed == len(seq.prompt) else \
            seq.prompt[: seq.computed]

    # ------------------------------------------------------------------ planning

    def schedule(self) -> StepPlan:
        """Admit what fits, then plan this step's decode call and prefill chunk."""
        self.stats.steps += 1
        plan = StepPlan()
        self._admit(plan)
        # In slot order: when the rows' slots are consecutive (a full batch), the cache hands the
        # layers views of its rows instead of gathered copies.
        decoding = sorted((s for s in self.running if s.status is Status.DECODE and not s.paused),
                          key=lambda s: s.slot)
        if self.decode_put_off and decoding:  # the decode call the last step left, alone
            self.decode_put_off = False
            plan.decode = self._plan_decode(decoding)
            return plan
        # (A row whose last chunk was planned waits for its first token: `update`.)
        prefilling = [s for s in self.running if s.status is Status.PREFILL and s.remaining_prompt]
        if prefilling:
            plan.prefill = self._plan_prefill(prefilling)
        self.decode_put_off = bool(decoding and plan.prefill and plan.prefill.sample)
        if decoding and not self.decode_put_off:
            plan.decode = self._plan_decode(decoding)
        return plan

    def _admit(self, plan: StepPlan) -> None:
        self.admitted = []
        while self.waiting and (self.free or self.waiting[0].max_tokens == 0):
            if self._worth_waiting(self.waiting[0]):
                break
            seq = self.waiting.popleft()
            seq.admitted = time.perf_counter()
            self.admitted.append(seq)
            if seq.prompt_logprobs is not None:
                plan.scored.append(seq)
            if seq.max_tokens == 0:  # scoring only: the prompt never enters the cache
                continue
            plan.admitted.append(self._place(seq))
            if self.config.speculative and seq.logprobs is None and seq.matcher is None and \
                    not seq.params.logit_bias:  # (rows the verify step's rule does not cover decode plainly)
                policy = SpeculationPolicy(self.config.num_speculative_tokens)
                seq.speculation = Speculation(policy, NgramProposer() if self.config.speculative == "ngram" else None)
            seq.status = Status.PREFILL
            self.running.append(seq)

    def _place(self, seq: Sequence) -> Admission:
        """Give `seq` a free slot, keeping the longest prefix of its prompt one holds, or copying
        it from a running sequence's slot when one of those holds a longer one (a fork)."""
        if seq.prompt_logprobs is None:
            seq.cached_tokens = 0
        if not self.config.prefix_cache or seq.prompt_logprobs is not None:
            seq.slot = self.free.pop(0)
            self.cache.reset(seq.slot)
            return Admission(seq, seq.slot)
        limit = len(seq.prompt) - 1  # the last prompt token is always prefilled
        shared = [_common_prefix(self.slot_tokens[slot], seq.prompt, limit) for slot in self.free]
        best = max(range(len(shared)), key=lambda i: (shared[i], -i))  # ties: the slot freed longest ago
        source, forked = self._running_prefix(seq.prompt, limit)
        self.stats.prefix_queries += len(seq.prompt)
        # What is left must fit beside the kept prefix, which may hold an earlier occupant's padded
        # chunk, so the slot's entries can exceed n (a ring buffer is never full).
        if forked > shared[best]:
            seq.slot = self.free.pop(0)
            room = self._room(seq, forked)
            n = forked if self.cache.copy_prefix(source.slot, seq.slot, forked, room) else 0
        else:
            seq.slot, n = self.free.pop(best), shared[best]
            n = n if n and self.cache.keep_prefix(seq.slot, n, self._room(seq, n)) else 0
        self._suspect.discard(seq.slot)  # (its tokens were forgotten when it was freed)
        self.slot_tokens[seq.slot] = []
        if not n:
            self.cache.reset(seq.slot)
            return Admission(seq, seq.slot)
        seq.computed = seq.cached_tokens = n
        self.stats.prefix_hits += n
        return Admission(seq, seq.slot, n)

    def _room(self, seq: Sequence, kept: int) -> int:
        """Entries `seq` still needs in its slot once `kept` prompt tokens are there: the rest of
        the prompt (one padded chunk at most) and its new tokens."""
        return 0 if self.config.slides else len(seq.prompt) - kept + seq.max_tokens + self.prefill_tokens - 1

    def _running_prefix(self, prompt: list[int], limit: int) -> tuple[Sequence | None, int]:
        """The running sequence whose slot holds the longest prefix of `prompt` (at most `limit`
        tokens), and that length."""
        best, length = None, 0
        for other in self.running:
            if other.slot in self._suspect:
                continue
            n = _common_prefix(self._held_tokens(other), prompt, limit)
            if n > length:
                best, length = other, n
        return best, length

    def _worth_waiting(self, seq: Sequence) -> bool:
        """A sequence still prefilling will soon hold at least half of `seq`'s prompt that no slot
        holds yet: `seq` waits for it and then forks it, rather than reading the same prompt
        again (a request's n choices, or concurrent requests with one long system prompt)."""
        if not self.config.prefix_cache or seq.prompt_logprobs is not None or seq.max_tokens == 0:
            return False
        limit = len(seq.prompt) - 1
        for other in self.running:
            if other.status is Status.PREFILL and other.remaining_prompt:
                n = _common_prefix(other.prompt, seq.prompt, limit)
                if n > other.computed and 2 * n >= len(seq.prompt) and n > 1:
                    return True
        return False

    def _plan_decode(self, seqs: list[Sequence]) -> Batch:
        """One new token per row; with speculation, each row's last token and its proposals, the
        rows right-padded to one length (padding masked, at the positions after the row's, where
        the cut back to what a row keeps drops it)."""
        self.stats.decode_calls += 1
        self.stats.decode_rows += len(seqs)
        tokens = [[s.output[-1]] for s in seqs]
        positions = [[len(s.prompt) + len(s.output) - 1] for s in seqs]
        batch = Batch(seqs, tokens, positions, None, list(range(len(seqs))))
        if not self.config.speculative:
            return batch
        ks = [self._proposal_size(s) for s in seqs]
        if self.config.speculative == "draft":
            batch.draft_k = ks if any(ks) else None  # the runner drafts them
            return batch
        proposals = [s.speculation.proposer.propose(s.speculation.tokens(s), k) if k else []
                     for s, k in zip(seqs, ks)]
        if any(proposals):
            batch.add_proposals(proposals, self.max_seq_len)
        return batch

    def _proposal_size(self, seq: Sequence) -> int:
        """How many tokens `seq` proposes this step: the policy's k, no more than the sequence may
        still generate after this step's own token."""
        if seq.speculation is None:
            return 0
        return max(0, min(seq.speculation.policy.k(), seq.max_tokens - len(seq.output) - 1))

    def _plan_prefill(self, seqs: list[Sequence]) -> Batch:
        T, rows = self._prefill_shape(seqs)
        tokens, positions, key_mask, sample = [], [], [], []
        for row, seq in enumerate(rows):
            take = min(T, seq.remaining_prompt)
            start, pad = seq.computed, T - take
            tokens.append([0] * pad + seq.prompt[start : start + take])
            # Padding sits at the chunk's first position (masked out; positions never decrease).
            positions.append([start] * pad + list(range(start, start + take)))
            key_mask.append([False] * pad + [True] * take)
            seq.computed += take
            if seq.computed == len(seq.prompt):
                sample.append(row)
        self.stats.prefill_calls += 1
        self.stats.prefill_positions += len(rows) * T
        self.stats.prefill_tokens += sum(sum(m) for m in key_mask)
        padded = any(not row[0] for row in key_mask)
        return Batch(rows, tokens, positions, key_mask if padded else None, sample)

    def _prefill_shape(self, seqs: list[Sequence]) -> tuple[int, list[Sequence]]:
        """The chunk length T and the rows (a prefix of `seqs`, oldest first) of this step's
        prefill call: the choice that reads the most prompt tokens within `prefill_chunk`
        positions and `prefill_chunk`^2 query-key pairs (ties: the fewest positions).

        A row's chunk attends to every key its slot holds, so the rest of a prompt whose prefix
        was reused (a conversation's next turn: ~80 new tokens over ~1,000 cached) costs as much
        as a chunk ten times its length; batched, such rows would all wait for the slowest, each
        first token later than one at a time (on a CPU, a batch of them costs about the sum)."""
        best = (-1, 0, 0, [])  # (real tokens, -positions, T, rows)
        for T in sorted({min(s.remaining_prompt, self.prefill_tokens) for s in seqs}):
            rows = seqs[: max(1, self.prefill_tokens // T)]
            rows = rows[: self._rows_within_pairs(rows, T)]
            real = sum(min(s.remaining_prompt, T) for s in rows)
            best = max(best, (real, -len(rows) * T, T, rows), key=lambda b: b[:2])
        return best[2], best[3]

    def _rows_within_pairs(self, rows: list[Sequence], T: int) -> int:
        """How many of `rows` (at least one) a call of chunk length T takes before its queries
        times the keys they read (T x (cached + T) a row) pass prefill_chunk^2."""
        pairs, budget = 0, self.prefill_tokens ** 2
        for n, seq in enumerate(rows):
            pairs += T * (seq.computed + T)
            if n and pairs > budget:
                return n
        return len(rows)

    # ------------------------------------------------------------------ after the runner

    def update(self, plan: StepPlan, result: StepResult) -> list[StepOutput]:
        """Record what the runner computed for `plan`: prompt logprobs, new tokens, and which
        sequences finished. Rows the result lacks (a step that raised midway) are left as they
        are. Outputs in the order the step touched the sequences."""
        outputs = []
        for seq in self.admitted:
            scored = result.prompt_logprobs.get(seq)
            if seq.max_tokens == 0 and scored is not None:
                seq.status, seq.finish_reason = Status.FINISHED, "length"
                outputs.append(StepOutput(seq, prompt_logprobs=scored, finished=True))
            elif scored is not None:
                outputs.append(StepOutput(seq, prompt_logprobs=scored))
        for batch in (plan.decode, plan.prefill):
            if batch is None:
                continue
            for row in batch.sample:
                seq = batch.seqs[row]
                if seq in result.errors:
                    self.finish(seq, "error")
                    outputs.append(StepOutput(seq, finished=True, error=result.errors[seq]))
                elif seq in result.tokens and seq.status is not Status.FINISHED:
                    tokens = result.tokens[seq]
                    if batch.proposals is not None:
                        self._count_speculation(seq, len(batch.proposals[row]), len(tokens) - 1)
                    logprob = result.logprobs.get(seq)
                    for token in tokens:
                        outputs.append(self._record(seq, token, logprob))
                        if seq.status is Status.FINISHED:
                            break
        return outputs

    def _count_speculation(self, seq: Sequence, proposed: int, accepted: int) -> None:
        if proposed:
            seq.speculation.policy.update(proposed, accepted)
            self.stats.draft_tokens += proposed
            self.stats.accepted_tokens += accepted

    def _record(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        """Append `token` to `seq` and end it if this token ends it: the one place that decides."""
        seq.status = Status.DECODE
        seq.output.append(token)
        out = StepOutput(seq, token, logprob)
        text = seq.text
        if text is not None:
            out.offset = text.decoded
        if token in seq.stop_ids:
            seq.stop_reason = token
            self.finish(seq, "stop")
        else:
            if text is not None:
                out.text = text.push(token)
                if text.stopped is not None:
                    seq.stop_reason = text.stopped
                    self.finish(seq, "stop")
            if seq.status is Status.FINISHED:
                pass
            elif seq.matcher is not None and seq.matcher.is_finished():  # its grammar is complete
                self.finish(seq, "stop")
            elif len(seq.output) >= seq.max_tokens:
                self.finish(seq, "length")
        out.finished = seq.status is Status.FINISHED
        if out.finished and text is not None and text.stopped is None:
            out.text += text.flush()
        return out


def _common_prefix(held: list[int], prompt: list[int], limit: int) -> int:
    """How many leading tokens `held` and `prompt` share, at most `limit`."""
    n = 0
    for a, b in zip(held, prompt[:limit]):
        if a != b:
            break
        n += 1
    return n
