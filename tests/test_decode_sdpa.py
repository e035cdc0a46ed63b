"""The fused one-query attention of decoding steps on the CPU (`andromeda::decode_sdpa`,
`inference/kernels/decode_sdpa.c`): held to a float64 computation and to PyTorch's SDPA, its
skipping of masked columns, its hand-over to SDPA, and its use by `generate` (eager and compiled)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from andromeda.inference import native
from andromeda.model import KVCache
from helpers import random_net

NO_KERNELS = native.unavailable_reason()
needs_kernels = pytest.mark.skipif(NO_KERNELS is not None and not NO_KERNELS.startswith("building"),
                                   reason=f"kernels: {NO_KERNELS}")
generate_module = importlib.import_module("andromeda.inference.generate")


def decode_sdpa(*args, limit: int = native.DECODE_SDPA_COLUMNS):
    assert native.kernels().cpp_ops, "ops.cpp did not build (g++ and torch's headers are expected here)"
    return torch.ops.andromeda.decode_sdpa(*args, limit)


def inputs(dtype, B=2, K=2, G=12, D=128, S=70, capacity=96, seed=0):
    """q (B, K, G, D); k and v (B, K, S, D) as views of a larger cache (rows strided, as the
    cache's reads are); an ALiBi-like mask (B, K, G, S) with each row's last columns unwritten."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, K, G, D, generator=generator).to(dtype)
    k, v = (torch.randn(B, K, capacity, D, generator=generator).to(dtype)[:, :, :S] for _ in range(2))
    distance = torch.arange(S - 1, -1, -1.0)
    slopes = torch.linspace(0.05, 0.5, K * G).view(1, K, G, 1)
    mask = -(slopes * distance).expand(B, K, G, S).clone()
    for row in range(B):
        mask[row, :, :, S - 5 * row:] = torch.finfo(dtype).min  # row b has written S - 5b columns
    return q, k, v, mask.to(dtype)


def exact(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double(), scale=scale)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G, D", [(12, 128), (1, 64), (5, 80), (16, 256)])
def test_kernel_is_as_close_to_exact_attention_as_sdpa(dtype, G, D):
    """Against float64 attention the kernel's error is no larger than PyTorch's SDPA's on the same
    inputs (bf16: both round only their output; float32: a few ulp), for query heads per key/value
    head from 1 to 16 and head sizes that are and are not multiples of 16."""
    q, k, v, mask = inputs(dtype, G=G, D=D)
    ours, sdpa, reference = decode_sdpa(q, k, v, mask, 0.09), F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.09), exact(q, k, v, mask, 0.09)
    assert ours.dtype == dtype and ours.shape == q.shape
    error, sdpa_error = (ours.double() - reference).abs().max(), (sdpa.double() - reference).abs().max()
    tolerance = 1e-6 if dtype == torch.float32 else 0.0
    assert error <= sdpa_error + tolerance, (error, sdpa_error)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_columns_masked_for_every_head_are_never_read(dtype):
    """A column whose mask is the dtype's lowest value for every query head (unwritten cache
    entries) is skipped: NaN there leaves the result that of the readable columns alone, where
    SDPA multiplies it in. A broadcast (1, 1, 1, S) mask and -inf are read the same way."""
    q, k, v, mask = inputs(dtype, B=1)
    written = 40
    mask[..., written:] = torch.finfo(dtype).min
    k[..., written:, :] = float("nan")
    v[..., written:, :] = float("nan")
    ours = decode_sdpa(q, k, v, mask, 0.1)
    readable = exact(q, k[:, :, :written], v[:, :, :written], mask[..., :written], 0.1)
    assert torch.isnan(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1)).any()
    assert (ours.double() - readable).abs().max() <= (1e-6 if dtype == torch.float32 else 0.02)
    flat = torch.zeros(1, 1, 1, k.shape[2], dtype=dtype)
    flat[..., written:] = float("-inf")
    broadcast = decode_sdpa(q, k, v, flat, 0.1)
    expected = exact(q, k[:, :, :written], v[:, :, :written], flat[..., :written], 0.1)
    assert (broadcast.double() - expected).abs().max() <= (1e-6 if dtype == torch.float32 else 0.02)


