"""Continuous batching over the KV cache's slots: admit, prefill (chunked), decode, evict.

Shape letters: B rows of one forward call, T new positions per row, V vocabulary.

The cache holds `max_batch_size` slots, one running sequence each (llama.cpp's server slots;
vLLM's scheduler without paging). Each `Scheduler.step`

1. admits waiting sequences, oldest first, into free slots: with `prefix_cache`, the free slot
   whose cached tokens share the longest prefix with the prompt (llama.cpp's slot choice), which
   keeps that prefix (`truncate`) so only the rest is prefilled; otherwise the slot freed longest
   ago, `reset` (the previous occupant's keys are never read);
2. runs one batched decode call: one new token for every sequence whose prompt is in the cache;
3. runs one batched prefill call over the next chunks of the prompts still being read, at most
   `prefill_tokens` positions in all, so a long prompt is read over several steps while the
   running streams keep decoding (Sarathi's chunked prefill, https://arxiv.org/abs/2308.16369);
4. samples a token for every row that needs one, each row with its own parameters (penalties
   included, from the row's own `TokenCounts`) and its own `torch.Generator`, so a request draws
   the same tokens alone or in any batch (a row whose sampling raises ends with finish reason
   "error"; the other rows go on);
5. frees the slot of every sequence that has finished (eos, stop id, max_tokens) at once.

`step` collects its outputs in `self.outputs` as it goes, so when a later part of a step raises
the engine still answers what an earlier part finished (a scoring-only request done at admission).

Prefix reuse. A freed slot keeps its keys and values; the scheduler remembers, host-side, the
token ids they hold (`slot_tokens`: the prompt and all output tokens but the last, which never
entered the cache). A new prompt reuses at most len(prompt) - 1 of them, so its last token is
always prefilled (its logits give the first new token), and none when it wants the prompt's
logprobs (they need a forward over the whole prompt). The kept prefix is exactly positions
0..n-1 (prefill chunks start at position `computed`; the padding a kept chunk holds stays masked).
Where the cache refuses the cut (a wrapped ring buffer, an xPos center moved on) or the kept
padding would leave too little room, the slot is reset and the prompt read whole. A step that
raises forgets what its slots hold.

A sequence can be `pause`d (its client is not reading its stream): it keeps its slot but is left
out of decode calls until `resume`; `can_step` says whether a step would do anything.

Prefill rows in one call share a length T. A prompt longer than T is read T positions at a time;
a prompt whose rest is shorter is left-padded to T in its last chunk (the padding is masked out of
attention and keeps the real tokens' positions), so each sequence is padded at most once, by fewer
than `prefill_tokens` positions: a slot holds max_seq_len + prefill_tokens entries.

With a `window` (models with relative positions), sequences continue past the context as
`generate` does: each slot is a ring buffer of the last `window` tokens, positions keep counting,
memory stays fixed.

Everything here runs on the engine's thread; nothing is thread-safe.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..inference.sampling import SamplingParams, TokenCounts, penalize, sample
from ..model import KVCache, Transformer

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
    generator: torch.Generator | None = None  # None for greedy
    stop_ids: frozenset[int] = frozenset()  # a sampled id in here ends the sequence (and is kept)
    logprobs: int | None = None  # with each new token, its logprob and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (a full forward)
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # when it left the queue
    last_token_time: float | None = None  # the engine's bookkeeping, for latency metrics
    # State, written by the scheduler.
    status: Status = Status.WAITING
    paused: bool = False  # left out of decode calls, keeping its slot
    slot: int | None = None
    computed: int = 0  # prompt tokens in the cache
    output: list[int] = field(default_factory=list)
    counts: TokenCounts | None = None  # with a penalty: the prompt's and output's tokens, from the first sample
    # Prompt tokens found in its slot's cache at admission, not prefilled (0 with the prefix
    # cache off); None if the prompt was not looked up (scoring, prompt logprobs: a full forward).
    cached_tokens: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"

    @property
    def remaining_prompt(self) -> int:
        return len(self.prompt) - self.computed


@dataclass
class StepOutput:
    """What one step produced for one sequence."""

    seq: Sequence
    token: int | None = None  # the new token, None if the step only read prompt
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None for the first prompt token
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


class Scheduler:
    """Owns the KV cache and decides, each step, which sequences read prompt and which decode."""

    def __init__(self, net: Transformer, *, max_batch_size: int = 16, prefill_tokens: int = 256,
                 window: int | None = None, sink_tokens: int = 0, prefix_cache: bool = True) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.net = net
        self.config = net.config
        weight = net.token_emb.weight
        self.device = weight.device
        self.prefill_tokens = prefill_tokens
        # With a `window`, sequences slide past max_seq_len: each slot is a ring buffer of the
        # last `window` tokens, the first `sink_tokens` kept for good. Without one (the default,
        # and always with learned absolute positions, which end at max_seq_len) a sequence fits.
        self.slides = window is not None
        if self.slides and self.config.use_abs_pos_emb:
            raise ValueError("a model with learned absolute positions cannot slide past max_seq_len: "
                             "--window and --sink-tokens need relative positions (ALiBi, xPos)")
        # Every slot holds its context (or window) plus one padded chunk (the module docstring).
        self.cache = KVCache(self.config, max_batch_size, (window or self.config.max_seq_len) + prefill_tokens,
                             dtype=weight.dtype, device=weight.device, window=window, sink_tokens=sink_tokens)
        self.free: list[int] = list(range(max_batch_size))  # the slot freed longest ago first
        self.prefix_cache = prefix_cache
        # The token ids each slot's cache holds from position 0, for the free slots (a running
        # slot's entry is stale until its sequence finishes).
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch_size)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.paused = 0  # how many of them are paused
        self.stats = SchedulerStats()
        self.admitted: list[Sequence] = []  # the sequences the last step took from the queue
        self.outputs: list[StepOutput] = []  # what the last step produced (so far, if it raised)
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
        span = len(seq.prompt) + (0 if self.slides else seq.max_tokens)
        if not seq.prompt or span > self.config.max_seq_len:
            raise ValueError(f"a sequence needs 1..max_seq_len ({self.config.max_seq_len}) positions, "
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

    # ------------------------------------------------------------------ one step

    def _held_tokens(self, seq: Sequence) -> list[int]:
        """The tokens `seq`'s slot holds, positions 0 on: the prompt read so far, then every
        output token but the last (each is fed by the next decode call). After a failed decode
        call the slot may hold one more, which leaving it out keeps correct (a shorter prefix)."""
        if seq.slot in self._suspect:  # a step raised while it held the slot
            self._suspect.discard(seq.slot)
            return []
        return seq.prompt[: seq.computed] + seq.output[:-1] if seq.computed == len(seq.prompt) else \
            seq.prompt[: seq.computed]

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit, decode, prefill, sample, evict; returns what each touched sequence got."""
        self.stats.steps += 1
        self.outputs = []
        try:
            return self._step(self.outputs)
        except BaseException:  # the cache may be half written: what the slots hold is unknown
            self._suspect.update(s.slot for s in self.running)
            raise

    def _step(self, outputs: list[StepOutput]) -> list[StepOutput]:
        self._admit(outputs)
        # In slot order: when the rows' slots are consecutive (a full batch), the cache hands the
        # layers views of its rows instead of gathered copies.
        decoding = sorted((s for s in self.running if s.status is Status.DECODE and not s.paused),
                          key=lambda s: s.slot)
        if decoding:
            outputs += self._decode(decoding)
        prefilling = [s for s in self.running if s.status is Status.PREFILL]
        if prefilling:
            outputs += self._prefill(prefilling)
        return outputs

    def _admit(self, outputs: list[StepOutput]) -> None:
        self.admitted = []
        while self.waiting and (self.free or self.waiting[0].max_tokens == 0):
            seq = self.waiting.popleft()
            seq.admitted = time.perf_counter()
            self.admitted.append(seq)
            out = StepOutput(seq)
            if seq.prompt_logprobs is not None:
                out.prompt_logprobs = self._prompt_logprobs(seq)
            if seq.max_tokens == 0:  # scoring only: the prompt never enters the cache
                seq.status, seq.finish_reason, out.finished = Status.FINISHED, "length", True
                outputs.append(out)
                continue
            if out.prompt_logprobs is not None:
                outputs.append(out)
            self._place(seq)
            seq.status = Status.PREFILL
            self.running.append(seq)

    def _place(self, seq: Sequence) -> None:
        """Give `seq` a free slot, keeping the longest prefix of its prompt one holds."""
        if seq.prompt_logprobs is None:
            seq.cached_tokens = 0
        if not self.prefix_cache or seq.prompt_logprobs is not None:
            seq.slot = self.free.pop(0)
            self.cache.reset([seq.slot])
            return
        limit = len(seq.prompt) - 1  # the last prompt token is always prefilled
        shared = [_common_prefix(self.slot_tokens[slot], seq.prompt, limit) for slot in self.free]
        best = max(range(len(shared)), key=lambda i: (shared[i], -i))  # ties: the slot freed longest ago
        seq.slot, n = self.free.pop(best), shared[best]
        self._suspect.discard(seq.slot)  # (its tokens were forgotten when it was freed)
        self.stats.prefix_queries += len(seq.prompt)
        if n and self._keep_prefix(seq, n):
            seq.computed = seq.cached_tokens = n
            self.stats.prefix_hits += n
        else:
            self.cache.reset([seq.slot])
        self.slot_tokens[seq.slot] = []

    def _keep_prefix(self, seq: Sequence, n: int) -> bool:
        """Cut `seq`'s slot to its first n positions, if the cache can and the rest still fits:
        the kept prefix may hold an earlier occupant's padded chunk, so the slot's entries can
        exceed n (a ring buffer is never full)."""
        try:
            self.cache.truncate(seq.slot, n)
        except ValueError:  # a wrapped ring buffer or a moved xPos center: prefill it all
            return False
        if self.slides:
            return True
        needed = len(seq.prompt) - n + seq.max_tokens + self.prefill_tokens - 1  # one padded chunk at most
        return self.cache.lengths[seq.slot] + needed <= self.cache.capacity

    def _prompt_logprobs(self, seq: Sequence) -> list[TokenLogprob | None]:
        """Each prompt token's logprob given the ones before it, from one forward over the prompt."""
        tokens = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)  # (1, N)
        logprobs = self.net(tokens, validate=False)[0, :-1].float().log_softmax(dim=-1)  # (N - 1, V)
        return [None] + _token_logprobs(logprobs, seq.prompt[1:], seq.prompt_logprobs)

    def _decode(self, seqs: list[Sequence]) -> list[StepOutput]:
        last = [[s.output[-1]] for s in seqs]
        positions = [[len(s.prompt) + len(s.output) - 1] for s in seqs]
        logits = self._forward(last, positions, None, [s.slot for s in seqs])  # (B, V)
        self.stats.decode_calls += 1
        self.stats.decode_rows += len(seqs)
        return self._sample(seqs, logits)

    def _prefill(self, seqs: list[Sequence]) -> list[StepOutput]:
        T, rows = self._plan_prefill(seqs)
        tokens, positions, key_mask, done = [], [], [], []
        for seq in rows:
            take = min(T, seq.remaining_prompt)
            start, pad = seq.computed, T - take
            tokens.append([0] * pad + seq.prompt[start : start + take])
            # Padding sits at the chunk's first position (masked out; positions never decrease).
            positions.append([start] * pad + list(range(start, start + take)))
            key_mask.append([False] * pad + [True] * take)
            seq.computed += take
            done.append(seq.computed == len(seq.prompt))
        padded = any(not row[0] for row in key_mask)
        logits = self._forward(tokens, positions, key_mask if padded else None, [s.slot for s in rows])
        self.stats.prefill_calls += 1
        self.stats.prefill_positions += len(rows) * T
        self.stats.prefill_tokens += sum(sum(m) for m in key_mask)
        ready = [i for i, d in enumerate(done) if d]
        if not ready:
            return []
        for i in ready:
            rows[i].status = Status.DECODE
        return self._sample([rows[i] for i in ready], logits[ready] if len(ready) < len(rows) else logits)

    def _plan_prefill(self, seqs: list[Sequence]) -> tuple[int, list[Sequence]]:
        """The chunk length T and the rows (a prefix of `seqs`, oldest first) of this step's
        prefill call: the choice that reads the most prompt tokens within `prefill_tokens`
        positions (ties: the fewest positions)."""
        best = (-1, 0, 0, [])  # (real tokens, -positions, T, rows)
        for T in sorted({min(s.remaining_prompt, self.prefill_tokens) for s in seqs}):
            rows = seqs[: max(1, self.prefill_tokens // T)]
            real = sum(min(s.remaining_prompt, T) for s in rows)
            best = max(best, (real, -len(rows) * T, T, rows), key=lambda b: b[:2])
        return best[2], best[3]

    def _forward(self, tokens: Seq[Seq[int]], positions: Seq[Seq[int]], key_mask: Seq[Seq[bool]] | None,
                 slots: list[int]) -> Tensor:
        """Next-token logits (B, V) after each row, appending the rows to their slots."""
        device = self.device
        tokens_t = torch.tensor(tokens, dtype=torch.long, device=device)  # (B, T)
        positions_t = torch.tensor(positions, dtype=torch.long, device=device)  # (B, T)
        mask_t = None if key_mask is None else torch.tensor(key_mask, dtype=torch.bool, device=device)
        logits = self.net(tokens_t, positions_t, key_mask=mask_t, cache=self.cache, slots=slots,
                          logits_to_keep=1, validate=False)
        return logits[:, -1]

    def _sample(self, seqs: list[Sequence], logits: Tensor) -> list[StepOutput]:
        """Draw each row's next token, record it, and retire the rows that end here."""
        scores = self._penalized(seqs, logits)  # what sampling reads; logprobs report `logits`
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        tokens: list[int] = [0] * len(seqs)
        if greedy:  # one argmax for all greedy rows: the same op `generate` applies to its row
            picked = scores[greedy].argmax(dim=-1).tolist() if len(greedy) < len(seqs) else \
                scores.argmax(dim=-1).tolist()
            for i, token in zip(greedy, picked):
                tokens[i] = token
        failed: dict[int, str] = {}
        for i, seq in enumerate(seqs):
            if not seq.params.greedy:  # each row its own generator: draws independent of the batch
                try:
                    tokens[i] = int(sample(scores[i : i + 1], seq.params, seq.generator))
                except Exception as error:  # e.g. NaN logits: this row ends, the batch goes on
                    failed[i] = f"{type(error).__name__}: {error}"
        wants = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        logprobs: dict[int, TokenLogprob] = {}
        if wants:
            rows = logits[wants].float().log_softmax(dim=-1)  # (W, V): the model's distribution
            for row, i in enumerate(wants):
                logprobs[i] = _token_logprobs(rows[row : row + 1], [tokens[i]], seqs[i].logprobs)[0]
        outputs = []
        for i, seq in enumerate(seqs):
            if i in failed:
                self.finish(seq, "error")
                outputs.append(StepOutput(seq, finished=True, error=failed[i]))
                continue
            seq.output.append(tokens[i])
            if seq.counts is not None:
                seq.counts.add(torch.tensor([tokens[i]], device=self.device))
            out = StepOutput(seq, tokens[i], logprobs.get(i))
            if tokens[i] in seq.stop_ids:
                self.finish(seq, "stop")
            elif len(seq.output) >= seq.max_tokens:
                self.finish(seq, "length")
            out.finished = seq.status is Status.FINISHED
            outputs.append(out)
        return outputs

    def _penalized(self, seqs: list[Sequence], logits: Tensor) -> Tensor:
        """`logits` (B, V) with each row's penalties applied (fp32 if any row has one): row by row,
        each from its own counts, so a row's tokens do not depend on the batch it is in."""
        rows = [i for i, s in enumerate(seqs) if s.params.penalized]
        if not rows:
            return logits
        scores = logits.float().clone()
        for i in rows:
            seq = seqs[i]
            if seq.counts is None:  # its first token (no output yet): count its prompt
                seq.counts = TokenCounts(torch.tensor([seq.prompt], device=self.device), self.config.num_tokens)
            scores[i : i + 1] = penalize(logits[i : i + 1], seq.counts, seq.params)
        return scores


def _common_prefix(held: list[int], prompt: list[int], limit: int) -> int:
    """How many leading tokens `held` and `prompt` share, at most `limit`."""
    n = 0
    for a, b in zip(held, prompt[:limit]):
        if a != b:
            break
        n += 1
    return n


def _token_logprobs(logprobs: Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """(id, logprob, top alternatives) for each row of (R, V) log-probabilities and its id."""
    chosen = logprobs.gather(1, torch.tensor(ids, device=logprobs.device)[:, None])[:, 0].tolist()
    if top > 0:
        values, indices = logprobs.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in ids]
    return [(i, lp, alt) for i, lp, alt in zip(ids, chosen, alternatives)]
