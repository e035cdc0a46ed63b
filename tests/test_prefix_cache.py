"""Prefix reuse in `serve`: a new sequence takes the free slot whose cached tokens share the
longest prefix with its prompt, keeps it and prefills only the rest. The tokens are those of a
full prefill (greedy and seeded), `cached_tokens` and the metrics count exactly what was reused,
and `--no-prefix-cache` turns it off."""

from __future__ import annotations

import asyncio

import pytest
import torch

from andromeda.inference.generate import generate
from andromeda.inference.sampling import SamplingParams
from andromeda.serve.config import ServeConfig
from andromeda.serve.core import EngineCore
from andromeda.serve.engine import Engine, ModelSpec, SequenceRequest
from andromeda.serve.scheduler import Sequence
from andromeda.tokenizers import ByteTokenizer
from helpers import FEATURES, random_net

TOKENIZER = ByteTokenizer()
GREEDY = SamplingParams(0)
SAMPLED = SamplingParams(1.0, top_k=40)


def run(scheduler: EngineCore, *seqs: Sequence, max_steps: int = 300) -> None:
    """Add `seqs` together and step until the scheduler is idle."""
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(max_steps):
        if not scheduler.has_work:
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def conversation(scheduler: EngineCore, make, first: list[int], follow_up: list[int]) -> tuple[Sequence, Sequence]:
    """Turn 1, then turn 2 = turn 1's prompt, its completion and `follow_up`, on one scheduler."""
    one = make(first)
    run(scheduler, one)
    two = make(first + one.output + follow_up)
    run(scheduler, two)
    return one, two


@pytest.mark.parametrize("overrides", [FEATURES[k] for k in ("seed", "xpos_only", "alibi_only", "abs_pos_emb_only")],
                         ids=["seed", "xpos_only", "alibi_only", "abs_pos_emb_only"])
def test_multi_turn_reuses_the_conversation_with_the_same_greedy_tokens(overrides):
    """Turn 2 reuses turn 1's prompt and completion (all but its last token, which never entered
    the cache), read in chunks of 8 so the kept prefix ends mid-chunk: the tokens of a full
    prefill and of `generate`. A repeated prompt reuses all but its last token."""
    net = random_net(**overrides).eval()
    first, follow_up = tokens(1, 21), tokens(2, 7)

    def make(prompt):
        return Sequence(prompt, 9, GREEDY)

    reused = EngineCore(net, ServeConfig(max_batch_size=2, prefill_chunk=8))
    one, two = conversation(reused, make, first, follow_up)
    plain = EngineCore(net, ServeConfig(max_batch_size=2, prefill_chunk=8, prefix_cache=False))
    one_plain, two_plain = conversation(plain, make, first, follow_up)
    assert two.output == two_plain.output == generate(net, torch.tensor(two.prompt), 9, temperature=0)[0].tolist()
    assert one.output == one_plain.output
    assert (one.cached_tokens, two.cached_tokens) == (0, len(first) + len(one.output) - 1)
    assert two_plain.cached_tokens == 0 and plain.stats.prefix_queries == plain.stats.prefix_hits == 0
    assert reused.stats.prefix_queries == len(one.prompt) + len(two.prompt)
    assert reused.stats.prefix_hits == two.cached_tokens
    assert reused.stats.prefill_tokens == plain.stats.prefill_tokens - two.cached_tokens

    again = make(list(two.prompt))
    run(reused, again)
    assert again.cached_tokens == len(two.prompt) - 1 and again.output == two.output


def test_seeded_sampling_draws_the_same_tokens_with_and_without_reuse():
    net = random_net().eval()
    first, follow_up = tokens(3, 30), tokens(4, 5)

    def make(prompt):
        return Sequence(prompt, 12, SAMPLED, 11)

    one, two = conversation(EngineCore(net, ServeConfig(max_batch_size=2, prefill_chunk=16)), make, first, follow_up)
    one_plain, two_plain = conversation(EngineCore(net, ServeConfig(max_batch_size=2, prefill_chunk=16, prefix_cache=False)),
                                        make, first, follow_up)
    assert two.cached_tokens == len(first) + len(one.output) - 1
    assert one.output == one_plain.output and two.output == two_plain.output
    expected = generate(net, torch.tensor(two.prompt), 12, temperature=1.0, top_k=40,
                        generator=torch.Generator().manual_seed(11))[0].tolist()
    assert two.output == expected