@needs_kernels
def test_a_head_that_may_read_nothing_averages_every_column_as_sdpa_does():
    """A query head whose every column is masked (a padding position) averages all the values, as
    the additive bias makes SDPA do; the other heads of its task still get their own attention."""
    q, k, v, mask = inputs(torch.float32, B=1)
    mask[0, 1, 3] = torch.finfo(torch.float32).min
    ours = decode_sdpa(q, k, v, mask, 0.1)
    assert torch.allclose(ours[0, 1, 3], v[0, 1].mean(dim=0), atol=1e-6)
    assert (ours.double() - exact(q, k, v, mask, 0.1)).abs().max() < 1e-5


@needs_kernels
@pytest.mark.parametrize("dtype, S", [(torch.float32, 40), (torch.bfloat16, 40), (torch.bfloat16, 300)])
def test_a_head_masked_with_minus_inf_everywhere_gets_zero_as_sdpa_does(dtype, S):
    """A query head whose every column is -inf has no weights at all: PyTorch's SDPA gives it 0
    (not NaN), and so does the op, on either path; the task's other heads keep their attention."""
    q, k, v, mask = inputs(dtype, B=1, S=S, capacity=S)
    mask[0, 1, 3] = float("-inf")
    ours = decode_sdpa(q, k, v, mask, 0.1)
    assert torch.equal(ours[0, 1, 3], torch.zeros_like(ours[0, 1, 3]))
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1)[0, 1, 3], ours[0, 1, 3])
    others = torch.ones(ours.shape[:3], dtype=torch.bool)
    others[0, 1, 3] = False
    reference = exact(q, k, v, mask, 0.1)
    assert (ours[others].double() - reference[others]).abs().max() <= (1e-5 if dtype == torch.float32 else 0.02)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_empty_batch_gives_an_empty_result(dtype):
    q, k, v, mask = inputs(dtype, B=1)
    ours = decode_sdpa(q[:0], k[:0], v[:0], mask[:0], 0.1)
    assert ours.shape == (0, *q.shape[1:]) and ours.dtype == dtype


@needs_kernels
def test_past_its_limits_the_op_hands_over_to_sdpa():
    """On the FMA path (float32 here; bf16 on a CPU without AMX): more readable columns than
    `limit`, more than 16 query heads per key/value head, or a head size over 256, and the op
    returns PyTorch's SDPA, bit for bit. Within them it does not (a float32 result that differs in
    rounding shows the kernel ran). bf16 calls on a CPU with AMX never hand over (tests below)."""
    q, k, v, mask = inputs(torch.float32, B=1)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1)
    assert torch.equal(decode_sdpa(q, k, v, mask, 0.1, limit=k.shape[2] - 1), sdpa)
    assert not torch.equal(decode_sdpa(q, k, v, mask, 0.1, limit=k.shape[2]), sdpa)
    for shape in (dict(G=17), dict(D=272)):
        q, k, v, mask = inputs(torch.float32, B=1, **shape)
        assert torch.equal(decode_sdpa(q, k, v, mask, 0.1),
                           F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1))


@needs_kernels
def test_bad_shapes_are_refused_naming_the_expected_ones():
    q, k, v, mask = inputs(torch.float32, B=1)
    with pytest.raises(ValueError, match=r"takes q \(B, K, G, D\)"):
        decode_sdpa(q[0], k, v, mask, 0.1)
    with pytest.raises(ValueError, match=r"k and v must be \(1, 2, S, 128\)"):
        decode_sdpa(q, k[..., :64], v[..., :64], mask, 0.1)


