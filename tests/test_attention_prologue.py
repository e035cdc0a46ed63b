"""`train.attention_kernel.attention_prologue`: QK-norm, its learned scales and rotary xPos in one C
pass each way, against the model's own PyTorch ops (`l2_normalize`, the scales, `apply_rotary`) and
against the same function in float64; as the op's registrations claim (`opcheck`), compiled, and in
a model the training loop hands it to."""

from __future__ import annotations

import pytest
import torch

from andromeda import Config
from andromeda.model import Transformer, build_transformer
from andromeda.model.attention import NORM_EPS, l2_normalize
from andromeda.model.positions import apply_rotary, xpos_tables
from andromeda.train import attention_kernel as kernel_module
from andromeda.train.attention_kernel import attention_kernel, attention_prologue, use_attention_kernel
from helpers import Counted, assert_same_step, autocast_step, tiny_train_config

pytestmark = pytest.mark.skipif(attention_kernel() is None, reason=f"attention kernel unavailable: "
                                f"{kernel_module.unavailable_reason()}")


def problem(B, T, H, K, D, R, per_row, seed, scale_base=64.0):
    """The fused projection's output, QK-norm scales, xPos tables and output gradients."""
    generator = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, H + 2 * K, D, generator=generator) * 3).bfloat16()
    q_scale = torch.rand(H, 1, D, generator=generator) + D**0.25
    k_scale = torch.rand(K, 1, D, generator=generator) + D**0.25
    if per_row:  # each row its own increasing positions and center
        positions = torch.randint(0, 3 * T, (B, T), generator=generator).sort(dim=-1).values
        center = positions[:, -1:].float() / 2
    else:
        positions, center = torch.arange(T)[None], T // 2
    rotary = xpos_tables(positions, R, 10000.0, scale_base, center)
    if per_row:  # as the attention kernel's backward gives them: (B, T, heads, D) memory, transposed
        grads = tuple(torch.randn(B, T, heads, D, generator=generator).bfloat16().transpose(1, 2) for heads in (H, K, K))
    else:
        grads = tuple(torch.randn(B, heads, T, D, generator=generator).bfloat16() for heads in (H, K, K))
    return qkv, q_scale, k_scale, rotary, grads


def model_ops(qkv, q_scale, k_scale, rotary, eps=NORM_EPS):
    """`Attention.forward`'s PyTorch path under CPU autocast, cast to bf16 as the fused attention
    takes its inputs."""
    H, K = q_scale.shape[0], k_scale.shape[0]
    q, k, v = qkv.transpose(1, 2).split((H, K, K), dim=1)
    q, k = l2_normalize(q, eps) * q_scale, l2_normalize(k, eps) * k_scale
    (q_cos, q_sin), (k_cos, k_sin) = rotary
    q, k = apply_rotary(q, q_cos, q_sin), apply_rotary(k, k_cos, k_sin)
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def float64_ops(qkv, q_scale, k_scale, rotary):
    """The same function exactly: no rounding between the steps."""
    H, K = q_scale.shape[0], k_scale.shape[0]
    q, k, v = qkv.transpose(1, 2).split((H, K, K), dim=1)
    q, k = q / q.norm(dim=-1, keepdim=True) * q_scale, k / k.norm(dim=-1, keepdim=True) * k_scale

    def rotate(x, cos, sin):
        R = 2 * cos.shape[-1]
        even, odd = x[..., :R:2], x[..., 1:R:2]
        cos, sin = cos.double(), sin.double()
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)
        return torch.cat((rotated, x[..., R:]), -1)

    (q_cos, q_sin), (k_cos, k_sin) = rotary
    return rotate(q, q_cos, q_sin), rotate(k, k_cos, k_sin), v


def run(function, qkv, q_scale, k_scale, rotary, grads, dtype=None, **kwargs):
    """Outputs and the gradients of qkv and both scales, under CPU autocast (as training runs it)."""
    qkv, q_scale, k_scale = (x.detach().to(dtype or x.dtype).requires_grad_() for x in (qkv, q_scale, k_scale))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is None):
        out = function(qkv, q_scale, k_scale, rotary, **kwargs)
    gradients = torch.autograd.grad(out, (qkv, q_scale, k_scale), tuple(g.to(out[0].dtype) for g in grads))
    return out, gradients


def relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("B, T, H, K, D, R, per_row", [
    (2, 70, 4, 2, 32, 16, False),  # the demo's heads
    (1, 33, 8, 2, 64, 32, True),  # the training benchmark's heads; positions, centers per row; strided gradients
    (2, 17, 24, 2, 128, 64, False),  # the 2.5 B default's
    (1, 9, 2, 1, 256, 256, False),  # the largest head, rotated whole
    (3, 5, 3, 1, 48, 16, True),  # a head off 32 channels
])
def test_prologue_computes_the_models_heads(B, T, H, K, D, R, per_row):
    """Forward: the model's ops' bf16 results but for a last-bit rounding in a few elements (the
    rotation's products in another order). Backward: the model's ops round the gradient to bf16
    four times on the way, the kernel once; against float64 it is at least as accurate."""
    qkv, q_scale, k_scale, rotary, grads = problem(B, T, H, K, D, R, per_row, seed=B * T + D)
    fused, fused_grads = run(attention_prologue, qkv, q_scale, k_scale, rotary, grads, eps=NORM_EPS)
    eager, eager_grads = run(model_ops, qkv, q_scale, k_scale, rotary, grads)
    exact, exact_grads = run(float64_ops, qkv, q_scale, k_scale, rotary, grads, dtype=torch.float64)
    for got, want in zip(fused, eager):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)  # one bf16 step at most
        assert (got != want).float().mean() < 1e-3
    assert torch.equal(fused[2], qkv[:, :, H + K:].transpose(1, 2))  # the values as they are
    for name, got, want, exact_grad in zip(("qkv", "q_scale", "k_scale"), fused_grads, eager_grads, exact_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert relative_error(got, exact_grad) <= 1.05 * relative_error(want, exact_grad) + 1e-6, name
        assert relative_error(got, exact_grad) < 5e-3, name


def test_heads_shorter_than_eps_and_nan_heads_follow_the_model():
    """Below eps a head is divided by eps itself (the gradient not projected), as l2_normalize's
    clamp does; a NaN channel makes its head's outputs and gradient NaN and leaves the others."""
    qkv, q_scale, k_scale, rotary, grads = problem(1, 6, 2, 1, 32, 16, False, seed=3)
    qkv[0, 1, 0] *= 0.01  # query head 0 at position 1: a length well under eps = 1
    qkv[0, 2, 2] = 0.0  # key head at position 2: zero
    fused, fused_grads = run(attention_prologue, qkv, q_scale, k_scale, rotary, grads, eps=1.0)
    eager, eager_grads = run(model_ops, qkv, q_scale, k_scale, rotary, grads, eps=1.0)
    for got, want in zip(fused + fused_grads, eager + eager_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
    lengths = fused[0][0, 0].float().norm(dim=-1)  # a unit head's: the scales', 2.4 to 3.4
    assert lengths[1] < 0.5 * q_scale.min() < lengths[0] and not fused[1][0, 0, 2].any()

    qkv[0, 4, 1, 5] = float("nan")
    fused, (dqkv, dq_scale, _) = run(attention_prologue, qkv, q_scale, k_scale, rotary, grads, eps=NORM_EPS)
    assert fused[0][0, 1, 4].isnan().all() and not fused[0][0, 1, :4].isnan().any()
    assert not fused[0][0, 0].isnan().any() and not fused[1].isnan().any()
    assert dqkv[0, 4, 1].isnan().all() and not dqkv[0, :4].isnan().any() and dq_scale[1].isnan().any()


def test_the_ops_registrations_hold_and_compiled_gives_eager():
    """Schema, fake implementation, autograd registration and dispatch agree (`opcheck`); a
    fullgraph compile keeps the op and gives its results bit for bit."""
    qkv, q_scale, k_scale, rotary, grads = problem(2, 20, 4, 2, 32, 16, True, seed=4)
    (q_cos, q_sin), (k_cos, k_sin) = rotary
    arguments = (qkv.requires_grad_(), q_scale.requires_grad_(), k_scale.requires_grad_(), q_cos, q_sin, k_cos, k_sin,
                 NORM_EPS)
    torch.library.opcheck(kernel_module._prologue_op, arguments)
    eager = run(attention_prologue, qkv, q_scale, k_scale, rotary, grads, eps=NORM_EPS)
    compiled = run(torch.compile(attention_prologue, fullgraph=True), qkv, q_scale, k_scale, rotary, grads,
                   eps=NORM_EPS)
    for a, b in zip(compiled[0] + compiled[1], eager[0] + eager[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs_are_refused_with_the_expected_form():
    qkv, q_scale, k_scale, rotary, _ = problem(1, 8, 4, 2, 32, 16, False, seed=5)
    for bad in (qkv.float(), qkv[:, :, :-1], qkv.transpose(1, 2), qkv[..., :24]):
        with pytest.raises(ValueError, match="contiguous bf16 qkv"):
            attention_prologue(bad, q_scale, k_scale, rotary, NORM_EPS)
    with pytest.raises(ValueError, match="scales"):
        attention_prologue(qkv, q_scale[:3], k_scale, rotary, NORM_EPS)
    (q_cos, q_sin), (k_cos, k_sin) = rotary
    with pytest.raises(ValueError, match="multiple of 16"):  # 12 rotated channels
        attention_prologue(qkv, q_scale, k_scale, ((q_cos[..., :6], q_sin[..., :6]), (k_cos[..., :6], k_sin[..., :6])),
                           NORM_EPS)
    with pytest.raises(ValueError, match=r"takes qkv \(B, T, H \+ 2K, D\)"):
        attention_prologue(qkv.flatten(2), q_scale, k_scale, rotary, NORM_EPS)
    with pytest.raises(ValueError, match="float32 scales"):
        attention_prologue(qkv, q_scale.bfloat16(), k_scale, rotary, NORM_EPS)
    with pytest.raises(ValueError, match="rotary tables"):  # a table one position short
        attention_prologue(qkv, q_scale, k_scale, ((q_cos[:, :, 1:], q_sin), (k_cos, k_sin)), NORM_EPS)


def test_a_model_given_the_kernel_takes_the_prologue_where_it_fits():
    """`use_attention_kernel` gives the prologue with the attention to a model whose heads it takes;
    an autocast step calls it in every layer and its loss and gradients are the model's own ops'
    (to bf16 rounding); bf16 weights (bf16 scales) keep the ops; a model with 8 rotated channels
    gets none."""
    config = Config.from_preset("tiny", max_seq_len=128, dim_head=32)
    torch.manual_seed(0)
    model = build_transformer(config)
    tokens = torch.randint(0, config.num_tokens, (2, 97))
    assert use_attention_kernel(model) and model.attention_prologue is attention_prologue
    model.attention_prologue = None
    plain = autocast_step(model, tokens)
    prologue = model.attention_prologue = Counted(attention_prologue)
    assert_same_step(autocast_step(model, tokens), plain)
    assert prologue.calls == config.depth

    counted = model.attention_prologue = Counted(attention_prologue)
    with torch.no_grad():
        model.bfloat16()(tokens)
    assert counted.calls == 0

    other = build_transformer(Config.from_preset("tiny", max_seq_len=128))  # heads of 16: 8 rotated channels
    assert use_attention_kernel(other) and other.causal_attention is not None
    assert all(m.attention_prologue is None for m in other.modules() if isinstance(m, Transformer))


def test_a_bf16_training_run_takes_the_prologue_and_trains_as_without(tmp_path, corpus, monkeypatch):
    """`train --bf16 --activation-checkpointing` on the CPU hands the prologue to a model whose heads
    it takes: every layer's forward and its recomputation go through it, and the run's losses are
    those of the same run on the model's own ops."""
    from andromeda.train import train

    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return attention_prologue(*args)

    def run(name):
        config = tiny_train_config(tmp_path, corpus, out=str(tmp_path / name), bf16=True, activation_checkpointing=True,
                                   model_overrides={"max_seq_len": 64, "dim_head": 32}, eval_every=100, max_steps=4)
        return train(config)

    monkeypatch.setattr(kernel_module, "attention_prologue", counted)
    with monkeypatch.context() as patch:
        patch.setattr(kernel_module, "prologue_fits", lambda dim_head, rotary_dim: False)
        plain = run("plain")
    assert calls == []
    fused = run("fused")
    # 4 steps x 2 layers, each forward and its recomputation; then the run's evaluations
    assert calls.count((4, 32, 4 + 2 * 2, 32)) == 4 * 2 * 2 and len(calls) > 16
    assert fused.step == plain.step == 4
    assert fused.train_loss == pytest.approx(plain.train_loss, rel=2e-2) and fused.train_loss < 5.0
