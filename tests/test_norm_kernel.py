"""`train.norm_kernel`: LayerNorm from float32 rows to bf16 by its C kernel, against PyTorch's
float32 LayerNorm rounded to bf16 and a float64 backward, as its ops' registrations claim, in a
model under autocast, and in the training loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from andromeda import Config
from andromeda.model import build_transformer
from andromeda.model.transformer import LayerNorm
from andromeda.train import norm_kernel as kernel_module
from andromeda.train.norm_kernel import layer_norm_bf16, reference_layer_norm_bf16, use_norm_kernel
from helpers import Counted, assert_same_step, autocast_step, tiny_train_config

pytestmark = pytest.mark.skipif(kernel_module.norm_kernel() is None, reason=f"LayerNorm kernel unavailable: "
                                f"{kernel_module.unavailable_reason()}")

EPS = 1e-5


def problem(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=generator) * 3 + 0.5
    weight = torch.rand(C, generator=generator) + 0.5
    grad = torch.randn(shape, generator=generator).bfloat16()
    return x, weight, grad


def gradients(function, x, weight, grad):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    out = function(x, weight)
    return (out, *torch.autograd.grad(out, (x, weight), grad.to(out.dtype)))


def relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("shape", [(4, 64, 512), (2, 33, 2560), (7, 37), (3, 5, 16), (1, 1, 100), (300, 24)])
def test_kernel_gives_float32_layer_norm_rounded_to_bf16_and_its_gradients(shape):
    """Forward: PyTorch's float32 LayerNorm rounded to bf16, but for a last bit in under 0.1% of
    entries (mean and variance summed in another order); mean and rstd as PyTorch's. Backward from a
    bf16 gradient: dx and dw at least as close to a float64 backward as PyTorch's float32 one, over
    widths on and off the 16-float vector and one or many rows."""
    x, weight, grad = problem(shape, seed=sum(shape))
    C = shape[-1]
    ours = gradients(lambda x, w: layer_norm_bf16(x, w, EPS), x, weight, grad)
    plain = gradients(lambda x, w: reference_layer_norm_bf16(x, w, EPS), x, weight, grad)
    exact = gradients(lambda x, w: F.layer_norm(x, (C,), w, None, EPS), x.double(), weight.double(), grad)
    out, expected = ours[0], plain[0]
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    differ = out != expected
    assert differ.float().mean() < 1e-3
    ulp = expected.float().abs() * 2**-7 + 1e-30
    assert ((out.float() - expected.float()).abs()[differ] <= ulp[differ]).all()  # one bf16 step at most
    y, mean, rstd = kernel_module._norm_op(x, weight, EPS)
    torch.testing.assert_close(mean, x.reshape(-1, C).mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, (x.reshape(-1, C).var(-1, unbiased=False) + EPS).rsqrt(), rtol=1e-5, atol=0)
    for name, got, ref, want in zip(("dx", "dw"), ours[1:], plain[1:], exact[1:]):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert relative_error(got, want) <= 1.1 * relative_error(ref, want) + 1e-7, name


def test_strided_input_is_read_as_its_contiguous_copy_and_dw_is_deterministic():
    """A transposed view of x gives the contiguous copy's results; two backward calls give the same
    weight gradient bit for bit (per-thread sums added in thread order)."""
    x, weight, grad = problem((64, 3, 48), seed=3)
    view = x.transpose(0, 1)  # (3, 64, 48), not contiguous
    a = gradients(lambda x, w: layer_norm_bf16(x, w, EPS), view, weight, grad.transpose(0, 1))
    b = gradients(lambda x, w: layer_norm_bf16(x, w, EPS), view.contiguous(), weight, grad.transpose(0, 1))
    for got, want in zip(a, b):
        assert torch.equal(got, want)
    again = gradients(lambda x, w: layer_norm_bf16(x, w, EPS), view, weight, grad.transpose(0, 1))
    assert torch.equal(again[2], a[2])


def test_a_nan_row_stays_in_its_row():
    """As PyTorch's: a NaN in a row makes that row's output (and its input gradient) NaN, no other."""
    x, weight, grad = problem((6, 40), seed=4)
    x[2, 7] = float("nan")
    out, dx, dw = gradients(lambda x, w: layer_norm_bf16(x, w, EPS), x, weight, grad)
    assert out[2].isnan().all() and not out[[0, 1, 3, 4, 5]].isnan().any()
    assert dx[2].isnan().all() and not dx[[0, 1, 3, 4, 5]].isnan().any()


def test_the_ops_registrations_hold():
    """Schema, fake implementation, autograd registration and dispatch agree (`opcheck`)."""
    x, weight, grad = problem((3, 9, 32), seed=5)
    torch.library.opcheck(kernel_module._norm_op, (x.requires_grad_(), weight.requires_grad_(), EPS))
    _, mean, rstd = kernel_module._norm_op(x.detach(), weight.detach(), EPS)
    torch.library.opcheck(kernel_module._norm_backward_op, (grad, x.detach(), weight.detach(), mean, rstd))


def test_bad_inputs_are_refused_with_the_expected_form():
    x, weight, _ = problem((4, 32), seed=6)
    with pytest.raises(ValueError, match="float32 rows and weight"):
        layer_norm_bf16(x.bfloat16(), weight, EPS)
    with pytest.raises(ValueError, match="float32 rows and weight"):
        layer_norm_bf16(x, weight.bfloat16(), EPS)
    with pytest.raises(ValueError, match=r"weight must be \(32,\)"):
        layer_norm_bf16(x, weight[:16], EPS)


def test_a_model_given_the_kernel_computes_what_it_does_with_torchs_norms(monkeypatch):
    """`use_norm_kernel` gives every norm the kernel; an autocast step calls it in each block's two
    norms and the final one (inputs of NORM_TO_BF16_MIN entries and more; lowered for this small
    model), and its loss and gradients are those of PyTorch's norms (to bf16 rounding); outside
    autocast, with bf16 weights, under torch.compile and for smaller inputs the norms keep
    nn.LayerNorm's own forward."""
    from andromeda.model import transformer

    monkeypatch.setattr(transformer, "NORM_TO_BF16_MIN", 2 * 96 * 64)  # the step's (2, 96, 64)
    config = Config.from_preset("tiny", max_seq_len=128)
    torch.manual_seed(0)
    model = build_transformer(config)
    tokens = torch.randint(0, config.num_tokens, (2, 97))
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert len(norms) == 2 * config.depth + 1
    assert use_norm_kernel(model) and all(m.to_bf16 is layer_norm_bf16 for m in norms)
    for m in norms:
        m.to_bf16 = None
    plain = autocast_step(model, tokens)
    kernel = Counted(layer_norm_bf16)
    for m in norms:
        m.to_bf16 = kernel
    assert_same_step(autocast_step(model, tokens), plain)
    assert kernel.calls == 2 * config.depth + 1

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens[:, :-2])  # (2, 95, 64): under the threshold
    assert kernel.calls == 2 * config.depth + 1
    with torch.no_grad():
        model(tokens)  # float32, no autocast
        assert kernel.calls == 2 * config.depth + 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.compile(model.blocks[0].attn_norm, fullgraph=True)(torch.randn(2, 5, config.dim))
        assert kernel.calls == 2 * config.depth + 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.bfloat16()(tokens)
        assert kernel.calls == 2 * config.depth + 1


