"""The scheduler's policy, without a model: plans are plain lists, results are made up here.

The engine core runs schedule -> execute -> update; these tests play the runner's part with
hand-written `StepResult`s against a fake `SlotCache`, so each decision (which slot, how many
tokens from where, when a sequence ends) is checked alone."""

from __future__ import annotations

import pytest

from andromeda.inference.sampling import SamplingParams
from andromeda.serve.config import ServeConfig
from andromeda.serve.detokenizer import TextStream
from andromeda.serve.scheduler import Scheduler, Sequence, Status, StepResult
from andromeda.tokenizers import ByteTokenizer

GREEDY = SamplingParams(0)


class FakeCache:
    """Records what the scheduler asked of the cache; refuses to keep prefixes of `refuse` slots."""

    def __init__(self, refuse: set[int] = frozenset()) -> None:
        self.calls: list[tuple] = []
        self.refuse = refuse

    def reset(self, slot: int) -> None:
        self.calls.append(("reset", slot))

    def keep_prefix(self, slot: int, n: int, room: int) -> bool:
        self.calls.append(("keep", slot, n))
        return slot not in self.refuse

    def copy_prefix(self, src: int, dst: int, n: int, room: int) -> bool:
        self.calls.append(("copy", src, dst, n))
        return src not in self.refuse


def scheduler(cache: FakeCache | None = None, **options) -> Scheduler:
    return Scheduler(ServeConfig(**options), cache or FakeCache(), max_seq_len=64)


def answer(plan, token: int = 7) -> StepResult:
    """The runner's part: `token` for every row the plan samples."""
    result = StepResult()
    for batch in (plan.decode, plan.prefill):
        if batch is not None:
            for row in batch.sample:
                result.tokens[batch.seqs[row]] = [token]
    return result


def test_prompts_are_read_in_chunks_within_the_budget_and_padded_once():
    s = scheduler(max_batch_size=3, prefill_chunk=8)
    long, short = Sequence(list(range(12)), 4, GREEDY), Sequence([1, 2, 3], 4, GREEDY)
    s.add(long)
    s.add(short)
    plan = s.schedule()
    assert [a.slot for a in plan.admitted] == [0, 1] and plan.decode is None
    # The choice that reads the most prompt tokens within 8 positions: both rows, chunks of 3 would
    # read 6; the long row alone, a chunk of 8, reads 8.
    assert plan.prefill.seqs == [long] and plan.prefill.tokens == [list(range(8))]
    assert plan.prefill.positions == [list(range(8))] and plan.prefill.sample == []
    s.update(plan, answer(plan))
    # Rests of 4 and 3: both rows (4 x 12 + 4 x 4 = 64 query-key pairs, within 8^2), the short one
    # left-padded by one.
    plan = s.schedule()
    assert plan.prefill.seqs == [long, short] and plan.prefill.tokens == [[8, 9, 10, 11], [0, 1, 2, 3]]
    assert plan.prefill.key_mask == [[True] * 4, [False, True, True, True]]
    assert plan.prefill.positions[1] == [0, 0, 1, 2] and plan.prefill.sample == [0, 1]
    outputs = s.update(plan, answer(plan, token=9))
    assert [(o.seq, o.token) for o in outputs] == [(long, 9), (short, 9)]
    plan = s.schedule()  # now both decode their last token, in slot order
    assert plan.prefill is None and plan.decode.tokens == [[9], [9]] and plan.decode.positions == [[12], [3]]


def test_rests_of_prompts_over_long_cached_prefixes_are_read_one_per_call():
    """Each reads every key its slot holds: batched, both first tokens would wait for the pair."""
    s = scheduler(max_batch_size=4, prefill_chunk=16)
    histories = [list(range(100, 140)), list(range(200, 240))]
    for history in histories:
        s.add(Sequence(history, 1, GREEDY))
        while s.has_work:
            plan = s.schedule()
            s.update(plan, answer(plan))
    follow_ups = [Sequence(h + [1, 2, 3, 4], 1, GREEDY) for h in histories]  # 4 new tokens over 40 cached
    fresh = [Sequence([5, 6, 7, 8], 1, GREEDY), Sequence([9, 10, 11, 12], 1, GREEDY)]
    for seq in follow_ups:
        s.add(seq)
    plan = s.schedule()
    assert [seq.cached_tokens for seq in follow_ups] == [40, 40]
    assert plan.prefill.seqs == [follow_ups[0]] and plan.prefill.tokens == [[1, 2, 3, 4]]  # 4 x 44 pairs each
    s.update(plan, answer(plan))
    assert s.schedule().prefill.seqs == [follow_ups[1]]
    for seq in fresh:
        s.add(seq)
    assert s.schedule().prefill.seqs == fresh  # 4 x 4 pairs each: together