def test_concurrent_follow_ups_each_find_their_own_slot_and_equal_each_alone():
    """Three conversations' first turns fill three slots; their second turns, admitted together in
    another order (with a stranger's prompt), each take the slot holding their own conversation
    and decode batched, with the tokens each gets alone with no reuse."""
    net = random_net().eval()
    scheduler = EngineCore(net, ServeConfig(max_batch_size=4, prefill_chunk=16))
    firsts = [Sequence(tokens(10 + i, n), 6, GREEDY) for i, n in enumerate((9, 25, 14))]
    run(scheduler, *firsts)
    follow_ups = [Sequence(f.prompt + f.output + tokens(20 + i, 4 + i), 8, GREEDY) for i, f in enumerate(firsts)]
    stranger = Sequence(tokens(30, 12), 8, GREEDY)
    batch = [follow_ups[2], stranger, follow_ups[0], follow_ups[1]]
    run(scheduler, *batch)
    assert scheduler.stats.decode_rows > scheduler.stats.decode_calls, "no decode step was batched"
    for first, follow_up in zip(firsts, follow_ups):
        assert follow_up.cached_tokens == len(first.prompt) + len(first.output) - 1
        alone = Sequence(list(follow_up.prompt), 8, GREEDY)
        run(EngineCore(net, ServeConfig(max_batch_size=1, prefill_chunk=16, prefix_cache=False)), alone)
        assert follow_up.output == alone.output
    assert stranger.cached_tokens == 0
    assert scheduler.stats.prefix_hits == sum(s.cached_tokens for s in follow_ups)
    assert scheduler.stats.prefix_queries == sum(len(s.prompt) for s in firsts + batch)


def test_prompt_logprobs_requests_read_the_whole_prompt():
    """Prompt logprobs need a forward over the whole prompt: not looked up (cached_tokens None,
    reported as 0 cached tokens), nothing counted."""
    net = random_net().eval()
    scheduler = EngineCore(net, ServeConfig(max_batch_size=1, prefill_chunk=16))
    first = Sequence(tokens(5, 12), 4, GREEDY)
    run(scheduler, first)
    scored = Sequence(first.prompt + first.output, 3, GREEDY, prompt_logprobs=1)
    queries = scheduler.stats.prefix_queries
    run(scheduler, scored)
    assert scored.cached_tokens is None and scheduler.stats.prefix_queries == queries
    assert scored.output == generate(net, torch.tensor(scored.prompt), 3, temperature=0)[0].tolist()


def test_padding_kept_in_reused_prefixes_never_overflows_a_slot():
    """A conversation whose every turn is prefilled beside a longer prompt keeps a padded chunk
    in its slot each time (7 entries here); reused turn after turn, the padding piles up. A turn
    whose rest might then not fit the slot's capacity (context + one chunk) is read whole
    instead, and the last turn, filling the context, gets `generate`'s tokens."""
    net = random_net(max_seq_len=48).eval()
    scheduler = EngineCore(net, ServeConfig(max_batch_size=2, prefill_chunk=32))
    seq = Sequence(tokens(1, 20), 2, GREEDY)
    run(scheduler, seq)
    cached = []
    for turn in range(8):
        prompt = seq.prompt + seq.output  # only the last token is new: padded to the companion's 8
        seq = Sequence(prompt, 48 - len(prompt) if turn == 7 else 2, GREEDY)
        run(scheduler, Sequence(tokens(10 + turn, 8), 1, GREEDY), seq)
        cached.append(seq.cached_tokens)
    assert 0 in cached and cached[-1] == len(seq.prompt) - 1
    assert scheduler.cache.lengths[0] > len(seq.prompt) + len(seq.output), "no padding was kept"
    assert seq.output == generate(net, torch.tensor(seq.prompt), seq.max_tokens, temperature=0)[0].tolist()