def test_a_bf16_training_run_takes_the_kernel_and_trains_as_without(tmp_path, corpus, monkeypatch):
    """`train --bf16 --activation-checkpointing` on the CPU hands the kernel to its model: every norm of
    every step (and of its recomputation) goes through it, and the run's loss is that of the same run
    on PyTorch's norms."""
    from andromeda.train import train

    calls = []

    def counted(x, weight, eps):
        calls.append(tuple(x.shape))
        return layer_norm_bf16(x, weight, eps)

    def run(name):
        return train(tiny_train_config(tmp_path, corpus, out=str(tmp_path / name), bf16=True, eval_every=100,
                                       activation_checkpointing=True, max_steps=4))

    from andromeda.model import transformer

    monkeypatch.setattr(transformer, "NORM_TO_BF16_MIN", 1)  # the run's (4, 32, 64) norms take it
    with monkeypatch.context() as patch:
        patch.setattr(kernel_module, "norm_kernel", lambda: None)
        plain = run("plain")
    assert calls == []
    monkeypatch.setattr(kernel_module, "norm_kernel", lambda: counted)
    fused = run("fused")
    # 4 steps x (2 layers x 2 norms, forward and recomputation, + the final norm)
    assert calls.count((4, 32, 64)) == 4 * (2 * 2 * 2 + 1)
    assert fused.step == plain.step == 4
    assert fused.train_loss == pytest.approx(plain.train_loss, rel=2e-2) and fused.train_loss < 5.0


def test_a_strided_weight_and_another_default_dtype_give_the_same_results():
    """The backward keeps its contiguous copy of a strided weight alive while the kernel reads it (a
    copy of 8 MB, which a freed block would hand back to Linux), and the ops' outputs are float32
    whatever torch's default dtype (a review found both wrong)."""
    x, weight, grad = problem((2, 1 << 21), seed=7)
    strided = torch.stack([weight, torch.full_like(weight, 1e30)], dim=1)[:, 0]  # every other float
    assert not strided.is_contiguous()
    a = gradients(lambda x, w: layer_norm_bf16(x, w, EPS), x, strided, grad)
    b = gradients(lambda x, w: layer_norm_bf16(x, w, EPS), x, weight, grad)
    for got, want in zip(a, b):
        assert torch.equal(got, want)
    torch.set_default_dtype(torch.float64)
    try:
        y, mean, rstd = kernel_module._norm_op(x, weight, EPS)
        dx, dw = kernel_module._norm_backward_op(grad, x, weight, mean, rstd)
    finally:
        torch.set_default_dtype(torch.float32)
    assert mean.dtype == rstd.dtype == dx.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(mean, x.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, b[1], rtol=0, atol=0)
