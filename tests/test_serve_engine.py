"""The serving core without HTTP: the scheduler's continuous batching equals `generate` for every
feature mix (chunked and padded prefills, queueing, slot reuse); stop strings are cut right and
never sent; the engine thread frees a cancelled request's slot; /health says 503 while loading."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

from andromeda.inference.generate import IncrementalDecoder, generate
from andromeda.inference.sampling import SamplingParams
from andromeda.serve.detokenizer import TextStream, TokenStrings
from andromeda.serve.config import ServeConfig
from andromeda.serve.core import EngineCore
from andromeda.serve.engine import Engine, ModelSpec, SequenceRequest
from andromeda.serve.scheduler import Sequence
from andromeda.tokenizers import ByteTokenizer
from helpers import FEATURES, random_net

TOKENIZER = ByteTokenizer()


def run_to_end(scheduler: EngineCore, arrivals: dict[int, list[Sequence]], max_steps: int = 400) -> None:
    for step in range(max_steps):
        for seq in arrivals.get(step, []):
            scheduler.add(seq)
        if step > max(arrivals) and not scheduler.has_work:
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("overrides", FEATURES.values(), ids=FEATURES.keys())
def test_continuous_batching_equals_generate(overrides):
    """Twelve requests of different lengths over five slots, arriving over time, prompts read in
    chunks of up to 16 positions (so some rows are padded): each gets `generate`'s tokens."""
    net = random_net(**overrides).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 40, 7, 17, 1, 33, 12, 5, 29, 9, 2, 21)]
    news = [6, 3, 14, 9, 11, 1, 7, 12, 4, 10, 8, 5]
    seqs = [Sequence(p, n, SamplingParams(0)) for p, n in zip(prompts, news)]
    scheduler = EngineCore(net, ServeConfig(max_batch_size=5, prefill_chunk=16))
    run_to_end(scheduler, {0: seqs[:6], 3: seqs[6:9], 9: seqs[9:]})
    for seq, prompt, new in zip(seqs, prompts, news):
        assert seq.output == generate(net, torch.tensor(prompt), new, temperature=0)[0].tolist()
        assert seq.finish_reason == "length"
    assert scheduler.stats.prefill_positions > scheduler.stats.prefill_tokens, "no prefill was padded"
    assert scheduler.stats.decode_rows > scheduler.stats.decode_calls, "no decode step was batched"
    assert sorted(scheduler.free) == list(range(5)) and not scheduler.running


def test_sampled_rows_draw_from_their_own_generators():
    """A seeded row draws the same tokens alone and batched with others (its generator is its
    own), and the tokens `generate` draws with that seed."""
    net = random_net().eval()
    params = SamplingParams(1.0, top_k=40)
    prompt = list(range(10, 30))

    def seeded(seed: int) -> Sequence:
        return Sequence(prompt, 20, params, seed)

    alone = seeded(7)
    run_to_end(EngineCore(net, ServeConfig(max_batch_size=4)), {0: [alone]})
    batched = seeded(7)
    others = [seeded(s) for s in (1, 2)] + [Sequence(prompt[:5], 25, SamplingParams(0))]
    run_to_end(EngineCore(net, ServeConfig(max_batch_size=4)), {0: [others[0], batched], 2: others[1:]})
    expected = generate(net, torch.tensor(prompt), 20, temperature=1.0, top_k=40,
                        generator=torch.Generator().manual_seed(7))[0].tolist()
    assert alone.output == batched.output == expected
    assert others[0].output != alone.output


def test_stop_ids_end_a_sequence_and_free_its_slot():
    net = random_net().eval()
    prompt = list(range(40, 50))
    free_run = generate(net, torch.tensor(prompt), 12, temperature=0)[0].tolist()
    stop = free_run[5]
    seq = Sequence(prompt, 12, SamplingParams(0), stop_ids=frozenset({stop}))
    scheduler = EngineCore(net, ServeConfig(max_batch_size=1))
    run_to_end(scheduler, {0: [seq]})
    assert seq.output == free_run[: free_run.index(stop) + 1] and seq.finish_reason == "stop"
    assert scheduler.free == [0]


