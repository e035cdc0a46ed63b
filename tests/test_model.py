"""The model's semantics: parity with x-transformers, equal code paths, causality, bad input."""

import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from andromeda import Andromeda, Config
from andromeda.model import attention as attention_module
from andromeda.interop import build_x_transformers, from_x_transformers
from andromeda.model.positions import alibi_slopes
from andromeda.model import linear_cross_entropy

from helpers import FEATURE_MIXES  # noqa: E402

x_transformers = pytest.importorskip("x_transformers")

TINY = Config.from_preset("tiny", max_seq_len=160)



def x_transformers_model(config: Config):
    """The same hyperparameters in x-transformers' spelling, weights moved off their init."""
    model = build_x_transformers(config)
    with torch.no_grad():  # move every weight off its init so no term hides behind ones/zeros
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("mix", sorted(FEATURE_MIXES))
def test_logits_match_x_transformers(mix, device):
    config = TINY.replace(**FEATURE_MIXES[mix])
    reference = x_transformers_model(config).to(device)
    model = Andromeda.from_config(config, device=device).eval()
    model.load_x_transformers(reference.state_dict())
    tokens = torch.randint(0, config.num_tokens, (2, 150), device=device)
    with torch.no_grad():
        expected, actual = reference(tokens), model.Andromeda(tokens)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)


def test_loss_matches_x_transformers_autoregressive_wrapper():
    reference = x_transformers_model(TINY)
    model = Andromeda.from_config(TINY).eval()
    model.load_x_transformers(reference.state_dict())
    wrapper = x_transformers.AutoregressiveWrapper(reference)
    tokens = torch.randint(0, TINY.num_tokens, (3, 65))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), wrapper(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flash", [True, False])
def test_gradients_match_x_transformers(flash):
    """Every parameter's gradient of the training loss, through the fused loss, the lean
    feed-forward backward and both attention paths, equals x-transformers' autograd."""
    config = TINY.replace(attn_flash=flash)
    reference = x_transformers_model(config).train()
    model = Andromeda.from_config(config)
    model.load_x_transformers(reference.state_dict())
    tokens = torch.randint(0, config.num_tokens, (3, 65))
    x_transformers.AutoregressiveWrapper(reference)(tokens).backward()
    model(tokens).backward()
    # The conversion is affine in each tensor (permutations, the norms' unit offset): converting
    # weights + gradients and subtracting the converted weights carries the gradients across.
    weights, params = reference.state_dict(), dict(reference.named_parameters())
    shifted = {name: w + params[name].grad if name in params else w for name, w in weights.items()}
    converted = from_x_transformers(shifted, config)
    for name, base in from_x_transformers(weights, config).items():
        ours = model.Andromeda.get_parameter(name).grad
        torch.testing.assert_close(ours, converted[name] - base, atol=1e-5, rtol=1e-4,
                                   msg=lambda message: f"{name}: {message}")


def test_alibi_slopes_match_x_transformers():
    for n in (1, 2, 3, 4, 5, 6, 8, 12, 16):
        expected = x_transformers.x_transformers.AlibiPositionalBias._get_slopes(n)
        assert alibi_slopes(n, 24)[:n] == pytest.approx(expected, rel=1e-12)
        assert alibi_slopes(n, 24)[n:] == (0.0,) * (24 - n)


def test_load_rejects_mismatched_state_dict_without_touching_the_model():
    model = Andromeda.from_config(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = x_transformers_model(TINY.replace(dim=32)).state_dict()
    with pytest.raises(ValueError, match="shape"):
        model.load_x_transformers(wrong)
    deeper = x_transformers_model(TINY.replace(depth=3)).state_dict()
    with pytest.raises(ValueError, match="no place for"):
        model.load_x_transformers(deeper)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_absolute_positions_load_as_zeros(caplog):
    """x-transformers drops absolute positions when rotary is on; zeros reproduce it."""
    config = TINY.replace(use_abs_pos_emb=True)
    model = Andromeda.from_config(config)
    with caplog.at_level(logging.WARNING):
        model.load_x_transformers(x_transformers_model(config).state_dict())
    assert "no absolute position embedding" in caplog.text
    assert not model.Andromeda.pos_emb.weight.any()


@pytest.mark.parametrize("mix", ["seed", "no-alibi", "abs-pos-only", "one-kv-head-3-alibi"])
def test_flash_and_reference_attention_agree(mix, monkeypatch):
    config = TINY.replace(**FEATURE_MIXES[mix])
    flash = Andromeda.from_config(config.replace(attn_flash=True))
    reference = Andromeda.from_config(config.replace(attn_flash=False))
    reference.load_state_dict(flash.state_dict())
    monkeypatch.setattr(attention_module, "QUERY_CHUNK", 48)  # exercise the chunked path
    tokens = torch.randint(0, config.num_tokens, (2, 150))
    torch.testing.assert_close(flash.Andromeda(tokens), reference.Andromeda(tokens), atol=2e-5, rtol=1e-5)
    # The gradients agree too: both paths train the same model.
    flash(tokens).backward()
    reference(tokens).backward()
    for (name, a), b in zip(flash.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("flash", [True, False])
def test_causality_future_tokens_do_not_change_the_past(flash):
    model = Andromeda.from_config(TINY.replace(attn_flash=flash)).eval()
    tokens = torch.randint(0, TINY.num_tokens, (1, 64))
    changed = tokens.clone()
    changed[0, 40:] = torch.randint(0, TINY.num_tokens, (24,))
    with torch.no_grad():
        a, b = model.Andromeda(tokens), model.Andromeda(changed)
    torch.testing.assert_close(a[:, :40], b[:, :40], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_rows_of_a_batch_are_independent():
    model = Andromeda.from_config(TINY).eval()
    tokens = torch.randint(0, TINY.num_tokens, (4, 50))
    with torch.no_grad():
        batched = model.Andromeda(tokens)
        single = torch.cat([model.Andromeda(row[None]) for row in tokens])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_loss_is_shifted_cross_entropy_of_the_logits():
    model = Andromeda.from_config(TINY)
    tokens = torch.randint(0, TINY.num_tokens, (2, 33))
    out = model(tokens, return_logits=True)
    expected = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(model(tokens), expected, atol=1e-6, rtol=1e-6)


def test_fused_loss_gradients_equal_the_plain_loss():
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[5] = -100  # ignored
    for reduction in ("mean", "sum"):
        fused = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk=8)
        plain = F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)
        torch.testing.assert_close(fused, plain)
        g_fused = torch.autograd.grad(fused * 3, (hidden, weight))
        g_plain = torch.autograd.grad(plain * 3, (hidden, weight))
        for a, b in zip(g_fused, g_plain):
            torch.testing.assert_close(a, b)


def test_fused_loss_backward_runs_once_and_says_so_when_asked_twice():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 11, (6,)))
    loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice on one graph"):
        loss.backward()
    assert torch.equal(hidden.grad, first)  # the failed second pass added nothing


