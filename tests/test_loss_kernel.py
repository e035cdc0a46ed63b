"""`train.loss_kernel`: the loss's softmax and gradient over bf16 logits by its C kernel, against
PyTorch's float32 ops (`model.loss._softmax_cross_entropy`), alone, inside the fused linear
cross-entropy (eager and compiled) and in a model the training loop hands it to."""

from __future__ import annotations

import pytest
import torch

from andromeda import Config
from andromeda.model import Transformer, build_transformer, linear_cross_entropy
from andromeda.model.loss import _softmax_cross_entropy
from andromeda.train import loss_kernel as loss_kernel_module
from andromeda.train.loss_kernel import loss_kernel, softmax_cross_entropy, use_loss_kernel
from helpers import Counted, tiny_train_config

pytestmark = pytest.mark.skipif(loss_kernel() is None, reason=f"loss kernel unavailable: "
                                f"{loss_kernel_module.unavailable_reason()}")


def random_logits(rows: int, vocab: int, seed: int, spread: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * spread).bfloat16()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::5] = -100  # ignored rows
    return logits, targets


@pytest.mark.parametrize("rows, vocab, spread", [(7, 16, 4.0), (33, 1001, 4.0), (64, 5000, 30.0), (3, 50432, 4.0)])
def test_kernel_gives_the_float32_losses_and_gradients(rows, vocab, spread):
    """Losses to float32 rounding, each gradient the float32 one rounded to bf16 (a few entries one
    bf16 step apart: e^x is Cephes' polynomial, not glibc's); widths off the 16-lane vectors,
    ignored rows and logits up to +-120 included."""
    logits, targets = random_logits(rows, vocab, seed=rows, spread=spread)
    ok = targets != -100
    row_weight = ok.float() / ok.sum() * 3.0
    expected = logits.float()
    expected_total = _softmax_cross_entropy(expected, targets, ok, row_weight)
    got = logits.clone()
    losses = softmax_cross_entropy(got, targets, row_weight)
    assert losses.dtype == torch.float32 and losses.shape == (rows,)
    assert torch.all(losses[~ok] == 0)
    torch.testing.assert_close(losses.sum(), expected_total, rtol=1e-5, atol=1e-5)
    reference = expected.bfloat16()
    apart = got != reference
    assert apart.float().mean() < 0.05  # rounding ties: 0.5% of entries at a spread of 4, 3% at 30
    ulp = reference.float().abs() * 2.0**-7 + 1e-30
    assert torch.all((got.float() - reference.float()).abs()[apart] <= ulp[apart] * 1.01)
    assert torch.all(got[~ok] == 0)  # ignored rows: zero gradient
    target_grads = got[ok].float().gather(1, targets[ok, None])
    assert torch.all(target_grads < 0)  # softmax - 1 at the target


def test_without_row_weights_only_the_losses_are_computed():
    logits, targets = random_logits(9, 777, seed=1)
    before = logits.clone()
    losses = softmax_cross_entropy(logits, targets, None)
    assert torch.equal(logits, before)
    ok = targets != -100
    expected = torch.nn.functional.cross_entropy(before.float(), targets, reduction="none")
    torch.testing.assert_close(losses[ok], expected[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [100, -1])
def test_a_target_outside_the_vocabulary_is_refused_and_nothing_written(bad):
    logits, targets = random_logits(4, 100, seed=2)
    targets[1] = bad
    before = logits.clone()
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 100\) or -100"):
        softmax_cross_entropy(logits, targets, torch.ones(4))
    assert torch.equal(logits, before)


def test_malformed_inputs_are_refused():
    logits, targets = random_logits(4, 100, seed=2)
    with pytest.raises(ValueError, match="bf16 .* contiguous rows"):
        softmax_cross_entropy(logits.float(), targets, None)
    with pytest.raises(ValueError, match=r"row_weight must be \(4,\)"):
        softmax_cross_entropy(logits, targets, torch.ones(3))
    with pytest.raises(ValueError, match="rows must not overlap"):
        softmax_cross_entropy(logits[:1].expand(4, 100), targets, None)


