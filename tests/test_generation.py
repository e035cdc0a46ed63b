"""Generation: the KV-cached loop against full recomputation, ragged batches against single rows,
sampling filters, seeding, eos handling, streaming text, and argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from andromeda import Andromeda
from andromeda.inference.generate import (
    IncrementalDecoder,
    SamplingParams,
    filter_logits,
    generate,
    sample,
    stream,
    stream_text,
)
from andromeda.inference.sampling import TokenCounts, greedy_tokens, penalize
from andromeda.tokenizers import ByteTokenizer
from helpers import FEATURES, random_net

@pytest.fixture(scope="module")
def net():
    return random_net()


TEXT = "Grüße → naïve café ✓ 日本語, über alles!"


@pytest.fixture(scope="module")
def memorised():
    """A tiny model trained to reproduce one byte sequence, <eos> TEXT <eos>, exactly."""
    torch.manual_seed(0)
    model = Andromeda.from_config("tiny")
    tokenizer = ByteTokenizer()
    ids = torch.tensor([tokenizer.eos_id, *tokenizer.encode(TEXT), tokenizer.eos_id])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        loss = model(ids[None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the model failed to memorise the sequence (loss {loss.item():.3f})"
    return model, tokenizer, ids


# ----------------------------------------------------------------------------- cache parity


@pytest.mark.parametrize("overrides", FEATURES.values(), ids=FEATURES.keys())
def test_cached_greedy_equals_recomputed(overrides, device):
    net = random_net(**overrides).to(device)
    prompts = torch.randint(0, net.config.num_tokens, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    cached = generate(net, prompts, 24, temperature=0)
    recomputed = generate(net, prompts, 24, temperature=0, cache_kv=False)
    assert torch.equal(cached, recomputed)
    assert len(cached.unique()) >= 4, "degenerate output would make the comparison meaningless"


@pytest.mark.parametrize("cache_kv", [True, False])
def test_prompt_is_prefilled_once_then_one_token_per_step(net, cache_kv):
    calls = []  # (tokens shape, cache capacity) of every forward pass
    hook = net.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            (tuple(args[0].shape), kwargs.get("cache") and kwargs["cache"].k.shape)), with_kwargs=True)
    try:
        generate(net, torch.zeros(2, 5, dtype=torch.long), 4, temperature=0, cache_kv=cache_kv)
    finally:
        hook.remove()
    if cache_kv:
        # one cache of N + L - 1 positions holding only the K = 2 key/value heads, D = 16
        capacity = (2, 2, 2, 5 + 4 - 1, 16)
        assert calls == [((2, 5), capacity)] + [((2, 1), capacity)] * 3
    else:
        assert calls == [((2, 5), None), ((2, 6), None), ((2, 7), None), ((2, 8), None)]


@pytest.mark.parametrize("name", ["seed", "abs_pos_emb_with_seed", "reference_attention", "no_positions"])
@pytest.mark.parametrize("cache_kv", [True, False])
def test_ragged_batch_equals_rows_generated_alone(name, cache_kv):
    net = random_net(**FEATURES[name])
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 258, (n,), generator=g) for n in (3, 11, 7)]
    batch = generate(net, rows, 16, temperature=0, cache_kv=cache_kv)
    assert batch.shape == (3, 16)
    for i, row in enumerate(rows):
        assert torch.equal(batch[i], generate(net, row, 16, temperature=0)[0]), f"row {i}"


def test_equal_length_list_equals_tensor(net):
    prompts = torch.randint(0, 258, (2, 6), generator=torch.Generator().manual_seed(3))
    as_list = generate(net, [prompts[0], prompts[1].tolist()], 8, temperature=0)
    assert torch.equal(as_list, generate(net, prompts, 8, temperature=0))


@pytest.mark.parametrize("cache_kv", [True, False])
def test_memorised_sequence_is_regenerated_from_a_prefix(memorised, cache_kv):
    model, _, ids = memorised
    new = model.decoder.generate(ids[:5], len(ids) - 5, temperature=0, cache_kv=cache_kv)
    assert torch.equal(new[0], ids[5:])


def test_wrapper_and_model_delegate_to_generate(memorised):
    model, _, ids = memorised
    direct = generate(model.Andromeda, ids[:5], 10, temperature=0)
    assert torch.equal(model.generate(ids[:5], 10, temperature=0), direct)
    assert torch.equal(model.decoder.generate(ids[:5], 10, temperature=0), direct)


# ----------------------------------------------------------------------------- sampling


def test_top_k_1_equals_greedy(net):
    prompts = torch.randint(0, 258, (3, 5), generator=torch.Generator().manual_seed(4))
    greedy = generate(net, prompts, 12, temperature=0)
    assert torch.equal(generate(net, prompts, 12, temperature=1.0, top_k=1), greedy)
    assert torch.equal(generate(net, prompts, 12, temperature=1.0, min_p=1.0), greedy)


def test_sampling_is_reproducible_under_manual_seed(net):
    prompts = torch.zeros(2, 3, dtype=torch.long)
    torch.manual_seed(7)
    first = generate(net, prompts, 20, temperature=1.0, top_p=0.95)
    torch.manual_seed(7)
    second = generate(net, prompts, 20, temperature=1.0, top_p=0.95)
    torch.manual_seed(8)
    other = generate(net, prompts, 20, temperature=1.0, top_p=0.95)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_explicit_generator_is_reproducible_and_leaves_global_rng_alone(net):
    prompts = torch.zeros(2, 3, dtype=torch.long)
    state = torch.get_rng_state()
    first = generate(net, prompts, 20, generator=torch.Generator().manual_seed(5))
    second = generate(net, prompts, 20, generator=torch.Generator().manual_seed(5))
    other = generate(net, prompts, 20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


PROBS = torch.tensor([[0.4, 0.3, 0.2, 0.1]])


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_top_k_keeps_the_k_most_likely():
    assert kept(filter_logits(PROBS.log(), SamplingParams(top_k=2))) == [True, True, False, False]


@pytest.mark.parametrize("top_p, expected", [(0.4, [True, False, False, False]),
                                             (0.41, [True, True, False, False]),
                                             (0.85, [True, True, True, False]),
                                             (1.0, [True, True, True, True])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(filter_logits(PROBS.log(), SamplingParams(top_p=top_p))) == expected


def test_min_p_is_relative_to_the_most_likely_token():
    # threshold 0.45 * 0.4 = 0.18: keeps 0.4, 0.3 and 0.2
    assert kept(filter_logits(PROBS.log(), SamplingParams(min_p=0.45))) == [True, True, True, False]
    assert kept(filter_logits(PROBS.log(), SamplingParams(min_p=0.55))) == [True, True, False, False]


def test_filters_compose_in_documented_order():
    # top-k first renormalises to (4/7, 3/7); top-p 0.5 then keeps only the first.
    # (top-p first would keep two: the mass before the second token is 0.4 < 0.5.)
    both = filter_logits(PROBS.log(), SamplingParams(top_k=2, top_p=0.5))
    assert kept(both) == [True, False, False, False]
    # temperature comes before top-p: flattened to near-uniform, 0.5 needs two tokens.
    hot = filter_logits(PROBS.log(), SamplingParams(temperature=100.0, top_p=0.5))
    assert kept(hot) == [True, True, False, False]
    # temperature scales the surviving logits
    assert torch.allclose(filter_logits(PROBS.log(), SamplingParams(temperature=2.0)), PROBS.log() / 2)


def test_samples_come_only_from_the_filtered_set():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).expand(4000, 50)
    top3 = set(logits[0].topk(3).indices.tolist())
    drawn = sample(logits, SamplingParams(top_k=3), torch.Generator().manual_seed(1))
    assert set(drawn.tolist()) == top3


def test_sampling_frequencies_follow_the_distribution():
    logits = PROBS.log().expand(20000, 4)
    drawn = sample(logits, SamplingParams(), torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert torch.allclose(freq, PROBS[0], atol=0.015)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_tokens_are_the_argmax_ties_and_nans_included(dtype):
    """`greedy_tokens` (what every greedy path picks with) gives `argmax`'s indices: the first of
    tied maxima, a NaN before any number, rows of -inf at 0."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (6, 5000), generator=generator).to(dtype)  # many ties per row
    logits[1, [17, 4000]] = float("nan")
    logits[2] = -math.inf
    logits[3, 4999] = 2.5  # the maximum in the last column
    logits[4, :10] = float("inf")
    expected = logits.argmax(dim=-1)
    assert expected.tolist()[1:5] == [17, 0, 4999, 0]
    assert torch.equal(greedy_tokens(logits), expected)
    assert torch.equal(greedy_tokens(logits[0]), logits[0].argmax())  # one row (V,)