def test_a_failed_step_forgets_what_its_slots_hold():
    """A step that raises after the first layer wrote its keys leaves the slot half written: the
    next prompt sharing that conversation is read whole, with `generate`'s tokens."""
    net = random_net().eval()
    scheduler = EngineCore(net, ServeConfig(max_batch_size=1, prefill_chunk=16))
    first = Sequence(tokens(8, 12), 5, GREEDY)
    run(scheduler, first)
    second = Sequence(first.prompt + first.output + tokens(9, 6), 4, GREEDY)
    scheduler.add(second)

    def fail(module, args, output):
        raise RuntimeError("out of memory (simulated)")

    hook = net.final_norm.register_forward_hook(fail)  # after every layer appended to the cache
    with pytest.raises(RuntimeError, match="simulated"):
        scheduler.step()
    hook.remove()
    scheduler.finish(second, "abort")  # what the engine does with a failed step's sequences
    third = Sequence(list(second.prompt), 4, GREEDY)
    run(scheduler, third)
    assert third.cached_tokens == 0
    assert third.output == generate(net, torch.tensor(third.prompt), 4, temperature=0)[0].tolist()


def test_a_wrapped_ring_buffer_that_cannot_be_cut_is_prefilled_again():
    """With --window a slot that has wrapped cannot go back to a short prefix (the cache refuses):
    the prompt is read whole, with `generate`'s tokens."""
    net = random_net(max_seq_len=48).eval()
    scheduler = EngineCore(net, ServeConfig(max_batch_size=1, prefill_chunk=16, window=48, sink_tokens=4))
    first = Sequence(tokens(6, 10), 60, GREEDY)  # ends past the window: the ring wraps
    run(scheduler, first)
    second = Sequence(first.prompt + first.output[:20] + tokens(7, 5), 10, GREEDY)
    run(scheduler, second)
    assert second.cached_tokens == 0 and scheduler.stats.prefix_hits == 0
    expected = generate(net, torch.tensor(second.prompt), 10, temperature=0, window=48, sink_tokens=4)[0].tolist()
    assert second.output == expected


# ----------------------------------------------------------------------------- the engine thread


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from andromeda.checkpoint import save_pretrained

    save_pretrained(random_net(), tmp_path / "ckpt", tokenizer=TOKENIZER)
    return tmp_path / "ckpt"


def engine_conversation(checkpoint, **options) -> tuple[list[tuple[list[int], int]], dict[str, float]]:
    """Two turns through an engine thread: each turn's tokens and reported cached_tokens, and the
    prefix-cache metrics."""
    from andromeda.serve.metrics import Metrics

    metrics = Metrics("tiny")
    engine = Engine(ModelSpec(checkpoint), TOKENIZER, ServeConfig(max_batch_size=2, **options), metrics=metrics)
    engine.start()

    async def turn(prompt: list[int]) -> tuple[list[int], int]:
        stream = engine.submit([SequenceRequest(0, prompt, 8, GREEDY)], asyncio.get_running_loop())
        out, cached = [], None
        for _ in range(100):
            for delta in await asyncio.wait_for(stream.get(), 10):
                out += delta.token_ids
                if delta.finish_reason is not None:
                    cached = delta.cached_tokens
            if cached is not None:
                return out, cached
        raise AssertionError("the request did not finish")

    async def scenario() -> list[tuple[list[int], int]]:
        first = [TOKENIZER.eos_id] + TOKENIZER.encode("Hello there, engine")
        one = await turn(first)
        two = await turn(first + one[0] + TOKENIZER.encode(" again"))
        return [one, two]

    try:
        assert engine.ready.wait(30)
        turns = asyncio.run(scenario())
    finally:
        engine.shutdown()
        engine.join(10)
    counters = {name: metric._value.get() for name, metric in
                (("queries", metrics.prefix_cache_queries), ("hits", metrics.prefix_cache_hits))}
    return turns, counters