def test_a_prompts_last_chunk_runs_before_the_decode_call_which_then_runs_alone():
    """A new sequence's first token does not wait for a decode call over the running streams; the
    decode call follows alone (those streams get their token after the same work as in a mixed
    step), with the new sequence in it, and is never put off two steps in a row."""
    s = scheduler(max_batch_size=3, prefill_chunk=4)
    s.add(running := Sequence([1, 2], 10, GREEDY))
    plan = s.schedule()
    s.update(plan, answer(plan))
    s.add(new := Sequence(list(range(10, 16)), 10, GREEDY))  # 6 tokens: a chunk of 4, then 2
    plan = s.schedule()  # not its last chunk: the running stream decodes alongside
    assert plan.decode.seqs == [running] and plan.prefill.seqs == [new] and plan.prefill.sample == []
    s.update(plan, answer(plan))
    plan = s.schedule()  # its last chunk, alone: its first token comes out of this step
    assert plan.decode is None and plan.prefill.seqs == [new] and plan.prefill.sample == [0]
    s.update(plan, answer(plan))
    s.add(late := Sequence([20, 21], 10, GREEDY))
    plan = s.schedule()  # the decode call put off, alone; the late arrival takes its slot, no chunk yet
    assert plan.prefill is None and plan.decode.seqs == [running, new] and [a.seq for a in plan.admitted] == [late]
    s.update(plan, answer(plan))
    plan = s.schedule()
    assert plan.decode is None and plan.prefill.seqs == [late]
    s.update(plan, answer(plan))
    assert s.schedule().decode.seqs == [running, new, late]
    assert [len(seq.output) for seq in (running, new, late)] == [3, 2, 1]


def test_the_free_slot_sharing_the_longest_prefix_is_taken_and_kept():
    cache = FakeCache()
    s = scheduler(cache, max_batch_size=3, prefill_chunk=64)
    firsts = [Sequence([1, 2, 3, 4], 1, GREEDY), Sequence([1, 2, 9, 9, 9], 1, GREEDY), Sequence([5, 5], 1, GREEDY)]
    for seq in firsts:
        s.add(seq)
    plan = s.schedule()
    s.update(plan, answer(plan))  # max_tokens 1: all finish, slots 0, 1, 2 freed in that order
    assert s.free == [0, 1, 2] and s.slot_tokens == [[1, 2, 3, 4], [1, 2, 9, 9, 9], [5, 5]]
    follow = Sequence([1, 2, 9, 9, 8, 8], 2, GREEDY)
    s.add(follow)
    cache.calls.clear()
    plan = s.schedule()
    assert plan.admitted[0].slot == 1 and plan.admitted[0].kept == 4 and cache.calls == [("keep", 1, 4)]
    assert follow.cached_tokens == 4 and plan.prefill.tokens == [[8, 8]]
    assert (s.stats.prefix_queries, s.stats.prefix_hits) == (4 + 5 + 2 + len(follow.prompt), 4)


def test_a_prefix_the_cache_cannot_keep_is_read_whole():
    cache = FakeCache(refuse={0})
    s = scheduler(cache, max_batch_size=1, prefill_chunk=64)
    s.add(first := Sequence([1, 2, 3], 1, GREEDY))
    plan = s.schedule()
    s.update(plan, answer(plan))
    assert first.status is Status.FINISHED
    s.add(second := Sequence([1, 2, 3, 4], 1, GREEDY))
    cache.calls.clear()
    plan = s.schedule()
    assert cache.calls == [("keep", 0, 3), ("reset", 0)] and plan.admitted[0].kept == 0
    assert second.cached_tokens == 0 and plan.prefill.tokens == [[1, 2, 3, 4]]