# ----------------------------------------------------------------------------- penalties

PENALTY_LOGITS = [2.0, -1.0, 0.5, 0.0, -3.0]


def penalized(prompts, mask, outputs, **penalties) -> list[list[float]]:
    """`penalize` on two rows of PENALTY_LOGITS after `prompts` (with `mask`) and `outputs`."""
    counts = TokenCounts(torch.tensor(prompts), len(PENALTY_LOGITS), None if mask is None else torch.tensor(mask))
    for step in zip(*outputs):
        counts.add(torch.tensor(step))
    logits = torch.tensor([PENALTY_LOGITS] * len(prompts))
    return penalize(logits, counts, SamplingParams(**penalties)).tolist()


@pytest.mark.parametrize("penalties, row0, row1", [
    # Row 0: prompt [1, 4], output [2, 2, 0]. Row 1: prompt [3] after a padding 0 that is not
    # seen, output [1, 1, 1].
    (dict(frequency_penalty=0.5), [1.5, -1.0, -0.5, 0.0, -3.0], [2.0, -2.5, 0.5, 0.0, -3.0]),
    (dict(frequency_penalty=-1.0), [3.0, -1.0, 2.5, 0.0, -3.0], [2.0, 2.0, 0.5, 0.0, -3.0]),
    (dict(presence_penalty=0.25), [1.75, -1.0, 0.25, 0.0, -3.0], [2.0, -1.25, 0.5, 0.0, -3.0]),
    # divided when positive, multiplied when not; prompt tokens count (1, 4 in row 0), padding not
    (dict(repetition_penalty=2.0), [1.0, -2.0, 0.25, 0.0, -6.0], [2.0, -2.0, 0.5, 0.0, -3.0]),
    # repetition first, then frequency and presence (vLLM's order)
    (dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
     [0.25, -2.0, -1.0, 0.0, -6.0], [2.0, -3.75, 0.5, 0.0, -3.0]),
])
def test_penalties_follow_their_formulas(penalties, row0, row1):
    """OpenAI: logits[t] -= frequency * count[t] + presence * (count[t] > 0), count over the
    output only. CTRL / Hugging Face: a token of the prompt or output has its logit divided by
    the penalty if positive, else multiplied by it. Computed by hand."""
    assert penalized([[1, 4], [0, 3]], [[True, True], [False, True]], [[2, 2, 0], [1, 1, 1]], **penalties) == [row0, row1]


