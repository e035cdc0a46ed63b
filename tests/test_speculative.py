"""Speculative decoding (`inference.speculative`, `inference.proposers`, `andromeda generate
--speculative`): prompt lookup finds the latest longest match; greedy output equals ordinary
decoding token for token, alone and in a batch, with prompt lookup and with a draft model, with
penalties; the rejection rule keeps the target's distribution (chi-square on a tiny vocabulary);
the policy stops proposing where little is accepted; the command line's flags and refusals."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from andromeda import Andromeda, cli
from andromeda.checkpoint import save_pretrained
from andromeda.inference import kv_attention
from andromeda.inference.generate import generate
from andromeda.inference.proposers import NgramProposer
from andromeda.inference.speculative import (
    SpeculationPolicy,
    SpeculationStats,
    accept_greedy,
    accept_row,
    accept_sampled,
    speculative_generate,
)
from andromeda.inference.sampling import SamplingParams, TokenCounts
from andromeda.tokenizers import ByteTokenizer, train_bpe
from helpers import random_net

TOKENIZER = ByteTokenizer()
# Input-grounded text: the second half repeats passages of the first, so prompt lookup has matches.
GROUNDED = "the cat sat on the mat. the dog sat on the log. the cat sat on"
PENALTIES = dict(frequency_penalty=0.6, presence_penalty=0.3, repetition_penalty=1.2)


# ----------------------------------------------------------------------------- prompt lookup


def lookup_by_scanning(ids: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The reference: scan back for the latest earlier occurrence of the last n tokens, n from max_n down."""
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        suffix = ids[len(ids) - n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == suffix:
                return ids[start + n:start + n + k]
    return []


def test_ngram_proposes_what_followed_the_latest_longest_match():
    proposer = NgramProposer(max_n=3, min_n=1)
    assert proposer.propose([5, 6, 7, 1, 5, 6, 9, 2, 5, 6], 3) == [9, 2, 5]  # latest "5 6", not the first
    rng = random.Random(0)
    for trial in range(30):
        proposer, ids = NgramProposer(max_n=4, min_n=2), []
        for _ in range(60):  # the sequence grows by 1-3 tokens between calls, as accepted tokens arrive
            ids.extend(rng.randrange(4) for _ in range(rng.randint(1, 3)))
            assert proposer.propose(ids, 5) == lookup_by_scanning(ids, 5, 4, 2), (trial, ids)
    assert NgramProposer().propose([1, 2, 3, 4], 4) == []  # nothing repeats: a plain step


# ----------------------------------------------------------------------------- greedy equality


def grounded_prompts(net, rows: int) -> list[list[int]]:
    """Prompts of different lengths whose endings repeat an earlier passage of their own."""
    torch.manual_seed(0)
    prompts = []
    for length in (9, 16, 12, 7)[:rows]:
        passage = torch.randint(0, net.config.num_tokens, (length,)).tolist()
        prompts.append(passage + passage[: length // 2] + passage)
    return prompts


@pytest.mark.parametrize("features", [{}, dict(use_abs_pos_emb=True, max_seq_len=96)], ids=["seed", "abs-pos"])
@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_prompt_lookup_equals_generate_alone_and_in_a_batch(features, rows):
    net = random_net(**features).eval()
    prompts = grounded_prompts(net, rows)
    # The last row stops at about 20 tokens, at its first id that none of its first 20 is.
    last = generate(net, torch.tensor(prompts[-1]), 40, temperature=0)[0].tolist()
    eos = next(token for token in last[20:] if token not in last[:20])
    expected = [generate(net, torch.tensor(p), 40, temperature=0, eos_token=eos)[0] for p in prompts]
    stats = SpeculationStats()
    out = speculative_generate(net, prompts, 40, temperature=0, eos_token=eos, stats=stats)
    assert torch.equal(out, torch.stack(expected))
    assert stats.accepted > 0 and stats.steps < stats.tokens, stats  # speculation did take several tokens at once


@pytest.mark.parametrize("penalties", [{}, PENALTIES], ids=["plain", "penalties"])
def test_greedy_with_a_draft_model_equals_generate(penalties):
    net = random_net().eval()
    prompts = [p[:20] for p in grounded_prompts(net, 3)]
    expected = torch.stack([generate(net, torch.tensor(p), 30, temperature=0, **penalties)[0] for p in prompts])
    for draft, acceptance in ((net, 0.4), (random_net(seed=3, depth=1).eval(), 0.0)):  # a perfect and a poor draft
        stats = SpeculationStats()
        out = speculative_generate(net, prompts, 30, temperature=0, draft=draft, stats=stats, **penalties)
        assert torch.equal(out, expected)
        assert stats.proposed > 0 and stats.acceptance_rate >= acceptance, stats


NO_KERNEL = kv_attention.unavailable_reason()  # as test_kv_cache_int8: a failed build fails the test


@pytest.mark.skipif(NO_KERNEL is not None and not NO_KERNEL.startswith("building"),
                    reason=f"no int8 decode-attention kernel: {NO_KERNEL}")
def test_an_int8_cache_reads_steps_without_a_proposal_through_the_kernel(monkeypatch):
    """With `kv_cache_dtype="int8"` the target's steps of one token (nothing proposed) go through
    the decode-attention kernel, as `generate`'s do, and the tokens are `generate`'s."""
    net = random_net().eval()
    prompts = [p[:20] for p in grounded_prompts(net, 2)]
    expected = torch.stack([generate(net, torch.tensor(p), 30, temperature=0, kv_cache_dtype="int8")[0]
                            for p in prompts])
    calls, kernel = [], kv_attention.Int8DecodeAttention.__call__
    monkeypatch.setattr(kv_attention.Int8DecodeAttention, "__call__",
                        lambda self, *args: calls.append(args[2].shape) or kernel(self, *args))
    stats = SpeculationStats()
    out = speculative_generate(net, prompts, 30, temperature=0, kv_cache_dtype="int8", stats=stats)
    assert torch.equal(out, expected)
    assert calls and stats.accepted > 0, stats  # one-token steps read by the kernel, and speculation too


def test_accept_greedy_keeps_the_agreeing_prefix_and_the_targets_next_token():
    assert accept_greedy([4, 5, 6], [4, 5, 9, 1]) == [4, 5, 9]
    assert accept_greedy([4, 5, 6], [4, 5, 6, 1]) == [4, 5, 6, 1]
    assert accept_greedy([], [7]) == [7]


@pytest.mark.parametrize("with_draft", [False, True], ids=["ngram", "draft"])
def test_top_k_1_sampling_is_the_greedy_text(with_draft):
    """p after the filters: top_k=1 leaves a point mass on the argmax, so sampling must give greedy's
    tokens, whatever the proposals (a draft sampling from its own top-1 q here)."""
    net = random_net().eval()
    draft = random_net(seed=3, depth=1).eval() if with_draft else None
    prompts = grounded_prompts(net, 2)
    expected = torch.stack([generate(net, torch.tensor(p), 24, temperature=0)[0] for p in prompts])
    generator = torch.Generator().manual_seed(0)
    stats = SpeculationStats()
    out = speculative_generate(net, prompts, 24, temperature=0.9, top_k=1, generator=generator, draft=draft,
                               stats=stats)
    assert torch.equal(out, expected)
    assert stats.proposed > 0


# ----------------------------------------------------------------------------- the rejection rule

# Chi-square critical values at significance 1e-3 (df = V - 1 = 3, and V^2 - 1 = 15 for pairs).
CHI2_3, CHI2_15 = 16.27, 37.70


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft", [True, False], ids=["draft-q", "point-mass"])
def test_rejection_sampling_emits_the_targets_distribution(draft):
    """A target whose next token is always drawn from p: the emitted stream must be i.i.d. p, so its
    tokens and its consecutive pairs pass a chi-square test; proposals drawn from a q far from p
    (accepted as they are, they would fail it by far)."""
    p_row = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q_row = torch.tensor([0.1, 0.2, 0.3, 0.4])
    k, V = 3, 4
    p = p_row.expand(k + 1, V)
    generator = torch.Generator().manual_seed(1)
    stream: list[int] = []
    while len(stream) < 5_000:
        if draft:
            proposal = torch.multinomial(q_row, k, replacement=True, generator=generator).tolist()
            stream += accept_sampled(proposal, p, q_row.expand(k, V), generator)
        else:  # prompt lookup proposes whatever followed: here always the least likely token
            stream += accept_sampled([3] * k, p, None, generator)
    tokens = torch.tensor(stream)
    assert chi_square(torch.bincount(tokens, minlength=V).float(), p_row) < CHI2_3
    pairs = torch.bincount(tokens[:-1] * V + tokens[1:], minlength=V * V).float()
    assert chi_square(pairs, torch.outer(p_row, p_row).flatten()) < CHI2_15
    proposals = torch.multinomial(q_row, 5_000, replacement=True, generator=generator)
    assert chi_square(torch.bincount(proposals, minlength=V).float(), p_row) > 100 * CHI2_3


def test_accept_row_penalizes_each_position_after_the_proposed_tokens():
    """Position i of a verify step sees the proposal's first i tokens as generated: a presence
    penalty then rejects a proposed repeat the unpenalized logits would accept."""
    logits = torch.zeros(3, 5)
    logits[:, 2] = 1.0  # the argmax is 2 everywhere; token 1 is the runner-up
    logits[:, 1] = 0.5
    counts_prompt = torch.tensor([[0, 3]])
    greedy = SamplingParams(temperature=0, presence_penalty=1.0)
    assert accept_row([2, 2], logits, SamplingParams(temperature=0)) == [2, 2, 2]
    assert accept_row([2, 2], logits, greedy, counts=TokenCounts(counts_prompt, 5)) == [2, 1]


# ----------------------------------------------------------------------------- adaptivity


def test_policy_pauses_where_little_is_accepted_and_comes_back():
    policy = SpeculationPolicy(4)
    assert policy.k() == 4
    ks = []
    for _ in range(40):  # nothing is ever accepted: pauses of growing length
        k = policy.k()
        ks.append(k)
        policy.update(k, 0)
    assert ks[0] == 4 and ks[1:].count(0) > 30 and max(ks[1:]) <= 2, ks
    while policy.k() == 0:  # the pause ends with a try; accepted tokens raise K again
        pass
    for _ in range(6):
        policy.update(2, 2)
    assert policy.k() == 4


def test_the_library_refuses_what_speculation_cannot_do():
    net = random_net().eval()
    other_vocab = Andromeda.from_config("tiny", num_tokens=300).Andromeda
    for kwargs, message in ((dict(num_speculative_tokens=0), r"speculative tokens must be an integer in \[1, 32\]"),
                            (dict(num_speculative_tokens=33), r"in \[1, 32\], got 33"),
                            (dict(draft=other_vocab), "the draft model has 300 token ids, the target model 258"),
                            (dict(seq_len=1020), "exceeds the model's max_seq_len=1024")):
        with pytest.raises(ValueError, match=message):
            speculative_generate(net, [[1, 2, 3, 4, 5]], **{"seq_len": 8, **kwargs})


# ----------------------------------------------------------------------------- andromeda generate


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny target, a 1-layer draft with its tokenizer, one with another vocabulary and one
    with another tokenizer of the same vocabulary size."""
    root = tmp_path_factory.mktemp("speculative")
    save_pretrained(random_net(), root / "target", tokenizer=TOKENIZER)
    save_pretrained(random_net(seed=1, depth=1), root / "draft", tokenizer=TOKENIZER)
    torch.manual_seed(0)
    save_pretrained(Andromeda.from_config("tiny", num_tokens=300).Andromeda, root / "vocab300", tokenizer=TOKENIZER)
    bpe = train_bpe(["the cat sat on the mat"] * 20, vocab_size=258)
    save_pretrained(random_net(seed=2, depth=1), root / "bpe", tokenizer=bpe)
    return root


def run_generate(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["generate", "--device", "cpu", "--max-new-tokens", "40", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_generate_prints_the_plain_text_and_reports_acceptance(checkpoints, capsys, caplog, method):
    caplog.set_level(logging.INFO, logger="andromeda")
    common = ["--checkpoint", str(checkpoints / "target"), "--prompt", GROUNDED, "--temperature", "0"]
    code, plain, err = run_generate(capsys, *common)
    assert code == 0, err
    extra = ["--draft-checkpoint", str(checkpoints / "draft")] if method == "draft" else []
    code, out, err = run_generate(capsys, *common, "--speculative", method, "--num-speculative-tokens", "3", *extra)
    assert code == 0, err
    assert out == plain
    assert f"speculative decoding ({method}, K=3): " in caplog.text and "proposed tokens accepted" in caplog.text
    assert "tokens/s" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens must be in [1, 32], got 0"),
    (["--speculative", "ngram", "--num-speculative-tokens", "33"], "must be in [1, 32], got 33"),
    (["--speculative", "ngram", "--window", "32"], "--speculative does not support --window"),
    (["--speculative", "ngram", "--compile"], "--speculative does not support --compile"),
    (["--speculative", "draft"], "--speculative draft needs --draft-checkpoint"),
    (["--draft-checkpoint", "DRAFT"], "--draft-checkpoint is an option of speculative decoding; add --speculative "
                                      "draft"),
    (["--speculative", "ngram", "--draft-checkpoint", "DRAFT"], "goes with --speculative draft"),
    (["--speculative", "draft", "--draft-checkpoint", "vocab300"], "has a vocabulary of 300 ids"),
    (["--speculative", "draft", "--draft-checkpoint", "bpe"], "has another tokenizer than --checkpoint"),
    (["--speculative", "draft", "--draft-checkpoint", "int8"], "a quantized draft is not supported"),
    (["--speculative", "draft", "--draft-checkpoint", "missing"], "--draft-checkpoint: checkpoint "),
    (["--speculative", "ngram", "--max-new-tokens", "2000"], "exceeds the model's max_seq_len=1024"),
])
def test_unsupported_speculation_is_refused_clearly(checkpoints, capsys, args, message):
    if "int8" in args and not (checkpoints / "int8").exists():
        assert cli.main(["quantize", "--checkpoint", str(checkpoints / "draft"), "--out", str(checkpoints / "int8"),
                         "--scheme", "int8"]) == 0
    args = [str(checkpoints / a) if a in ("DRAFT", "vocab300", "bpe", "int8", "missing") else a for a in args]
    code, out, err = run_generate(capsys, "--checkpoint", str(checkpoints / "target"), *args)
    assert code == 1 and out == "", err
    assert message in err, err
    if "vocabulary" in message or "tokenizer" in message:  # both models are named
        assert str(checkpoints / "target") in err and args[-1] in err