def test_choices_of_one_prompt_wait_for_its_prefill_and_fork_it():
    cache = FakeCache()
    s = scheduler(cache, max_batch_size=4, prefill_chunk=16)
    prompt = list(range(1, 21))
    choices = [Sequence(list(prompt), 3, GREEDY) for _ in range(3)]
    other = Sequence([50, 51], 3, GREEDY)
    for seq in [*choices, other]:
        s.add(seq)
    plans = []
    while choices[2].status is Status.WAITING:
        plans.append(plan := s.schedule())
        s.update(plan, answer(plan))
    # The first choice reads the prompt in chunks; the others (and the request behind them) wait
    # until it is in its slot, then copy 19 tokens of it and read the last one.
    assert [a.seq for a in plans[0].admitted] == [choices[0]]
    assert [a.seq for a in plans[-1].admitted] == [choices[1], choices[2], other]
    assert [(a.slot, a.kept) for a in plans[-1].admitted] == [(1, 19), (2, 19), (3, 0)]
    assert ("copy", 0, 1, 19) in cache.calls and ("copy", 0, 2, 19) in cache.calls
    assert plans[-1].prefill.tokens == [[0, 20], [0, 20], [50, 51]]
    assert s.stats.prefill_tokens == 20 + 1 + 1 + 2 and s.stats.prefix_hits == 38


def test_without_the_prefix_cache_slots_are_reset_oldest_first():
    cache = FakeCache()
    s = scheduler(cache, max_batch_size=2, prefill_chunk=64, prefix_cache=False)
    s.add(Sequence([1, 2], 1, GREEDY))
    plan = s.schedule()
    s.update(plan, answer(plan))
    s.add(Sequence([1, 2, 3], 1, GREEDY))
    plan = s.schedule()
    assert plan.admitted[0].slot == 1 and cache.calls == [("reset", 0), ("reset", 1)]
    assert s.stats.prefix_queries == 0


def run_to_end(s: Scheduler, seq: Sequence, tokens: list[int]) -> list:
    s.add(seq)
    outputs = []
    for token in tokens:
        plan = s.schedule()
        outputs += s.update(plan, answer(plan, token))
        if seq.status is Status.FINISHED:
            return outputs
    raise AssertionError("the sequence did not finish")


@pytest.mark.parametrize("case", ["stop id", "stop string", "length"])
def test_one_place_decides_a_sequence_is_finished(case):
    s = scheduler(max_batch_size=1, prefill_chunk=64)
    text = TextStream(ByteTokenizer(), ("lo",))
    stop_ids = frozenset({ord("!")}) if case == "stop id" else frozenset()
    seq = Sequence([1], 3 if case == "length" else 10, GREEDY, stop_ids=stop_ids,
                   text=text if case == "stop string" else TextStream(ByteTokenizer()))
    tokens = {"stop id": b"ab!c", "stop string": b"hello", "length": b"abcdef"}[case]
    outputs = run_to_end(s, seq, list(tokens))
    assert outputs[-1].finished and s.free == [0] and not s.running
    expected = {"stop id": ("stop", ord("!"), "ab", 3), "stop string": ("stop", "lo", "hel", 5),
                "length": ("length", None, "abc", 3)}[case]
    assert (seq.finish_reason, seq.stop_reason, "".join(o.text for o in outputs), len(seq.output)) == expected


def test_a_paused_sequence_keeps_its_slot_and_is_left_out_of_decoding():
    s = scheduler(max_batch_size=2, prefill_chunk=64)
    a, b = Sequence([1, 2], 10, GREEDY), Sequence([3], 10, GREEDY)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    s.update(plan, answer(plan))
    s.pause(a)
    plan = s.schedule()
    assert plan.decode.seqs == [b] and a.slot == 0 and s.can_step
    s.pause(b)
    assert not s.can_step and s.schedule().empty
    s.resume(a)
    assert s.schedule().decode.seqs == [a]


def test_a_row_the_runner_could_not_sample_ends_with_an_error_alone():
    s = scheduler(max_batch_size=2, prefill_chunk=64)
    a, b = Sequence([1, 2], 10, GREEDY), Sequence([3], 10, GREEDY)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    result = answer(plan)
    del result.tokens[a]
    result.errors[a] = "RuntimeError: nan"
    outputs = s.update(plan, result)
    assert [(o.seq, o.error, o.finished) for o in outputs] == [(a, "RuntimeError: nan", True), (b, None, False)]
    assert a.finish_reason == "error" and s.running == [b] and s.free == [0]