def test_engine_reports_cached_tokens_and_counts_them_in_metrics(tiny_checkpoint):
    pytest.importorskip("prometheus_client")
    (one, two), counters = engine_conversation(tiny_checkpoint)
    (one_plain, two_plain), counters_plain = engine_conversation(tiny_checkpoint, prefix_cache=False)
    prompt_one = 1 + len("Hello there, engine")
    assert one == one_plain and two[0] == two_plain[0]
    assert one[1] == 0 and two[1] == prompt_one + len(one[0]) - 1 and two_plain[1] == 0
    prompt_two = prompt_one + len(one[0]) + len(" again")
    assert counters == {"queries": prompt_one + prompt_two, "hits": two[1]}
    assert counters_plain == {"queries": 0, "hits": 0}


# ----------------------------------------------------------------------------- HTTP


def test_http_usage_reports_cached_tokens_and_the_same_text_as_without_reuse(tiny_checkpoint):
    """Two completions sharing a prefix on a real server: the second reports
    usage.prompt_tokens_details.cached_tokens (0 with --no-prefix-cache) with the same text, and
    /metrics counts the tokens looked up and found."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import Server

    shared = "You are a terse assistant. Answer in one word. "
    prompts = [shared + "Q: colour of the sky?", shared + "Q: colour of grass?"]
    servers = [Server(tiny_checkpoint, "--max-batch-size", "2"),
               Server(tiny_checkpoint, "--max-batch-size", "2", "--no-prefix-cache")]
    try:
        for server in servers:
            server.wait_ready()
        answers = []
        for server in servers:
            bodies = [httpx.post(f"{server.url}/v1/completions", timeout=30,
                                 json={"prompt": p, "max_tokens": 6, "temperature": 0}).json() for p in prompts]
            answers.append([(b["choices"][0]["text"], b["usage"]["prompt_tokens_details"]["cached_tokens"])
                            for b in bodies])
        metrics = servers[0].metrics()
    finally:
        for server in servers:
            server.stop()
    (first, second), (first_plain, second_plain) = answers
    assert first == first_plain == (first[0], 0)
    assert second[0] == second_plain[0] and second_plain[1] == 0
    assert 1 + len(shared) <= second[1] < 1 + len(prompts[1])  # eos, the shared text; never the last token
    assert metrics["andromeda_prefix_cache_queries_total"] == sum(1 + len(p) for p in prompts)
    assert metrics["andromeda_prefix_cache_hits_total"] == second[1]


def test_choices_of_one_prompt_fork_its_prefill_and_draw_the_same_tokens():
    """Four choices of one 40-token prompt (two greedy, two seeded) and a request sharing its first
    30 tokens: the prompt is read once and forked, and every sequence gets what it gets with the
    prefix cache off."""
    net = random_net().eval()
    prompt = tokens(3, 40)

    def batch() -> list[Sequence]:
        return [Sequence(list(prompt), 10, GREEDY), Sequence(list(prompt), 10, SAMPLED, 5),
                Sequence(list(prompt), 10, SAMPLED, 6), Sequence(list(prompt), 10, GREEDY),
                Sequence(prompt[:30] + tokens(4, 6), 10, GREEDY)]

    forked, plain = batch(), batch()
    core = EngineCore(net, ServeConfig(max_batch_size=5, prefill_chunk=16))
    run(core, *forked)
    run(EngineCore(net, ServeConfig(max_batch_size=5, prefill_chunk=16, prefix_cache=False)), *plain)
    assert [s.output for s in forked] == [s.output for s in plain]
    assert [s.cached_tokens for s in forked] == [0, 39, 39, 39, 30]
    assert core.stats.prefill_tokens == 40 + 3 + 6