@needs_kernels
def test_decoding_steps_attend_with_the_kernel_and_match_sdpa(monkeypatch):
    """`generate` gives its cache the fused attention on the CPU; each one-token step of every
    layer calls it, and a float32 model's logits equal SDPA's to rounding, step after step."""
    net = random_net(seed=3).eval()
    prompt = torch.randint(0, net.config.num_tokens, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = generate_module.generation_cache(net, 2, 9, 6, None)
    assert cache.decode_sdpa is native.fused_decode_sdpa
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return native.fused_decode_sdpa(*args)

    plain = KVCache(net.config, 2, 16, dtype=torch.float32, device="cpu")
    fused = KVCache(net.config, 2, 16, dtype=torch.float32, device="cpu", decode_sdpa=counted)
    tokens = prompt
    with torch.no_grad():
        for step in range(4):
            logits = [net(tokens, cache=c, logits_to_keep=1)[:, -1] for c in (plain, fused)]
            assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=1e-5), step
            tokens = logits[0].argmax(-1, keepdim=True)
    config = net.config
    assert len(calls) == 3 * config.depth  # the prefill attends with SDPA, each later step with the kernel
    assert calls[0] == (2, config.attn_kv_heads, config.heads // config.attn_kv_heads, config.dim_head)


@needs_kernels
def test_compiled_decoding_with_the_kernel_gives_the_eager_tokens():
    """The op traces into the compiled step (its cache read whole, the unwritten columns masked):
    the same greedy tokens as eager decoding, where attention reads only the written columns."""
    net = random_net(seed=5).eval()
    prompt = torch.randint(0, net.config.num_tokens, (1, 7), generator=torch.Generator().manual_seed(2))
    eager = generate_module.generate(net, prompt, 12, temperature=0.0)
    compiled = generate_module.generate(net, prompt, 12, temperature=0.0, compile=True)
    assert torch.equal(eager, compiled)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), K=st.integers(1, 3), G=st.integers(1, 16), D=st.sampled_from([16, 40, 64, 128, 200]),
       S=st.integers(1, 90), bf16=st.booleans(), broadcast=st.sampled_from(["none", "heads", "all"]),
       data=st.data())
def test_kernel_matches_exact_attention_for_any_shape_and_mask(B, K, G, D, S, bf16, broadcast, data):
    """Any batch, kv heads, query heads per kv head (1-16), head size, keys and mask pattern
    (random columns masked per row, some rows with nothing readable, masks broadcast over heads or
    rows and heads, strided keys and values): as close to float64 attention as SDPA is."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    seed = data.draw(st.integers(0, 2**16), label="seed")
    q, k, v, _ = inputs(dtype, B=B, K=K, G=G, D=D, S=S, capacity=S + 3, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = {"none": (B, K, G, S), "heads": (B, 1, 1, S), "all": (1, 1, 1, S)}[broadcast]
    mask = torch.randn(shape, generator=generator)
    hidden = torch.rand(shape, generator=generator) < data.draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]), label="p")
    mask = mask.masked_fill(hidden, torch.finfo(dtype).min).to(dtype)
    ours = decode_sdpa(q, k, v, mask, 0.2)
    reference = exact(q, k, v, mask, 0.2)
    sdpa_error = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2).double() - reference).abs().max()
    # a few float32 ulp (exp, sums over up to 90 keys); in bf16 one ulp of the output's rounding
    tolerance = (2**-18 if dtype == torch.float32 else 2**-8) * max(1.0, reference.abs().max().item())
    assert (ours.double() - reference).abs().max() <= sdpa_error + tolerance


@needs_kernels
def test_steps_under_autograd_keep_sdpa():
    """The op has no backward: a one-token step with gradients on attends with SDPA (its output
    then carries a gradient function), as the int8 kernel's steps do."""
    net = random_net(seed=4)
    calls = []
    cache = KVCache(net.config, 1, 8, dtype=torch.float32, device="cpu",
                    decode_sdpa=lambda *args: calls.append(1) or native.fused_decode_sdpa(*args))
    tokens = torch.tensor([[3, 5, 7]])
    with torch.no_grad():
        net(tokens, cache=cache)
    logits = net(tokens[:, :1], cache=cache, logits_to_keep=1)
    assert calls == [] and logits.grad_fn is not None
    with torch.no_grad():
        net(tokens[:, :1], cache=cache, logits_to_keep=1)
    assert len(calls) == net.config.depth


AMX_CPU = {"amx_tile", "amx_bf16", "avx512_bf16"} <= (native.cpu_flags() or frozenset())
needs_amx = pytest.mark.skipif(not AMX_CPU or NO_KERNELS is not None, reason="no AMX tiles on this CPU")


@needs_amx
def test_the_amx_path_is_built_where_the_cpu_has_tiles():
    """On a CPU with AMX (Sapphire Rapids on) ops.cpp's decode_sdpa.c is compiled with the AMX flags
    and the process gets the tiles: a build that fell back without them would pass every other test
    here on the FMA path and SDPA."""
    assert native.decode_sdpa_amx()