def test_no_penalty_leaves_the_logits_alone():
    assert not SamplingParams().penalized and SamplingParams(presence_penalty=0.1).penalized
    assert penalized([[1, 4]], None, [[2, 2, 0]]) == [PENALTY_LOGITS]


def reference_penalized_greedy(net, prompt: list[int], steps: int, frequency_penalty: float = 0.0,
                               presence_penalty: float = 0.0, repetition_penalty: float = 1.0) -> list[int]:
    """Greedy decoding written out: the whole sequence through the model each step, each token's
    logit penalized by the formulas one at a time, then the argmax."""
    seq, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = net(torch.tensor([seq]))[0, -1].float()
        for token in set(seq):
            value = logits[token]
            logits[token] = value / repetition_penalty if value > 0 else value * repetition_penalty
        for token in set(out):
            count = out.count(token)
            logits[token] = logits[token] - frequency_penalty * count - presence_penalty
        token = int(logits.argmax())
        seq.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("penalties", [dict(frequency_penalty=0.8), dict(presence_penalty=1.5),
                                       dict(repetition_penalty=1.5),
                                       dict(frequency_penalty=-0.5, presence_penalty=0.5, repetition_penalty=1.2)])
@pytest.mark.parametrize("cache_kv", [True, False])
def test_greedy_with_penalties_equals_a_step_by_step_reference(net, penalties, cache_kv):
    prompts = [[5, 9, 5, 17, 33, 9, 5], [40, 41, 40]]  # ragged: the padding must not count
    out = generate(net, prompts, 30, temperature=0, cache_kv=cache_kv, **penalties)
    for row, prompt in zip(out.tolist(), prompts):
        assert row == reference_penalized_greedy(net, prompt, 30, **penalties)
    assert not torch.equal(out, generate(net, prompts, 30, temperature=0)), "the penalties changed nothing"


# ----------------------------------------------------------------------------- eos and streaming


def truncate_after_stop(tokens, stop_ids, pad):
    """The specification: each row keeps its tokens up to and including its first stop id."""
    out = tokens.clone()
    for row in out:
        hits = [i for i, t in enumerate(row.tolist()) if t in stop_ids]
        if hits:
            row[hits[0] + 1 :] = pad
    return out