def test_prompt_logprobs_are_a_full_forward_and_need_no_slot():
    net = random_net().eval()
    prompt = list(range(60, 75))
    seq = Sequence(prompt, 0, SamplingParams(0), prompt_logprobs=2)
    scheduler = EngineCore(net, ServeConfig(max_batch_size=1))
    scheduler.add(seq)
    (out,) = scheduler.step()
    with torch.no_grad():
        expected = net(torch.tensor([prompt]))[0, :-1].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and out.finished and seq.finish_reason == "length"
    for position, (token, logprob, top) in enumerate(out.prompt_logprobs[1:]):
        assert token == prompt[position + 1]
        assert logprob == pytest.approx(float(expected[position, token]), abs=1e-5)
        assert [t for t, _ in top] == expected[position].topk(2).indices.tolist()
    assert scheduler.free == [0] and scheduler.cache.lengths == [0]


# ----------------------------------------------------------------------------- text


def stream_pieces(ids: list[int], stop: tuple[str, ...]) -> tuple[list[str], TextStream]:
    stream = TextStream(TOKENIZER, stop)
    pieces = [stream.push(i) for i in ids]
    if stream.stopped is None:
        pieces.append(stream.flush())
    return pieces, stream


def test_stop_strings_spanning_tokens_are_cut_and_never_sent():
    ids = TOKENIZER.encode("Hello wörld, goodbye")
    pieces, stream = stream_pieces(ids, ("ld, g", "xyz"))
    assert "".join(pieces) == "Hello wör" and stream.stopped == "ld, g"
    assert not any("l" in p for p in pieces[ids.index(ord("l"), 4):]), "held-back text was sent early"
    # A candidate that does not complete is released: "wo" could start "wow" until "r" comes.
    pieces, stream = stream_pieces(ids, ("wow",))
    assert "".join(pieces) == "Hello wörld, goodbye" and stream.stopped is None
    # The earliest stop string wins, even when a longer one started before it.
    pieces, stream = stream_pieces(TOKENIZER.encode("abcdef"), ("bcdx", "cd"))
    assert "".join(pieces) == "ab" and stream.stopped == "cd"


def test_text_stream_equals_the_generate_decoder_on_any_bytes():
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.choice((rng.randrange(258), rng.randrange(0x80, 0x100), 0xC3, 0xE2, 0xF0, 0x41))
               for _ in range(rng.randrange(1, 25))]
        reference = IncrementalDecoder(TOKENIZER)
        expected = "".join(reference.push(i) for i in ids) + reference.flush()
        pieces, _ = stream_pieces(ids, ())
        assert "".join(pieces) == expected == TOKENIZER.decode(ids)


def test_token_strings_are_distinct():
    strings = TokenStrings(TOKENIZER, {256: "<|endoftext|>", 257: "<|pad|>"})
    names = [strings.text(i) for i in range(258)]
    assert len(set(names)) == 258
    assert names[65] == "A" and names[0xC3] == "bytes:\\xc3" and names[256] == "<|endoftext|>"
    assert strings.bytes(0xC3) == [0xC3]


# ----------------------------------------------------------------------------- the engine thread


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from andromeda.checkpoint import save_pretrained

    save_pretrained(random_net(), tmp_path / "ckpt", tokenizer=TOKENIZER)
    return tmp_path / "ckpt"


def test_engine_frees_an_aborted_requests_slot(tiny_checkpoint):
    engine = Engine(ModelSpec(tiny_checkpoint), TOKENIZER, ServeConfig(max_batch_size=2, max_queue=0))
    engine.start()
    try:
        assert engine.ready.wait(30)

        async def scenario() -> list[int]:
            loop = asyncio.get_running_loop()
            long = SequenceRequest(0, [256, 65], 900, SamplingParams(0))
            stream = engine.submit([long], loop, request_id="long")
            first = await asyncio.wait_for(stream.get(), 10)
            engine.abort("long")
            deadline = time.monotonic() + 10
            while engine.core.running:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            short = engine.submit([SequenceRequest(0, [256, 66], 3, SamplingParams(0))], loop)
            tokens = []
            while True:
                deltas = await asyncio.wait_for(short.get(), 10)
                tokens += [t for d in deltas for t in d.token_ids]
                if any(d.finish_reason for d in deltas):
                    return [len(first)] + tokens

        result = asyncio.run(scenario())
        assert len(result) == 4 and sorted(engine.core.free) == [0, 1]
    finally:
        engine.shutdown()
        engine.join(10)
    assert not engine.alive