def long_inputs(B, K, G, D, S, seed, written=None):
    """Keys and values as strided views of a larger cache, an ALiBi mask with steep slopes (each
    head's best keys are the last: the running max rises chunk after chunk), and rows with
    `written` columns written (NaN in the keys and values past them)."""
    q, k, v, mask = inputs(torch.bfloat16, B=B, K=K, G=G, D=D, S=S, capacity=S + 7, seed=seed)
    slopes = torch.linspace(0.001, 0.2, K * G).view(1, K, G, 1)
    mask = -(slopes * torch.arange(S - 1, -1, -1.0)).expand(B, K, G, S).clone()
    for row, count in enumerate(written or []):
        mask[row, ..., count:] = torch.finfo(torch.bfloat16).min
        k[row, :, count:] = float("nan")
        v[row, :, count:] = float("nan")
    return q, k, v, mask.bfloat16()


def assert_as_close_as_sdpa(ours, q, k, v, mask, scale):
    """ours against float64 attention over the readable columns, no further than SDPA is (SDPA
    reads NaN keys and values as 0 here) plus what the AMX path's rounding of its softmax weights
    to bf16 (as ATen's flash kernel rounds them) can add: each weight p moves by at most 2^-9 p, an
    output by at most 2^-9 sum(p |v|). (An eighth of a bf16 ulp instead held for most draws, not
    for 14 readable columns of large values: 0.0047 against SDPA's 0.0031.)"""
    clean_k, clean_v = k.nan_to_num(), v.nan_to_num()
    reference = exact(q, clean_k, clean_v, mask, scale)
    sdpa = F.scaled_dot_product_attention(q, clean_k, clean_v, attn_mask=mask, scale=scale)
    error, sdpa_error = ((x.double() - reference).abs().max().item() for x in (ours, sdpa))
    scores = (q.double() @ clean_k.double().transpose(-1, -2)) * scale + mask.double()
    weights = torch.softmax(scores, dim=-1).nan_to_num()  # rows with no readable column: SDPA's NaN
    weight_rounding = 2**-9 * (weights @ clean_v.double().abs()).max().item()
    assert error <= sdpa_error + weight_rounding, (error, sdpa_error, weight_rounding)


@needs_amx
@pytest.mark.parametrize("B, K, G, D, S, written", [
    (1, 2, 12, 128, 3000, None),          # the 2.5 B default's heads, twelve chunks
    (2, 2, 12, 128, 1100, [1100, 517]),   # a row with 583 unwritten (NaN) columns, some whole chunks
    (1, 1, 16, 256, 700, [693]),          # 16 query heads of 256 channels; the last block part-written
    (1, 3, 1, 96, 900, None),             # one query head; 96 channels: a pass of two value tiles
    (3, 1, 5, 32, 333, [333, 1, 300]),    # a row that reads one column
])
def test_long_contexts_in_bf16_take_amx_tiles_as_close_to_exact_as_sdpa(B, K, G, D, S, written):
    """Past the FMA path's limit a bf16 call is computed by AMX tiles where the CPU has them (no
    hand-over: the result is not SDPA's bit for bit), and is as close to float64 attention as SDPA:
    chunks whose running max rises, unwritten columns holding NaN never read, part-written blocks,
    heads of 32 to 256 channels."""
    q, k, v, mask = long_inputs(B, K, G, D, S, seed=S + D, written=written)
    ours = decode_sdpa(q, k, v, mask, D**-0.5)
    assert not torch.isnan(ours).any()
    assert not torch.equal(ours, F.scaled_dot_product_attention(q, k.nan_to_num(), v.nan_to_num(), attn_mask=mask,
                                                                 scale=D**-0.5))
    assert_as_close_as_sdpa(ours, q, k, v, mask, D**-0.5)


