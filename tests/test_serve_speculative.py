"""Speculative decoding in the server's engine core (`--speculative ngram`): each row proposes
what followed its last tokens earlier in its prompt and output, one forward verifies every row,
and each row keeps its own count. Greedy output is token for token the same as without it, alone
and in a batch of 16, penalties included; the proposals that were accepted are counted."""

from __future__ import annotations

import asyncio

import pytest
import torch

from andromeda.inference.sampling import SamplingParams
from andromeda.serve.config import ServeConfig
from andromeda.serve.core import EngineCore
from andromeda.serve.scheduler import Sequence
from andromeda.tokenizers import ByteTokenizer
from helpers import random_net

GREEDY = SamplingParams(0)


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(core: EngineCore, seqs: list[Sequence], max_steps: int = 500) -> int:
    """Step until every sequence has finished; returns the steps taken."""
    for seq in seqs:
        core.add(seq)
    for step in range(max_steps):
        if not core.has_work:
            return step
        core.step()
    raise AssertionError("the engine did not finish")


def batch(params: SamplingParams = GREEDY) -> list[Sequence]:
    """16 prompts: half repeat a passage (prompt lookup finds it), half are plain random tokens."""
    prompts = [tokens(i, 12) * 3 if i % 2 else tokens(i, 20 + i) for i in range(16)]
    return [Sequence(p, 24, params) for p in prompts]


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(0, frequency_penalty=0.05, repetition_penalty=1.05)],
                         ids=["greedy", "greedy-penalized"])
def test_greedy_output_is_unchanged_in_a_batch_of_16(params):
    net = random_net().eval()
    plain, speculated = batch(params), batch(params)
    run(EngineCore(net, ServeConfig(max_batch_size=16, prefill_chunk=64)), plain)
    core = EngineCore(net, ServeConfig(max_batch_size=16, prefill_chunk=64, speculative="ngram",
                                       num_speculative_tokens=4))
    run(core, speculated)
    assert [s.output for s in speculated] == [s.output for s in plain]
    assert [s.finish_reason for s in speculated] == [s.finish_reason for s in plain]
    stats = core.stats
    assert 0 < stats.accepted_tokens <= stats.draft_tokens
    # Fewer decode rows than tokens decoded (all but the first of each): rows took several at once.
    assert stats.decode_rows < sum(len(s.output) - 1 for s in speculated)


@pytest.mark.parametrize("draft_seed", [0, 1], ids=["perfect-draft", "poor-draft"])
def test_a_draft_model_keeps_greedy_output_in_a_batch_of_16(draft_seed):
    """The draft is the model itself (every proposal accepted) or another random model (few): the
    tokens are those of plain decoding either way."""
    net = random_net().eval()
    draft = random_net(seed=draft_seed).eval()
    plain, drafted = batch(), batch()
    run(EngineCore(net, ServeConfig(max_batch_size=16, prefill_chunk=64)), plain)
    core = EngineCore(net, ServeConfig(max_batch_size=16, prefill_chunk=64, speculative="draft",
                                       draft_checkpoint="unused", num_speculative_tokens=3), draft=draft)
    run(core, drafted)
    assert [s.output for s in drafted] == [s.output for s in plain]
    stats = core.stats
    if draft_seed == 0:
        assert stats.accepted_tokens == stats.draft_tokens > 0
    else:
        assert stats.accepted_tokens < stats.draft_tokens


def test_a_sequence_alone_equals_its_copy_in_the_batch():
    net = random_net().eval()
    config = ServeConfig(max_batch_size=16, prefill_chunk=64, speculative="ngram")
    together, alone = batch(), batch()[3]
    run(EngineCore(net, config), together)
    run(EngineCore(net, config), [alone])
    assert alone.output == together[3].output


def test_seeded_sampling_is_reproducible_and_the_engine_reports_acceptance():
    pytest.importorskip("prometheus_client")
    from andromeda.serve.engine import Engine, ModelSpec, SequenceRequest
    from andromeda.serve.metrics import Metrics

    net = random_net().eval()

    def outputs(seed: int) -> list[list[int]]:
        seqs = [Sequence(tokens(i, 12) * 3, 20, SamplingParams(0.8, top_k=20), seed + i) for i in range(4)]
        run(EngineCore(net, ServeConfig(max_batch_size=4, prefill_chunk=64, speculative="ngram")), seqs)
        return [s.output for s in seqs]

    assert outputs(1) == outputs(1) != outputs(2)
    metrics = Metrics("m")
    engine = Engine(ModelSpec(None), ByteTokenizer(), ServeConfig(max_batch_size=2, speculative="ngram"),
                    metrics=metrics, loader=lambda spec: net)
    engine.start()
    try:
        assert engine.ready.wait(30)

        async def scenario():
            stream = engine.submit([SequenceRequest(0, tokens(5, 12) * 3, 20, GREEDY)], asyncio.get_running_loop())
            while not any(d.finish_reason for d in await asyncio.wait_for(stream.get(), 10)):
                pass

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.shutdown()
        engine.join(10)
    draft = metrics.registry.get_sample_value("andromeda_spec_decode_num_draft_tokens_total", {"model_name": "m"})
    accepted = metrics.registry.get_sample_value("andromeda_spec_decode_num_accepted_tokens_total",
                                                 {"model_name": "m"})
    assert draft > 0 and 0 < accepted <= draft


def test_bad_speculation_options_name_the_flag():
    with pytest.raises(ValueError, match="--num-speculative-tokens must be >= 1"):
        ServeConfig(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="--num-speculative-tokens must be <= 32"):
        ServeConfig(speculative="ngram", num_speculative_tokens=33)
    with pytest.raises(ValueError, match="--speculative with --window"):
        ServeConfig(speculative="ngram", window=64)
    with pytest.raises(ValueError, match="--speculative draft needs --draft-checkpoint"):
        ServeConfig(speculative="draft")
    with pytest.raises(ValueError, match="--draft-checkpoint goes with --speculative draft only"):
        ServeConfig(speculative="ngram", draft_checkpoint="d")
    with pytest.raises(ValueError, match="--speculative must be ngram or draft"):
        ServeConfig(speculative="eagle")


def test_serve_checks_the_draft_before_it_binds_a_port(tmp_path):
    pytest.importorskip("fastapi")
    from andromeda import Andromeda
    from andromeda.checkpoint import save_pretrained
    from andromeda.serve.server import serve

    save_pretrained(random_net(), tmp_path / "target", tokenizer=ByteTokenizer())
    torch.manual_seed(0)
    save_pretrained(Andromeda.from_config("tiny", num_tokens=300).Andromeda, tmp_path / "vocab300",
                    tokenizer=ByteTokenizer())
    config = ServeConfig(port=0, speculative="draft", draft_checkpoint=str(tmp_path / "vocab300"))
    with pytest.raises(ValueError, match="--draft-checkpoint .*vocab300 has a vocabulary of 300 ids"):
        serve(tmp_path / "target", config)
    with pytest.raises(FileNotFoundError, match="--draft-checkpoint"):
        serve(tmp_path / "target", config.replace(draft_checkpoint=str(tmp_path / "missing")))
