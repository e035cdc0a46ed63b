"""The model runner: executes a scheduler's plan on the model and its KV cache.

Shape letters: B rows of one forward call, T new positions per row, V vocabulary.

`execute(plan)` builds each call's tensors once from the plan's host lists, runs the model over
the cache's slots, and samples a token for every row the plan marks: each row with its own
parameters (penalties included, from the slot's own `TokenCounts`) and its own
`torch.Generator`, seeded from the sequence's seed at admission, so a request draws the same
tokens alone or in any batch. Greedy rows share one argmax (`greedy_tokens`), the op `generate`
applies to its row.
A row whose sampling raises (e.g. NaN logits) is reported in `StepResult.errors`; the other rows
go on. The runner decides nothing about sequences: it returns ids, logprobs and errors, and the
scheduler records them.

The runner owns the model, the cache and the per-slot sampling state; it is the scheduler's
`SlotCache` (reset a slot, keep a slot's prefix, copy a running slot's prefix into a free one).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from torch import Tensor

from ..inference.sampling import TokenCounts, apply_logit_bias, greedy_tokens, penalize, sample
from ..inference.kv_attention import decode_attention_for
from ..inference.native import decode_sdpa_for
from ..inference.proposers import DraftProposer
from ..inference.speculative import accept_row, check_draft
from ..inference.structured import apply_bitmask, grammar_bitmask
from ..model import KVCache, Transformer
from .config import ServeConfig
from .scheduler import Batch, Sequence, StepPlan, StepResult, TokenLogprob


class ModelRunner:
    def __init__(self, net: Transformer, config: ServeConfig, draft: Transformer | None = None) -> None:
        if (config.speculative == "draft") != (draft is not None):
            raise ValueError("a draft model goes with speculative='draft', and that needs one")
        self.net = net
        self.config = net.config
        weight = net.token_emb.weight
        self.device = weight.device
        if config.slides and self.config.use_abs_pos_emb:
            raise ValueError("a model with learned absolute positions cannot slide past max_seq_len: "
                             "--window and --sink-tokens need relative positions (ALiBi, xPos)")
        # Every slot holds its context (or window) plus one padded chunk (scheduler.py's docstring),
        # and a verify call's proposals and padding until they are cut back.
        capacity = (config.window or self.config.max_seq_len) + config.prefill_chunk + \
            (config.num_speculative_tokens if config.speculative else 0)
        self.cache = KVCache(self.config, config.max_batch_size, capacity, dtype=weight.dtype, device=self.device,
                             kv_dtype=config.kv_cache_dtype,
                             window=config.window, sink_tokens=config.sink_tokens)
        self.cache.decode_attention = decode_attention_for(self.cache)  # int8 on the CPU: the kernel
        self.cache.decode_sdpa = decode_sdpa_for(self.cache)  # on the CPU: one-token steps' fused attention
        slots = config.max_batch_size
        self._generators: list[torch.Generator | None] = [None] * slots  # sampled rows' own
        self._counts: list[TokenCounts | None] = [None] * slots  # penalized rows': prompt and output tokens
        self.drafter = None
        if draft is not None:
            check_draft(net, draft)
            self.drafter = DraftProposer(draft, slots, self.config.max_seq_len + config.num_speculative_tokens + 1)

    # ------------------------------------------------------------------ the scheduler's SlotCache

    def reset(self, slot: int) -> None:
        self.cache.reset([slot])

    def keep_prefix(self, slot: int, n: int, room: int) -> bool:
        try:
            self.cache.truncate(slot, n)
        except ValueError:  # a wrapped ring buffer or a moved xPos center: prefill it all
            return False
        return self._fits(slot, room)

    def copy_prefix(self, src: int, dst: int, n: int, room: int) -> bool:
        try:
            self.cache.copy_prefix(src, dst, n)
        except ValueError:  # what truncating src to n would refuse: prefill it all
            return False
        return self._fits(dst, room)

    def _fits(self, slot: int, room: int) -> bool:
        return self.cache.window is not None or self.cache.lengths[slot] + room <= self.cache.capacity

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, plan: StepPlan, result: StepResult | None = None) -> StepResult:
        """Run `plan`: prompt logprobs, the decode call, the prefill call, each sampled. Fills
        `result` as it goes, so that when a later part raises the earlier parts are kept."""
        result = StepResult() if result is None else result
        for admission in plan.admitted:
            seq, slot = admission.seq, admission.slot
            self._counts[slot] = None
            if self.drafter is not None:
                self.drafter.reset(slot)
            self._generators[slot] = None if seq.params.greedy or seq.seed is None else \
                torch.Generator(device=self.device).manual_seed(seq.seed)
        for seq in plan.scored:
            result.prompt_logprobs[seq] = self._prompt_logprobs(seq)
        for batch in (plan.decode, plan.prefill):
            if batch is None:
                continue
            drafts = self._draft(batch) if batch.draft_k is not None else None
            if batch.proposals is not None:
                self._verify(batch, result, drafts)
                continue
            logits = self._forward(batch)[:, -1]
            if batch.sample:
                rows = batch.sample
                sampled = [batch.seqs[i] for i in rows]
                self._sample(sampled, logits[rows] if len(rows) < len(batch.seqs) else logits, result,
                             self._bitmask(sampled))
        return result

    def _bitmask(self, seqs: Seq[Sequence]) -> Tensor | None:
        """The packed grammar masks of the rows about to be sampled (`grammar_bitmask`; None if no
        row follows a grammar), computed on this thread once the forward is issued: on an
        accelerator they overlap its kernels. A mask takes llguidance microseconds a row, less than
        handing the work to a thread and back (waking it, the GIL going back and forth): with a
        mask thread, grammars cost the demo model (a 5 ms step for 16 rows) 8-16% of its tokens/s
        at equal lengths, computed here 2-5% (`bench_serve.py --constrained --engine`)."""
        if all(s.matcher is None for s in seqs):
            return None
        return grammar_bitmask([s.matcher for s in seqs], self.config.num_tokens, parallel=self.device.type != "cpu")

    def _draft(self, batch: Batch) -> list[Tensor | None]:
        """The draft model's proposals for the rows of a decode call (`batch.draft_k` tokens each),
        added to the batch; the distributions q they were drawn from, per row (None: greedy)."""
        proposals, qs = [], []
        for seq, k in zip(batch.seqs, batch.draft_k):
            tokens, q = self.drafter.propose(seq.slot, seq.speculation.tokens(seq), k, seq.params,
                                             self._generators[seq.slot]) if k else ([], None)
            proposals.append(tokens)
            qs.append(q)
        if any(proposals):
            batch.add_proposals(proposals, self.config.max_seq_len)
        return qs

    def _verify(self, batch: Batch, result: StepResult, drafts: list[Tensor | None] | None = None) -> None:
        """A decode call with proposals: the logits after the last token and after each proposed
        one, each row's tokens by the rejection rule (`accept_row`: greedy rows keep the proposals
        equal to the argmax, then one of the model's own), then each slot cut back to what its row
        keeps. Rows without a proposal sample as in a plain decode call."""
        logits = self._forward(batch, keep=len(batch.tokens[0]))  # (B, T, V)
        plain = [i for i, proposal in enumerate(batch.proposals) if not proposal]
        if plain:
            seqs = [batch.seqs[i] for i in plain]
            self._sample(seqs, logits[plain, 0], result, self._bitmask(seqs))
        for i, proposal in enumerate(batch.proposals):
            seq = batch.seqs[i]
            if proposal:
                try:
                    result.tokens[seq] = accept_row(proposal, logits[i, : 1 + len(proposal)], seq.params,
                                                    counts=self._counts_of(seq), generator=self._generators[seq.slot],
                                                    q=None if drafts is None else drafts[i])
                except Exception as error:  # e.g. NaN logits: this row ends, the batch goes on
                    result.errors[seq] = f"{type(error).__name__}: {error}"
                    continue
                self._count(seq, result.tokens[seq])
            if seq in result.tokens:  # keep the last token and the accepted proposals
                self.cache.truncate(seq.slot, batch.positions[i][0] + len(result.tokens[seq]))

    def _prompt_logprobs(self, seq: Sequence) -> list[TokenLogprob | None]:
        """Each prompt token's logprob given the ones before it, from one forward over the prompt."""
        tokens = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)  # (1, N)
        logprobs = self.net(tokens, validate=False)[0, :-1].float().log_softmax(dim=-1)  # (N - 1, V)
        return [None] + token_logprobs(logprobs, seq.prompt[1:], seq.prompt_logprobs)

    def _forward(self, batch: Batch, keep: int = 1) -> Tensor:
        """Next-token logits (B, keep, V) after each row's last `keep` positions, appending the rows
        to their slots."""
        device = self.device
        tokens = torch.tensor(batch.tokens, dtype=torch.long, device=device)  # (B, T)
        if batch.key_mask is None:
            # Every row continues its slot at the slot's next position (the scheduler's invariant),
            # so the cache takes the positions from its own bookkeeping: none go to the device and
            # back to the host to be checked (decode steps and unpadded prefill chunks).
            positions = mask = None
        else:
            positions = torch.tensor(batch.positions, dtype=torch.long, device=device)  # (B, T)
            mask = torch.tensor(batch.key_mask, dtype=torch.bool, device=device)
        return self.net(tokens, positions, key_mask=mask, cache=self.cache, slots=batch.slots, logits_to_keep=keep,
                        validate=False)

    def _sample(self, seqs: Seq[Sequence], logits: Tensor, result: StepResult, bitmask: Tensor | None = None) -> None:
        """Draw each row's next token into `result` (logprobs report the model's `logits`);
        `bitmask`: the rows' grammar masks (`_bitmask`), None if no row follows a grammar."""
        scores = self._penalized(seqs, logits)
        if bitmask is not None:  # each row's grammar masks what it does not allow
            scores = apply_bitmask(scores, bitmask)
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        tokens: list[int | None] = [None] * len(seqs)
        if greedy:  # one argmax for all greedy rows
            picked = greedy_tokens(scores[greedy] if len(greedy) < len(seqs) else scores).tolist()
            for i, token in zip(greedy, picked):
                tokens[i] = token
        for i, seq in enumerate(seqs):
            if not seq.params.greedy:  # each row its own generator: draws independent of the batch
                try:
                    tokens[i] = int(sample(scores[i : i + 1], seq.params, self._generators[seq.slot]))
                except Exception as error:  # e.g. NaN logits: this row ends, the batch goes on
                    result.errors[seq] = f"{type(error).__name__}: {error}"
        wants = [i for i, s in enumerate(seqs) if s.logprobs is not None and tokens[i] is not None]
        if wants:
            rows = logits[wants].float().log_softmax(dim=-1)  # (W, V): the model's distribution
            for row, i in enumerate(wants):
                result.logprobs[seqs[i]] = token_logprobs(rows[row : row + 1], [tokens[i]], seqs[i].logprobs)[0]
        for seq, token in zip(seqs, tokens):
            if token is None:
                continue
            if seq.matcher is not None:
                try:
                    seq.matcher.accept(token)
                except ValueError as error:  # a token its mask allowed must be accepted: a bug, this row's alone
                    result.errors[seq] = f"{type(error).__name__}: {error}"
                    continue
            result.tokens[seq] = [token]
            self._count(seq, [token])

    def _penalized(self, seqs: Seq[Sequence], logits: Tensor) -> Tensor:
        """`logits` (B, V) with each row's penalties and logit bias applied (fp32 if any row has
        one): row by row, each from its slot's counts, so a row's tokens do not depend on the batch
        it is in."""
        rows = [i for i, s in enumerate(seqs) if s.params.penalized or s.params.logit_bias]
        if not rows:
            return logits
        scores = logits.float().clone()
        for i in rows:
            params, row = seqs[i].params, logits[i : i + 1]
            if params.penalized:
                row = penalize(row, self._counts_of(seqs[i]), params)
            scores[i : i + 1] = apply_logit_bias(row, params)
        return scores

    def _counts_of(self, seq: Sequence) -> TokenCounts | None:
        """A penalized sequence's token counts (its prompt's, from its first sample on); None
        without a penalty."""
        if not seq.params.penalized:
            return None
        counts = self._counts[seq.slot]
        if counts is None:
            counts = self._counts[seq.slot] = TokenCounts(torch.tensor([seq.prompt], device=self.device),
                                                          self.config.num_tokens)
        return counts

    def _count(self, seq: Sequence, tokens: list[int]) -> None:
        counts = self._counts[seq.slot]
        if counts is not None:
            for token in tokens:  # (one row: a token at a time)
                counts.add(torch.tensor([token], device=self.device))


def token_logprobs(logprobs: Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """(id, logprob, top alternatives) for each row of (R, V) log-probabilities and its id."""
    chosen = logprobs.gather(1, torch.tensor(ids, device=logprobs.device)[:, None])[:, 0].tolist()
    if top > 0:
        values, indices = logprobs.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in ids]
    return [(i, lp, alt) for i, lp, alt in zip(ids, chosen, alternatives)]