def test_memorises_a_sequence():
    torch.manual_seed(1)
    model = Andromeda.from_config(TINY)
    tokens = torch.randint(0, TINY.num_tokens, (1, 48))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    with torch.no_grad():
        predicted = model.Andromeda(tokens[:, :-1]).argmax(-1)
    assert torch.equal(predicted, tokens[:, 1:])


@pytest.mark.parametrize("tokens, error, words", [
    (torch.randn(1, 16), TypeError, "token ids must be integers"),
    (torch.zeros(1, 16, dtype=torch.bool), TypeError, "token ids must be integers"),
    (torch.full((1, 16), 258), ValueError, r"token id 258 is out of range \[0, 258\)"),
    (torch.full((1, 16), -1), ValueError, "token id -1 is out of range"),
    (torch.zeros(16, dtype=torch.long), ValueError, r"shape \(batch, seq\)"),
    (torch.zeros(1, 2, 16, dtype=torch.long), ValueError, r"shape \(batch, seq\)"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "non-empty"),
    (torch.zeros(1, 161, dtype=torch.long), ValueError, "sequence length 161 exceeds the limit 160"),
    ([1, 2, 3], TypeError, "torch.Tensor"),
])
def test_bad_tokens_are_rejected_with_a_clear_error(tokens, error, words):
    # Learned absolute positions end at max_seq_len; relative ones read past it (test_long_context.py).
    model = Andromeda.from_config(TINY.replace(use_abs_pos_emb=True))
    with pytest.raises(error, match=words):
        model.Andromeda(tokens)