@pytest.mark.parametrize("column", [3, 40, 99])
def test_a_nan_logit_makes_the_loss_nan(column):
    """As PyTorch's: a diverged row's loss is NaN wherever the NaN sits (not only in the last
    vector), so the training loop's non-finite check stops the run."""
    logits, targets = random_logits(3, 100, seed=4)
    targets[1] = 7
    logits[1, column] = float("nan")
    losses = softmax_cross_entropy(logits, targets, torch.ones(3))
    assert torch.isnan(losses[1]) and torch.isfinite(losses[0]) and torch.isfinite(losses[2])


def fused_loss(hidden, weight, targets, kernel, *, compiled=False):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()

    def loss_of(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(h, w, targets, "mean", 64, kernel)

    loss = (torch.compile(loss_of, fullgraph=True) if compiled else loss_of)(hidden, weight)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def test_fused_linear_cross_entropy_agrees_with_and_without_the_kernel(monkeypatch):
    """Under bf16 autocast the kernel's path (bf16 logits in place, each product once per group of
    chunks) and PyTorch's (a float32 copy, products per chunk) give the same loss and gradients to
    bf16 rounding, over several groups; compiled (the op in the graph) the kernel's path gives what
    it gives eagerly."""
    from andromeda.model import loss

    monkeypatch.setattr(loss, "LOSS_GROUP_BYTES", 128 * 1000 * 2)  # 128 bf16 rows of 1,000 logits a group
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(200, 64, generator=generator)
    weight = torch.randn(1000, 64, generator=generator) * 0.2
    targets = torch.randint(0, 1000, (200,), generator=generator)
    targets[::7] = -100
    plain = fused_loss(hidden, weight, targets, None)
    counted = Counted(softmax_cross_entropy)
    fused = fused_loss(hidden, weight, targets, counted)
    assert counted.calls == 2  # 200 rows in groups of two chunks of 64: 128 + 72
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(fused[1:], plain[1:]):  # two bf16 roundings apart at most (each ~2.8e-3 from exact)
        assert (a - b).norm() / b.norm() < 4e-3
    compiled = fused_loss(hidden, weight, targets, loss_kernel(), compiled=True)
    for a, b in zip(compiled, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_bf16_training_run_on_the_cpu_computes_its_loss_by_the_kernel(tmp_path, corpus, monkeypatch):
    """`train` hands the kernel to its model, and a --bf16 run's steps go through it (every chunk
    of every step), learning as it does."""
    from andromeda.model import loss as loss_module
    from andromeda.train import train

    calls = []

    def counted(logits, targets, row_weight):
        calls.append(logits.shape)
        return softmax_cross_entropy(logits, targets, row_weight)

    monkeypatch.setattr(loss_kernel_module, "loss_kernel", lambda: counted)
    monkeypatch.setattr(loss_module, "_softmax_cross_entropy", None)  # PyTorch's path would fail
    result = train(tiny_train_config(tmp_path, corpus, bf16=True, eval_every=100, max_steps=4))
    assert result.step == 4 and result.train_loss is not None and result.train_loss < 5.0
    assert sum(shape[0] == 4 * 32 for shape in calls) >= 4  # each step's one chunk (then the evaluations')


def test_a_model_given_the_kernel_trains_as_it_does_without():
    """`use_loss_kernel` gives a model the kernel; its bf16 loss and logits gradient agree with the
    model's own (PyTorch's ops)."""
    config = Config.from_preset("tiny", max_seq_len=64)
    torch.manual_seed(0)
    model = build_transformer(config)
    tokens = torch.randint(0, config.num_tokens, (2, 33))
    results = []
    for kernel in (False, True):
        if kernel:
            assert use_loss_kernel(model)
            assert all(m.softmax_cross_entropy is softmax_cross_entropy for m in model.modules()
                       if isinstance(m, Transformer))
            counted = model.softmax_cross_entropy = Counted(softmax_cross_entropy)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), model.to_logits.weight.grad.clone()))
    assert counted.calls == 1
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    assert (results[1][1] - results[0][1]).norm() / results[0][1].norm() < 2e-3