def test_a_plain_request_is_handed_its_choices_at_their_end_and_a_stream_as_it_goes(tiny_checkpoint):
    """A non-streamed request's client reads nothing before the end, so the engine hands it
    nothing before (each handover costs the engine time); a streamed one gets its first token at
    once and the rest in pieces. Both get the same tokens."""
    engine = Engine(ModelSpec(tiny_checkpoint), TOKENIZER, ServeConfig(max_batch_size=4, stream_interval=0))
    engine.start()
    try:
        assert engine.ready.wait(30)

        async def read(stream) -> list[list]:
            handovers = []
            while not any(d.finish_reason for batch in handovers for d in batch) or \
                    sum(d.finish_reason is not None for batch in handovers for d in batch) < 2:
                handovers.append(await asyncio.wait_for(stream.get(), 10))
            return handovers

        async def scenario():
            loop = asyncio.get_running_loop()
            choices = [SequenceRequest(i, [256, 65 + i], 40, SamplingParams(0)) for i in range(2)]
            plain = engine.submit(choices, loop, streaming=False)
            streamed = engine.submit([SequenceRequest(i, [256, 65 + i], 40, SamplingParams(0)) for i in range(2)],
                                     loop)
            return await asyncio.gather(read(plain), read(streamed))

        plain, streamed = asyncio.run(scenario())
    finally:
        engine.shutdown()
        engine.join(10)
    # Every handover of the plain request ends a choice; the stream came in many pieces.
    assert len(plain) <= 2 and all(any(d.finish_reason for d in batch) for batch in plain)
    assert len(streamed) > 5

    def tokens(handovers, index):
        return [t for batch in handovers for d in batch if d.index == index for t in d.token_ids]

    assert [tokens(plain, i) for i in range(2)] == [tokens(streamed, i) for i in range(2)]
    assert all(len(tokens(plain, i)) == 40 for i in range(2))


def test_health_is_503_while_loading_then_200(tiny_checkpoint):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from andromeda.checkpoint import load_config
    from andromeda.serve.app import ServerContext, create_app
    from andromeda.serve.engine import load_model
    from andromeda.serve.metrics import Metrics

    release = threading.Event()

    def slow_loader(spec):
        release.wait(30)
        return load_model(spec)

    engine = Engine(ModelSpec(tiny_checkpoint), TOKENIZER, loader=slow_loader)
    ctx = ServerContext(engine, TOKENIZER, load_config(tiny_checkpoint), "tiny", Metrics("tiny"))
    with TestClient(create_app(ctx)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        refused = client.post("/v1/completions", json={"prompt": "a"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_loading"
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    assert not engine.alive


def test_with_a_window_sequences_continue_past_the_context_as_generate_does():
    """A server started with --window slides like `generate` past max_seq_len: the same tokens,
    for requests of different lengths batched together, in a cache that never grows."""
    net = random_net(max_seq_len=48).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 30, 12)]
    news = [90, 70, 100]  # each ends far past the 48-token context
    seqs = [Sequence(p, n, SamplingParams(0)) for p, n in zip(prompts, news)]
    scheduler = EngineCore(net, ServeConfig(max_batch_size=3, prefill_chunk=16, window=48, sink_tokens=4))
    shape = scheduler.cache.k.shape
    run_to_end(scheduler, {0: seqs[:2], 4: seqs[2:]})
    for seq, prompt, new in zip(seqs, prompts, news):
        expected = generate(net, torch.tensor(prompt), new, temperature=0, window=48, sink_tokens=4)[0].tolist()
        assert seq.output == expected
    assert scheduler.cache.k.shape == shape
    with pytest.raises(ValueError, match="learned absolute positions cannot slide"):
        EngineCore(random_net(max_seq_len=48, use_abs_pos_emb=True), ServeConfig(window=48))