def test_loss_input_limits():
    model = Andromeda.from_config(TINY.replace(use_abs_pos_emb=True))  # where the positions end
    model(torch.zeros(1, 161, dtype=torch.long))  # 160 inputs predicting 160 targets: allowed
    with pytest.raises(ValueError, match="exceeds the limit 161"):
        model(torch.zeros(1, 162, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        model(torch.randn(1, 16))


def test_seed_example_with_integer_ids_at_small_scale():
    """The seed's example, shrunk: integer ids of the full max_seq_len give a finite loss."""
    model = Andromeda(num_tokens=1000, max_seq_len=256, dim=64, depth=2, dim_head=16, heads=6,
                      alibi_num_heads=3)
    loss = model(torch.randint(0, 1000, (1, 256)))
    # Freshly initialised (std 0.02), the model predicts nearly uniformly over the 1000 ids.
    assert loss.ndim == 0 and loss.item() == pytest.approx(math.log(1000), rel=0.02)
    assert model.Andromeda(torch.randint(0, 1000, (1, 256))).shape == (1, 256, 1000)


def test_load_rejects_a_different_rotary_setting():
    model = Andromeda.from_config(TINY)
    with pytest.raises(ValueError, match="rotary"):
        model.load_x_transformers(x_transformers_model(TINY.replace(rotary_xpos=False)).state_dict())


def test_building_the_x_transformers_peer_without_it_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "x_transformers", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"needs x-transformers: pip install -e '\.\[test\]'"):
        build_x_transformers(TINY)


class CountingLinear(torch.nn.Linear):
    """An nn.Linear subclass that counts its calls: what a quantized or LoRA layer looks like to
    the model. Any code that reads `.weight` around the module instead of calling it misses it."""

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def with_counting_linears(net):
    """Every nn.Linear of `net` replaced by a CountingLinear holding the same parameters."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                counting = CountingLinear.__new__(CountingLinear)
                counting.__dict__.update(child.__dict__)
                counting.calls = 0
                setattr(module, name, counting)
    return [m for m in net.modules() if isinstance(m, CountingLinear)]


def test_every_weight_product_goes_through_its_module(tmp_path):
    """Forward, the training loss and its gradients, cached generation and evaluation all call
    each Linear module (the fused feed-forward and loss fall back to module calls for anything but
    a plain nn.Linear), and compute the same numbers as the fused paths."""
    from andromeda.evaluation import evaluate
    from andromeda.inference.generate import generate

    torch.manual_seed(0)
    plain = Andromeda.from_config(TINY).Andromeda
    swapped = Andromeda.from_config(TINY).Andromeda
    swapped.load_state_dict(plain.state_dict())
    linears = with_counting_linears(swapped)
    assert len(linears) == 4 * TINY.depth + 1  # to_qkv, to_out, proj_in, proj_out per block; to_logits
    tokens = torch.randint(0, TINY.num_tokens, (2, 40))

    def calls_during(fn):
        for linear in linears:
            linear.calls = 0
        result = fn()
        assert all(linear.calls > 0 for linear in linears), [type(m).__name__ for m in linears if not m.calls]
        return result

    with torch.no_grad():
        torch.testing.assert_close(calls_during(lambda: swapped(tokens)), plain(tokens))
    loss = calls_during(lambda: swapped(tokens[:, :-1], targets=tokens[:, 1:]))
    expected = plain(tokens[:, :-1], targets=tokens[:, 1:])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    expected.backward()
    for (name, a), b in zip(swapped.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    new = calls_during(lambda: generate(swapped, tokens[:, :8], 6, temperature=0))
    assert torch.equal(new, generate(plain, tokens[:, :8], 6, temperature=0))
    ids = tokens.flatten().numpy()
    result = calls_during(lambda: evaluate(swapped, ids, 16, 2, num_bytes=len(ids)))
    assert result["loss"] == pytest.approx(evaluate(plain, ids, 16, 2, num_bytes=len(ids))["loss"], rel=1e-6)


def test_bf16_decode_after_a_long_prefill_is_as_accurate_as_the_bf16_forward():
    """The decode step adds ALiBi as an explicit bias in the compute dtype; past |16| bf16 moves in
    steps of 0.125. Pinned: at 4k positions, with ALiBi on every head, the bf16 decode step's
    next-token logits stray from fp32 no more than 1.5x the bf16 full forward's do."""
    from andromeda import KVCache

    config = TINY.replace(max_seq_len=4096, alibi_num_heads=TINY.heads)
    torch.manual_seed(0)
    net = Andromeda.from_config(config).Andromeda.eval()
    half = Andromeda.from_config(config, dtype=torch.bfloat16).Andromeda.eval()
    half.load_state_dict(net.state_dict())
    tokens = torch.randint(0, config.num_tokens, (1, 4096))
    with torch.no_grad():
        exact = net(tokens, logits_to_keep=1)[0, -1]
        full = half(tokens, logits_to_keep=1)[0, -1].float()
        cache = KVCache(config, 1, 4096, dtype=torch.bfloat16, device="cpu")
        half(tokens[:, :-1], cache=cache, logits_to_keep=1)
        decoded = half(tokens[:, -1:], cache=cache, logits_to_keep=1)[0, -1].float()
    full_error, decode_error = (full - exact).abs().max(), (decoded - exact).abs().max()
    assert 0 < full_error < 0.1
    assert decode_error <= 1.5 * full_error, (float(decode_error), float(full_error))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_equals_f_normalize_and_keeps_the_dtype_under_autocast(dtype, device):
    x = torch.randn(2, 4, 16, 128, dtype=dtype, device=device)
    x[0, 0, 0] = 0  # the eps floor: zeros stay zeros
    assert torch.equal(attention_module.l2_normalize(x), F.normalize(x, dim=-1))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        # CUDA autocast runs F.normalize's norm in fp32 and returns fp32; this stays bf16.
        out = attention_module.l2_normalize(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.normalize(x.bfloat16(), dim=-1))


def test_a_weight_gradient_of_one_product_is_never_summed_in_float32():
    """One product (one group of rows) stays in its bf16 buffer, with no float32 (C, V) sum made:
    the scaling pass writes it back in float32, the product's float32 value times the scale."""
    from andromeda.model import loss

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 70, generator=generator)
    grad = torch.randn(40, 300, generator=generator).bfloat16()
    rows = torch.randn(40, 70, generator=generator).bfloat16()
    summed = loss._WeightGradient(weight, torch.float32, torch.bfloat16, transposed=True)
    summed.add(grad, rows, first=True)
    summed.release()
    assert summed.sum is None and summed.block is None and summed.product is not None
    scale = torch.tensor(0.37)
    out = summed.scaled(scale, torch.float32)
    assert torch.equal(out, (rows.T.contiguous() @ grad).float().T * scale)