@needs_amx
def test_a_task_split_across_threads_combines_its_ranges_exactly():
    """With fewer (row, kv head) tasks than threads, a long task is split into column ranges, one a
    thread, combined by their maxima and sums (flash-decoding): the result with two threads is as
    close to exact attention as with one, and as SDPA."""
    q, k, v, mask = long_inputs(1, 1, 12, 128, 2500, seed=3, written=[2411])
    mask[..., :1200] -= 30.0  # the first range's scores far below the second's: its weights rescaled
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_sdpa(q, k, v, mask, 0.09)
        torch.set_num_threads(2)
        two = decode_sdpa(q, k, v, mask, 0.09)
    finally:
        torch.set_num_threads(threads)
    for ours in (one, two):
        assert_as_close_as_sdpa(ours, q, k, v, mask, 0.09)
    assert (one.float() - two.float()).abs().max() <= 2**-7 * one.float().abs().max()


@needs_amx
def test_a_head_that_may_read_nothing_averages_every_column_at_long_contexts_too():
    q, k, v, mask = long_inputs(1, 2, 4, 64, 600, seed=5)
    mask[0, 1, 2] = torch.finfo(torch.bfloat16).min
    ours = decode_sdpa(q, k, v, mask, 0.1)
    assert torch.allclose(ours[0, 1, 2].float(), v[0, 1].float().mean(dim=0), atol=2**-8)
    assert_as_close_as_sdpa(ours, q, k, v, mask, 0.1)


@needs_amx
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), K=st.integers(1, 2), G=st.integers(1, 16), D=st.sampled_from([32, 64, 96, 128, 160, 256]),
       S=st.integers(100, 2600), broadcast=st.sampled_from(["none", "heads", "all"]), data=st.data())
def test_amx_path_matches_exact_attention_for_any_shape_and_mask(B, K, G, D, S, broadcast, data):
    """Any batch, kv heads, query heads per kv head, head size (a multiple of 32), keys past the FMA
    path's limit and mask (random columns hidden, unwritten tails of any length, masks broadcast over
    heads or rows and heads): as close to float64 attention as SDPA."""
    seed = data.draw(st.integers(0, 2**16), label="seed")
    q, k, v, _ = long_inputs(B, K, G, D, S, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = {"none": (B, K, G, S), "heads": (B, 1, 1, S), "all": (1, 1, 1, S)}[broadcast]
    mask = torch.randn(shape, generator=generator) * 3
    hidden = torch.rand(shape, generator=generator) < data.draw(st.sampled_from([0.0, 0.5, 0.97]), label="p")
    tail = data.draw(st.integers(0, S - 1), label="unwritten")
    hidden[..., S - tail:] = True
    mask = mask.masked_fill(hidden, torch.finfo(torch.bfloat16).min).bfloat16()
    assert_as_close_as_sdpa(decode_sdpa(q, k, v, mask, 0.2), q, k, v, mask, 0.2)


@needs_amx
def test_bf16_decoding_through_amx_tiles_is_as_close_to_float32_as_sdpa():
    """A bf16 model (heads of 32 channels) decoding after a 300-token prompt: every layer's
    one-token step takes the AMX path, and its logits are as close to the same model's in float32
    as the bf16 logits through SDPA are (twice their error at most), step after step."""
    assert native.decode_sdpa_amx()  # (also registers the op's C++ implementation)
    net = random_net(seed=5, dim_head=32).eval()
    reference = random_net(seed=5, dim_head=32).eval()  # float32
    net = net.to(torch.bfloat16)
    prompt = torch.randint(0, net.config.num_tokens, (2, 300), generator=torch.Generator().manual_seed(2))
    calls = []

    def counted(*args):
        calls.append(args[1].shape[2])  # keys read
        return native.fused_decode_sdpa(*args)

    caches = [KVCache(net.config, 2, 310, dtype=torch.bfloat16, device="cpu"),
              KVCache(net.config, 2, 310, dtype=torch.bfloat16, device="cpu", decode_sdpa=counted),
              KVCache(reference.config, 2, 310, dtype=torch.float32, device="cpu")]
    tokens = prompt
    with torch.no_grad():
        for step in range(4):
            plain, fused, exact32 = (model(tokens, cache=cache, logits_to_keep=1)[:, -1].float()
                                     for model, cache in zip((net, net, reference), caches))
            if step:
                assert (fused - exact32).abs().max() <= 2 * (plain - exact32).abs().max() + 1e-3, step
            tokens = exact32.argmax(-1, keepdim=True)
    assert len(calls) == 3 * net.config.depth and min(calls) > native.DECODE_SDPA_COLUMNS
