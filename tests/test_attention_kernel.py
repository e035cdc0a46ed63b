"""`train.attention_kernel`: causal attention forward and backward by its C kernel, against float32
PyTorch (`reference_attention`) and bf16 SDPA, alone, compiled, as the op's registrations claim
(`torch.library.opcheck`), and in a model the training loop hands it to."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from andromeda import Config
from andromeda.inference import native
from andromeda.model import Transformer, build_transformer
from andromeda.model import attention as attention_module
from andromeda.train import attention_kernel as kernel_module
from andromeda.train.attention_kernel import (attention_kernel, causal_attention, reference_attention,
                                              use_attention_kernel)
from helpers import Counted, tiny_train_config

pytestmark = pytest.mark.skipif(attention_kernel() is None, reason=f"attention kernel unavailable: "
                                f"{kernel_module.unavailable_reason()}")


def inputs(B, H, K, T, D, seed, alibi=True, batch_positions=False):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, T, D, generator=generator).bfloat16() for heads in (H, K, K))
    if batch_positions:  # a row's own increasing positions, gaps included
        positions = torch.randint(0, 3 * T, (B, T), generator=generator).sort(dim=-1).values.float()
    else:
        positions = torch.arange(T, dtype=torch.float32)[None]
    slopes = None
    if alibi:
        slopes = torch.rand(H, generator=generator) * 0.5
        slopes[H // 2:] = 0  # heads without ALiBi
    return q, k, v, positions, slopes


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


def gradients(function, q, k, v, grad, *extra):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = function(q, k, v, *extra)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize("B, H, K, T, D, alibi, batch_positions", [
    (1, 2, 1, 64, 64, True, False),  # one tile
    (2, 4, 2, 100, 64, True, False),  # a partial tile
    (1, 4, 2, 130, 32, False, False),  # no ALiBi; three tiles
    (2, 8, 2, 257, 128, True, False),  # the default's head size; one row past a tile
    (1, 2, 2, 5, 16, True, False),  # fewer keys than a vector
    (2, 4, 1, 70, 48, True, True),  # a head off the 32-bf16 vector; positions per batch row
    (1, 2, 1, 66, 80, True, False),  # a head of a full 64-column block and a partial one
    (1, 2, 2, 40, 256, True, False),  # the largest head
])
def test_kernel_agrees_with_float32_attention_as_closely_as_bf16_sdpa(B, H, K, T, D, alibi, batch_positions):
    """Output and the three input gradients against float32 PyTorch, within 1.5x of the error of
    bf16 SDPA (its inputs and ALiBi bias rounded to bf16 as the model's fallback runs it) plus a
    bf16 step."""
    q, k, v, positions, slopes = inputs(B, H, K, T, D, seed=T + D, alibi=alibi, batch_positions=batch_positions)
    scale = D**-0.5
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    ours = gradients(causal_attention, q, k, v, grad, positions, slopes, scale)
    exact = gradients(reference_attention, q.float(), k.float(), v.float(), grad.float(), positions, slopes, scale)

    def sdpa(q, k, v):
        distance = (positions[:, :, None] - positions[:, None, :]).abs()
        bias = torch.zeros(H) if slopes is None else slopes
        mask = -bias[None, :, None, None] * distance[:, None]
        mask = mask.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).bfloat16()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    bf16 = gradients(sdpa, q, k, v, grad)
    for name, got, want, peer in zip(("out", "dq", "dk", "dv"), ours, exact, bf16):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert relative_error(got, want) < 1.5 * relative_error(peer, want) + 4e-3, name


needs_amx = pytest.mark.skipif(not native.cpu_has(native.AMX_BF16_FLAGS), reason="no AMX tiles on this CPU")


@needs_amx
def test_the_amx_path_is_built_and_taken_where_the_cpu_has_tiles():
    """Where the CPU lists AMX tiles the kernel's products run on them (a build that fell back to
    vdpbf16ps alone would pass every other test here)."""
    assert kernel_module.amx_tiles()


@needs_amx
@pytest.mark.parametrize("B, H, K, T, D, alibi, batch_positions", [
    (1, 2, 1, 64, 64, True, False),
    (2, 4, 2, 100, 64, True, True),  # a partial tile, positions per row
    (1, 4, 2, 193, 32, False, False),
    (1, 4, 1, 130, 128, True, False),
    (1, 2, 2, 5, 256, True, False),  # fewer queries than a tile row
    (1, 2, 1, 70, 96, True, False),  # heads off 64 columns: C blocks of 32 only
    (1, 2, 1, 33, 160, False, False),
    (1, 2, 1, 1100, 32, True, False),  # past 1,024 tokens: the backward's dQ over two bands of key tiles
])
def test_amx_products_give_the_vdpbf16ps_results(B, H, K, T, D, alibi, batch_positions, monkeypatch):
    """The AMX path (backward transposed) against the AVX-512 BF16 path on the same inputs: the
    same products in another order and layout: equal but for float32 summation order (a bf16 step
    where a probability or score gradient rounds the other way; measured <= 2e-4 relative, held
    to 2e-3), and as close to float32 attention."""
    q, k, v, positions, slopes = inputs(B, H, K, T, D, seed=7 * T + D, alibi=alibi, batch_positions=batch_positions)
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(2)).bfloat16()
    scale = D**-0.5
    amx = gradients(causal_attention, q, k, v, grad, positions, slopes, scale)
    monkeypatch.setattr(kernel_module, "amx_tiles", lambda: False)
    vector = gradients(causal_attention, q, k, v, grad, positions, slopes, scale)
    exact = gradients(reference_attention, q.float(), k.float(), v.float(), grad.float(), positions, slopes, scale)
    for name, a, b, want in zip(("out", "dq", "dk", "dv"), amx, vector, exact):
        assert relative_error(a, b.float()) < 2e-3, name
        assert relative_error(a, want) < 1.1 * relative_error(b, want) + 2e-4, name


@pytest.mark.parametrize("B, H, K, T, D", [(1, 4, 2, 100, 64), (2, 8, 2, 257, 128), (1, 6, 1, 70, 48), (1, 2, 2, 5, 16)])
@pytest.mark.parametrize("vector", [False, True])
def test_a_task_per_kv_head_gives_the_per_query_head_results(B, H, K, T, D, vector, monkeypatch):
    """The backward's two ways to sum a key/value head's group, on both product paths: in place by a
    task per kv head (`tasks_per_kv_head`), or each query head's float32 partials summed at the end:
    the output and dQ bit-equal, dK and dV but for float32 summation order (a bf16 step apart in a
    few entries), both as close to float32 attention."""
    if vector:
        monkeypatch.setattr(kernel_module, "amx_tiles", lambda: False)
    q, k, v, positions, slopes = inputs(B, H, K, T, D, seed=5 * T + D)
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(3)).bfloat16()
    results = {}
    for per_kv_head in (True, False):
        monkeypatch.setattr(kernel_module, "tasks_per_kv_head", lambda B, K, per_kv_head=per_kv_head: per_kv_head)
        results[per_kv_head] = gradients(causal_attention, q, k, v, grad, positions, slopes, D**-0.5)
    exact = gradients(reference_attention, q.float(), k.float(), v.float(), grad.float(), positions, slopes, D**-0.5)
    grouped, partials = results[True], results[False]
    assert torch.equal(grouped[0], partials[0]) and torch.equal(grouped[1], partials[1])
    for name, a, b, want in zip(("dk", "dv"), grouped[2:], partials[2:], exact[2:]):
        assert relative_error(a, b.float()) < 2e-3, name
        assert relative_error(a, want) < 1.1 * relative_error(b, want) + 2e-4, name


@needs_amx
def test_the_backwards_band_of_key_tiles_leaves_the_bits_as_they_are(monkeypatch):
    """The AMX backward keeps dS^T for a band of key tiles (`backward_band`) and takes dQ as one
    product per query tile over it, and P^T and dS^T for segments of 16 query tiles: at 1,100 tokens
    (18 tiles: two segments) every band, one key tile to all of them, gives the same bits."""
    q, k, v, positions, slopes = inputs(2, 4, 2, 1100, 32, seed=11)
    grad = torch.randn(2, 4, 1100, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    assert kernel_module.backward_band(1100) == 14  # the automatic band: two of them here
    results = []
    for band in (1, 5, 18):
        monkeypatch.setattr(kernel_module, "backward_band", lambda T, band=band: band)
        results.append(gradients(causal_attention, q, k, v, grad, positions, slopes, 32**-0.5))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("vector", [False, True])
def test_an_empty_sequence_gives_empty_outputs_and_gradients(vector, monkeypatch):
    if vector:
        monkeypatch.setattr(kernel_module, "amx_tiles", lambda: False)
    q, k, v, positions, slopes = inputs(1, 4, 2, 0, 32, seed=1)
    out, dq, dk, dv = gradients(causal_attention, q, k, v, torch.zeros(1, 4, 0, 32).bfloat16(), positions, slopes,
                                0.2)
    assert out.shape == dq.shape == (1, 4, 0, 32) and dk.shape == dv.shape == (1, 2, 0, 32)


def test_strided_inputs_and_gradients_as_the_model_gives_them():
    """q, k, v as views of one fused projection (B, T, H + 2K, D) and a transposed output gradient:
    the same results as contiguous copies."""
    B, H, K, T, D = 2, 4, 2, 96, 32
    qkv = torch.randn(B, T, H + 2 * K, D).bfloat16().transpose(1, 2)
    q, k, v = qkv.split((H, K, K), dim=1)
    positions = torch.arange(T, dtype=torch.float32)[None]
    slopes = torch.tensor([0.25, 0.0625, 0.0, 0.0])
    grad = torch.randn(B, T, H, D).bfloat16().transpose(1, 2)
    strided = gradients(causal_attention, q, k, v, grad, positions, slopes, 0.2)
    plain = gradients(causal_attention, q.contiguous(), k.contiguous(), v.contiguous(), grad.contiguous(),
                      positions, slopes, 0.2)
    for a, b in zip(strided, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_ops_registrations_hold():
    """Schema, fake (meta) implementation, autograd registration and dispatch agree (`opcheck`)."""
    q, k, v, positions, slopes = inputs(1, 4, 2, 70, 32, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(kernel_module._attention_op, (q, k, v, positions, slopes, 0.2))
    torch.library.opcheck(kernel_module._attention_op, (q, k, v, positions, None, 0.2))


def test_compiled_fullgraph_gives_the_eager_results():
    q, k, v, positions, slopes = inputs(2, 4, 2, 80, 64, seed=4)
    grad = torch.randn(2, 4, 80, 64).bfloat16()

    def step(q, k, v):
        return causal_attention(q, k, v, positions, slopes, 0.125)

    eager = gradients(step, q, k, v, grad)
    compiled = gradients(torch.compile(step, fullgraph=True), q, k, v, grad)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v: (q.float(), k, v), "bf16 CPU tensors"),
    (lambda q, k, v: (q, k[:, :, :-1], v), "k and v must be"),
    (lambda q, k, v: (q[:, :3], k, v), "dividing"),
    (lambda q, k, v: (q[..., :40], k[..., :40], v[..., :40]), "multiple of 16"),
])
def test_bad_inputs_are_refused_with_the_expected_form(change, message):
    q, k, v, positions, slopes = inputs(1, 4, 2, 20, 64, seed=5, alibi=False)
    with pytest.raises(ValueError, match=message):
        causal_attention(*change(q, k, v), positions, slopes, 0.1)
    with pytest.raises(ValueError, match="positions must be"):
        causal_attention(q, k, v, positions[:, :-1], slopes, 0.1)
    with pytest.raises(ValueError, match="slopes must be"):
        causal_attention(q, k, v, positions, torch.ones(3), 0.1)


@pytest.mark.parametrize("autocast", [True, False])
def test_a_model_given_the_kernel_computes_what_it_does_with_sdpa(autocast):
    """`use_attention_kernel` gives a model the kernel; its bf16 loss and gradients (under autocast,
    where QK-norm's scales leave q and k in float32, and with bf16 weights) agree with SDPA's."""
    config = Config.from_preset("tiny", max_seq_len=128, dim_head=32)
    torch.manual_seed(0)
    model = build_transformer(config)
    if not autocast:
        model = model.bfloat16()
    tokens = torch.randint(0, config.num_tokens, (2, 97))
    results = []
    for kernel in (False, True):
        if kernel:
            assert use_attention_kernel(model)
            assert all(m.causal_attention is causal_attention for m in model.modules() if isinstance(m, Transformer))
            counted = model.causal_attention = Counted(causal_attention)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        results.append((loss.detach().float(), [p.grad.float().clone() for p in model.parameters()]))
    assert counted.calls == config.depth
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-3, atol=2e-3)
    total = sum(g.norm() ** 2 for g in results[0][1]) ** 0.5
    difference = sum((a - b).norm() ** 2 for a, b in zip(results[1][1], results[0][1])) ** 0.5
    assert difference / total < 3e-2


def test_float32_attention_padding_and_decoding_steps_keep_sdpa():
    """The kernel is for bf16 causal attention on the CPU where every query reads all keys before
    it: float32 forwards, padded batches and a KV cache's decode steps never call it; a bf16
    forward (its logits SDPA's to bf16 rounding) and a fresh cache's prefill do."""
    from andromeda.inference.generate import generate

    config = Config.from_preset("tiny", max_seq_len=64)
    torch.manual_seed(0)
    model = build_transformer(config, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, config.num_tokens, (2, 20))
    with torch.no_grad():
        expected = model(tokens).float()
    assert use_attention_kernel(model)
    counted = model.causal_attention = Counted(causal_attention)
    with torch.no_grad():
        model.float()(tokens)
        assert counted.calls == 0
        model.bfloat16()(tokens, key_mask=torch.arange(20)[None].expand(2, 20) >= torch.tensor([[0], [3]]))
        assert counted.calls == 0
        got = model(tokens).float()
        assert counted.calls == config.depth
        assert generate(model, tokens, 8, temperature=0).shape == (2, 8)  # the new tokens
    assert counted.calls == 2 * config.depth  # the prefill; the 7 decode steps read their cache their own way
    torch.testing.assert_close(got, expected, rtol=0.03, atol=0.03)


def test_a_nan_score_makes_its_rows_and_their_gradients_nan():
    """As in float32 attention: a NaN key reaches the output of every query reading it (and of
    none before it) and the gradients through those rows, where exp and the vector max would
    drop it."""
    q, k, v, positions, slopes = inputs(1, 2, 1, 80, 32, seed=6)
    k[0, 0, 70, 3] = float("nan")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = causal_attention(q, k, v, positions, slopes, 0.2)
    assert out[:, :, 70:].isnan().all() and not out[:, :, :70].isnan().any()
    dq, dk, dv = torch.autograd.grad(out.float().nan_to_num(0.0).sum() + out[:, :, 75].float().sum(), (q, k, v))
    assert dq[:, :, 75].isnan().all() and dk.isnan().any() and dv.isnan().any()


def test_a_bf16_training_run_on_the_cpu_attends_by_the_kernel(tmp_path, corpus, monkeypatch):
    """`train` hands the kernel to its model, and a --bf16 run's steps go through it in every
    layer, learning as it does."""
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return causal_attention(*args)

    monkeypatch.setattr(kernel_module, "attention_kernel", lambda: counted)
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", None)  # SDPA would fail
    result = train(tiny_train_config(tmp_path, corpus, bf16=True, eval_every=100, max_steps=4))
    assert result.step == 4 and result.train_loss is not None and result.train_loss < 5.0
    assert sum(shape[0] == 4 and shape[2] == 32 for shape in calls) >= 4 * 2  # 4 steps x 2 layers


def train(config):
    from andromeda.train import train as run

    return run(config)