@pytest.mark.parametrize("autocast", [False, True])
def test_a_loss_over_no_rows_gives_zero_gradients(autocast):
    """No rows (every product skipped): the loss 0 and both gradients zeros, in the weight's layout
    and dtype (the bf16 CPU path sums transposed; it used to hand back an uninitialised buffer)."""
    hidden = torch.zeros(0, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    value.backward()
    assert value.item() == 0.0
    assert weight.grad.shape == weight.shape and weight.grad.dtype == weight.dtype
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and hidden.grad.shape == (0, 16)


def test_the_kernel_path_takes_each_product_once_per_group_of_chunks(monkeypatch):
    """With the CPU softmax kernel the loss takes LOSS_GROUP_BYTES of logits rows a pass (here groups
    of 2 chunks, and a short last one of a chunk and a part), each product once per group: the loss
    (summed a chunk at a time however many rows a pass takes) and the hidden gradient are the
    per-chunk path's bit for bit, the weight gradient the float64 one to bf16 rounding."""
    from andromeda.model import loss
    from andromeda.train.loss_kernel import loss_kernel, unavailable_reason

    if unavailable_reason() is not None:
        pytest.skip(f"loss kernel: {unavailable_reason()}")
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(232, 64, generator=generator)  # 3 groups of 64 rows and one of 40
    weight = torch.randn(300, 64, generator=generator) * 0.2
    targets = torch.randint(0, 300, (232,), generator=generator)
    targets[::9] = -100
    sizes, add = [], loss._WeightGradient.add

    def counted_add(self, grad, h, *, first):
        sizes.append((grad.shape[0], h.shape[0], first))
        return add(self, grad, h, first=first)

    monkeypatch.setattr(loss._WeightGradient, "add", counted_add)
    products, matmul_into = {}, loss._matmul_into

    def counted_matmul_into(out, a, b):  # the logits' and the hidden gradient's products: their rows
        products[name].append(out.shape[0])
        return matmul_into(out, a, b)

    monkeypatch.setattr(loss, "_matmul_into", counted_matmul_into)
    kernel = loss_kernel()

    def order_sensitive(logits, targets, row_weight):
        # The kernel's per-row losses, +-2**24 on alternate rows (the same rows of the same total
        # either way): float32 sums of these give the same bits only when summed in the same order.
        losses = kernel(logits, targets, row_weight)
        return losses + torch.tensor([2.0**24, -2.0**24]).repeat(len(losses) // 2 + 1)[: len(losses)]

    results = {}
    for name, group_bytes in (("chunks", 0), ("groups", 64 * 300 * 2)):
        products[name] = []
        monkeypatch.setattr(loss, "LOSS_GROUP_BYTES", group_bytes)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = linear_cross_entropy(h, w, targets, "mean", 32, kernel)
            summed = linear_cross_entropy(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets,
                                          "sum", 32, order_sensitive).detach()  # a pass with gradients: grouped
        value.backward()
        results[name] = (value.detach(), h.grad, w.grad, summed)
    by_chunk = [(32, 32, True)] + [(32, 32, False)] * 6 + [(8, 8, False)]  # weight-gradient products
    by_group = [(64, 64, True), (64, 64, False), (64, 64, False), (40, 40, False)]
    assert sizes == by_chunk * 2 + by_group * 2  # two losses a mode
    assert products == {"chunks": ([32] * 14 + [8] * 2) * 2, "groups": ([64] * 6 + [40] * 2) * 2}
    for index in (0, 1, 3):
        assert torch.equal(results["groups"][index], results["chunks"][index]), index
    hb, wb, ok = hidden.bfloat16().double(), weight.bfloat16().double(), targets != -100
    probabilities = torch.softmax(hb @ wb.T, dim=-1)
    probabilities[ok.nonzero()[:, 0], targets[ok]] -= 1
    exact = (probabilities * ok[:, None] / ok.sum()).T @ hb
    for name in results:
        assert (results[name][2].double() - exact).norm() / exact.norm() < 4e-3, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [None, 7])
def test_a_weight_gradient_summed_transposed_comes_back_in_the_weights_layout(dtype, block_rows, monkeypatch):
    """bf16 products on the CPU sum the logits' weight gradient as (C, V), each chunk's product
    added through a float32 buffer of a few rows, and write it back as (V, C) in blocks of rows:
    the same numbers as whole-tensor adds and one transposed pass, and the plain (V, C) sum's to the
    products' rounding, over widths that are not multiples of the blocks."""
    from andromeda.model import fused, loss

    vocab, width = 300, 2 * fused.TRANSPOSE_BLOCK + 22
    monkeypatch.setattr(fused, "BLOCKS_MIN", 1)  # the write-back in blocks, as at a real model's size
    if block_rows is not None:  # several blocks of 7 rows and a short last one, not one block
        monkeypatch.setattr(loss, "ADD_BLOCK_BYTES", block_rows * vocab * 4)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, width, generator=generator)
    sums = {layout: loss._WeightGradient(weight, torch.float32, torch.bfloat16, transposed=layout)
            for layout in (False, True)}
    assert sums[True].block.shape[0] == (block_rows or width)
    expected_sum = torch.zeros(width, vocab)
    for i in range(3):  # three chunks of rows
        grad = torch.randn(40, vocab, generator=generator).bfloat16()
        rows = torch.randn(40, width, generator=generator).bfloat16()
        for s in sums.values():
            s.add(grad, rows, first=i == 0)
        expected_sum += (rows.T.contiguous() @ grad).float()
    assert torch.equal(sums[True].sum, expected_sum)
    scale = torch.tensor(0.37)
    out = sums[True].scaled(scale, dtype)
    assert out.shape == weight.shape and out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, (expected_sum.T * scale).to(dtype))
    torch.testing.assert_close(out.float(), sums[False].scaled(scale, torch.float32), rtol=2e-2, atol=2e-2)