def test_rows_stop_at_eos_and_are_padded_and_generation_ends_early(net):
    prompts = torch.randint(0, 258, (3, 6), generator=torch.Generator().manual_seed(9))
    free = generate(net, prompts, 20, temperature=0)
    stop_ids = [int(free[0, 2]), int(free[1, 5]), int(free[2, 3])]
    expected = truncate_after_stop(free, stop_ids, pad=stop_ids[0])
    last_stop = max(min(i for i, t in enumerate(row.tolist()) if t in stop_ids) for row in free)
    assert last_stop < 19

    steps = []
    out = generate(net, prompts, 20, temperature=0, eos_token=stop_ids, callback=steps.append)
    assert torch.equal(out, expected)
    assert len(steps) == last_stop + 1  # the loop ended once every row had stopped
    assert len(list(stream(net, prompts, 20, temperature=0, eos_token=stop_ids))) == last_stop + 1

    padded = generate(net, prompts, 20, temperature=0, eos_token=stop_ids, pad_value=7)
    assert torch.equal(padded, truncate_after_stop(free, stop_ids, pad=7))


def test_single_eos_stops_only_the_rows_that_emit_it(net):
    prompts = torch.randint(0, 258, (3, 6), generator=torch.Generator().manual_seed(9))
    free = generate(net, prompts, 20, temperature=0)
    eos = int(free[1, 4])
    out = generate(net, prompts, 20, temperature=0, eos_token=eos)
    assert torch.equal(out, truncate_after_stop(free, [eos], pad=eos))


def test_stream_yields_the_generated_columns(net):
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    steps = list(stream(net, prompts, 10, temperature=0))
    assert all(step.shape == (2,) and not step.is_inference() for step in steps)
    assert torch.equal(torch.stack(steps, dim=1), generate(net, prompts, 10, temperature=0))


def test_stream_text_yields_whole_characters_and_stops_at_eos(memorised):
    model, tokenizer, _ = memorised
    prompt = TEXT[:3]  # "Grü"
    pieces = list(stream_text(model.Andromeda, tokenizer, prompt, 200, temperature=0))
    assert "".join(pieces) == TEXT[3:]  # ends at the trained eos, long before 200 tokens
    assert all("\ufffd" not in piece for piece in pieces)
    assert "日" in pieces and "✓" in pieces  # three-byte characters arrive as one piece


def test_stream_text_from_an_empty_prompt_starts_a_document(memorised):
    model, tokenizer, _ = memorised
    assert "".join(stream_text(model.Andromeda, tokenizer, "", 200, temperature=0)) == TEXT
    with pytest.raises(ValueError, match="the prompt is empty"):
        next(stream_text(model.Andromeda, tokenizer, "", 10, start_of_document=False))


def test_stream_text_without_document_start_feeds_the_prompt_alone(memorised):
    model, tokenizer, _ = memorised
    prompt = torch.tensor(tokenizer.encode(TEXT[:3]))
    new = generate(model.Andromeda, prompt, 12, temperature=0, eos_token=tokenizer.eos_id)[0].tolist()
    new = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    pieces = stream_text(model.Andromeda, tokenizer, TEXT[:3], 12, start_of_document=False,
                         temperature=0)
    assert "".join(pieces) == tokenizer.decode(new)


def test_incremental_decoder_holds_back_incomplete_utf8():
    decoder = IncrementalDecoder(ByteTokenizer())
    pieces = [decoder.push(b) for b in "aé✓".encode()]
    assert pieces == ["a", "", "é", "", "", "✓"]
    decoder.push(0xE6)  # the first byte of a character that never completes
    assert decoder.flush() == "\ufffd"


# ----------------------------------------------------------------------------- modes and limits


def test_restores_training_mode_and_returns_an_ordinary_tensor(net):
    net.train()
    try:
        out = generate(net, torch.tensor([1, 2]), 3)
        assert net.training
        assert not out.is_inference() and not out.requires_grad
        out[0, 0] = 5  # editable outside inference mode
        iterator = stream(net, torch.tensor([1, 2]), 3)
        next(iterator)
        assert not net.training  # eval while the stream is open
        list(iterator)
        assert net.training
    finally:
        net.eval()


def test_context_limit_is_prompt_plus_new_tokens():
    """With learned absolute positions; models with relative ones slide past it (test_long_context.py)."""
    net = random_net(max_seq_len=32, use_abs_pos_emb=True)
    prompt = torch.zeros(1, 20, dtype=torch.long)
    assert generate(net, prompt, 12, temperature=0).shape == (1, 12)
    with pytest.raises(ValueError, match=r"prompt length 20 \+ seq_len 13 = 33 exceeds max_seq_len=32"):
        generate(net, prompt, 13)