def test_a_scoring_request_needs_no_slot_and_ends_once_scored():
    s = scheduler(max_batch_size=1, prefill_chunk=64)
    s.add(busy := Sequence([1, 2], 10, GREEDY))
    plan = s.schedule()
    s.update(plan, answer(plan))
    s.add(scored := Sequence([4, 5, 6], 0, GREEDY, prompt_logprobs=1))
    plan = s.schedule()  # admitted although no slot is free
    assert plan.scored == [scored] and not plan.admitted and s.free == []
    result = answer(plan)
    result.prompt_logprobs[scored] = [None, (5, -1.0, []), (6, -2.0, [])]
    outputs = s.update(plan, result)
    assert outputs[0].seq is scored and outputs[0].finished and scored.finish_reason == "length"
    assert busy.status is Status.DECODE


def test_serve_config_names_the_flag_of_a_bad_value():
    with pytest.raises(ValueError, match="--prefill-chunk must be >= 1"):
        ServeConfig(prefill_chunk=0)
    with pytest.raises(ValueError, match="--sink-tokens 4 needs --window"):
        ServeConfig(sink_tokens=4)
    with pytest.raises(ValueError, match="--stream-interval must be >= 0"):
        ServeConfig(stream_interval=-1)
    with pytest.raises(ValueError, match="--max-batch-size must be a whole number"):
        ServeConfig(max_batch_size=2.5)


def test_speculation_plans_prompt_lookup_proposals_and_records_what_was_accepted():
    s = scheduler(max_batch_size=2, prefill_chunk=64, speculative="ngram", num_speculative_tokens=3)
    echo = Sequence([1, 2, 3, 4, 5, 9, 1, 2], 10, GREEDY)  # "1 2" came before, followed by 3 4 5
    plain = Sequence([7, 8], 10, GREEDY, logprobs=0)  # wants logprobs: never speculates
    s.add(echo)
    s.add(plain)
    plan = s.schedule()
    s.update(plan, answer(plan, token=3))  # first tokens: echo now ends "... 1 2 3"
    plan = s.schedule()
    batch = plan.decode
    assert batch.proposals == [[4, 5, 9], []]  # after "2 3": the tokens that followed it before
    assert batch.tokens == [[3, 4, 5, 9], [3, 3, 3, 3]]
    assert batch.key_mask == [[True] * 4, [True, False, False, False]]
    assert batch.positions == [[8, 9, 10, 11], [2, 3, 4, 5]]
    result = StepResult(tokens={echo: [4, 5, 6], plain: [6]})  # two proposals accepted, then the model's 6
    outputs = s.update(plan, result)
    assert [o.token for o in outputs] == [4, 5, 6, 6] and echo.output == [3, 4, 5, 6]
    assert (s.stats.draft_tokens, s.stats.accepted_tokens) == (3, 2)


def test_speculation_never_proposes_past_max_tokens():
    s = scheduler(max_batch_size=1, prefill_chunk=64, speculative="ngram", num_speculative_tokens=8)
    seq = Sequence([1, 2, 3, 4, 5, 6, 1, 2], 3, GREEDY)
    s.add(seq)
    plan = s.schedule()
    s.update(plan, answer(plan, token=3))
    plan = s.schedule()
    assert plan.decode.proposals == [[4]]  # 3 tokens at most: this step's own, and one guess


def test_decode_steps_read_no_positions_back_from_the_device(monkeypatch):
    """A decode row continues its slot at the slot's next position, so the runner lets the cache
    take positions from its own bookkeeping: no (B, T) positions go to the device and back to be
    checked (`_real_spans`) in the hot path; only padded prefill chunks need them."""
    import torch

    from andromeda.model import cache as cache_module
    from andromeda.serve.core import EngineCore
    from helpers import random_net

    calls = []
    real = cache_module._real_spans
    monkeypatch.setattr(cache_module, "_real_spans", lambda *a: calls.append(1) or real(*a))
    core = EngineCore(random_net().eval(), ServeConfig(max_batch_size=2, prefill_chunk=64))
    seqs = [Sequence(list(range(5, 25)), 12, GREEDY), Sequence(list(range(30, 42)), 12, GREEDY)]
    for seq in seqs:
        core.add(seq)
    core.step()  # the prefill: two prompts of different lengths, one padded
    prefill_calls = len(calls)
    while core.has_work:
        core.step()
    assert core.stats.decode_calls >= 11 and len(calls) == prefill_calls <= 1
    assert all(len(s.output) == 12 for s in seqs) and torch.is_tensor(core.cache.next_position)