@pytest.mark.parametrize("prompts, error, message", [
    (torch.zeros(1, 4), TypeError, "must be integers"),
    (torch.tensor([[1, 258]]), ValueError, r"token id 258 is out of range \[0, 258\)"),
    (torch.tensor([[-1, 2]]), ValueError, "token id -1 is out of range"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "must be non-empty"),
    (torch.zeros(0, dtype=torch.long), ValueError, "must be non-empty"),
    (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"got a tensor of shape \(1, 2, 3\)"),
    ([], ValueError, "empty list"),
    ([torch.tensor([1, 2]), torch.zeros(2, 2, dtype=torch.long)], ValueError, r"prompts\[1\] must be 1-D"),
    ([torch.tensor([1]), torch.tensor([], dtype=torch.long)], ValueError, "must be non-empty"),
    ("hello", TypeError, "encode text with a tokenizer first"),
])
def test_bad_prompts_raise(net, prompts, error, message):
    with pytest.raises(error, match=message):
        generate(net, prompts, 4)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(seq_len=0), ValueError, "seq_len .* must be an integer >= 1, got 0"),
    (dict(seq_len=2.5), ValueError, "seq_len .* got 2.5"),
    (dict(temperature=-0.1), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), ValueError, "temperature must be a finite number >= 0"),
    (dict(top_k=0), ValueError, "top_k must be an integer >= 1"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(min_p=-0.1), ValueError, r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.1), ValueError, r"min_p must be in \[0, 1\]"),
    (dict(eos_token=258), ValueError, r"eos_token 258 is out of range \[0, 258\)"),
    (dict(eos_token=[]), TypeError, "eos_token must be a token id or a non-empty list"),
    (dict(eos_token=1, pad_value=-1), ValueError, r"pad_value -1 is out of range"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(frequency_penalty=2.5), ValueError, r"frequency_penalty must be a number in \[-2, 2\]"),
    (dict(presence_penalty=-2.1), ValueError, r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(presence_penalty=math.nan), ValueError, r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(repetition_penalty=0), ValueError, "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=math.inf), ValueError, "repetition_penalty must be a finite number > 0"),
])
def test_bad_arguments_raise(net, kwargs, error, message):
    kwargs = {"seq_len": 4, **kwargs}
    with pytest.raises(error, match=message):
        generate(net, torch.tensor([1, 2]), **kwargs)
    with pytest.raises(error, match=message):  # checked when stream() is called, not at next()
        stream(net, torch.tensor([1, 2]), **kwargs)


def test_compiled_decode_steps_give_the_eager_tokens_without_recompiling(net, device):
    """compile=True runs each decode step as one torch.compile'd graph of fixed shapes (CUDA
    graphs on a GPU): greedy, sampled and sliding-window generations equal eager decoding, and a
    second request of another length within the same rounded capacity reuses the graph."""
    import copy

    from torch._dynamo.utils import counters

    net = copy.deepcopy(net).to(device)
    prompts = [torch.randint(0, net.config.num_tokens, (n,), generator=torch.Generator().manual_seed(n)).to(device)
               for n in (5, 9)]
    for kwargs in ({"temperature": 0}, {"top_k": 20, "seed": 3}, {"temperature": 0, "window": 12, "sink_tokens": 2}):
        kwargs = dict(kwargs)
        seed = kwargs.pop("seed", None)
        runs = []
        for compile in (False, True):
            generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
            runs.append(generate(net, prompts, 24, generator=generator, compile=compile, **kwargs))
        assert torch.equal(runs[0], runs[1]), kwargs
    graphs = counters["stats"]["unique_graphs"]
    others = [prompts[1][:4], prompts[0][:7]]  # other lengths, the same rounded capacity and batch
    eager = generate(net, others, 30, temperature=0)
    assert torch.equal(generate(net, others, 30, temperature=0, compile=True), eager)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_cache_step_carries_its_own_positions(net):
    from andromeda.model import KVCache

    cache = KVCache(net.config, 1, 8, dtype=torch.float32, device="cpu")
    step = cache.append(None, None, None, 1, read_all=True)
    with pytest.raises(ValueError, match="already holds the slots, positions and padding"):
        net(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), cache=step)
    with pytest.raises(ValueError, match="needs cache_kv=True"):
        generate(net, [[1, 2]], 2, compile=True, cache_kv=False)
