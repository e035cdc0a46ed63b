"""The transpose kernel (`train.transpose_kernel`): the weight gradients' transposed copies of bf16
training on the CPU, bit-equal to `model.fused.transposed`'s PyTorch ops."""

import pytest
import torch

from andromeda.config import Config
from andromeda.model import Transformer, build_transformer, fused
from andromeda.train import transpose_kernel as transpose_kernel_module
from andromeda.train.transpose_kernel import transpose_kernel, transposed_by_kernel, unavailable_reason, use_transpose_kernel
from helpers import Counted, tiny_train_config

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"transpose kernel: {unavailable_reason()}")

DTYPES = [torch.float32, torch.bfloat16]


def by_ops(src, dtype, scale=None):
    """`fused.transposed` without a kernel: PyTorch's ops."""
    return fused.transposed(src, dtype, scale)


@pytest.mark.parametrize("shape", [(1, 1), (15, 17), (16, 16), (64, 64), (130, 70), (300, 47), (33, 260)])
@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True])
def test_the_kernel_writes_what_the_ops_write(shape, src_dtype, dtype, scaled):
    """Over shapes with partial 16 x 16 tiles and 64 x 64 blocks, each dtype pair, with and without a
    scale: the same bits as PyTorch's ops (src.T converted, times the scale in float32)."""
    generator = torch.Generator().manual_seed(sum(shape))
    src = (torch.randn(shape, generator=generator) * 3).to(src_dtype)
    scale = torch.tensor(0.37) if scaled else None
    out = transposed_by_kernel(src, dtype, scale)
    assert out.shape == shape[::-1] and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, by_ops(src, dtype, scale))
    expected = src.T.float() * scale if scaled else src.T.float()
    assert torch.equal(out, expected.to(dtype))


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_convert_as_pytorch_converts(src_dtype, dtype):
    """Infinities, signed zeros, float32 values between bf16 steps (ties to even) and denormals come
    out with PyTorch's bits; NaN stays NaN."""
    tiny = torch.finfo(torch.float32).tiny
    values = torch.tensor([float("inf"), -float("inf"), -0.0, 0.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20,
                           tiny / 3, -tiny / 5, tiny * 0.75, float("nan"), 65504.0, 3e38, -1e-30, 7.0, 1.0])
    src = values.repeat(19, 3)[:, :47].to(src_dtype)  # tails in both directions
    out, expected = transposed_by_kernel(src, dtype), by_ops(src, dtype)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(out.view(bits)[~nan], expected.view(bits)[~nan])


def test_rows_at_a_stride_and_a_transposed_view_give_the_contiguous_results():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(70, 90, generator=generator).bfloat16()
    strided_rows = base[3:60, 5:80]  # row stride 90 for 75 columns
    assert torch.equal(transposed_by_kernel(strided_rows, torch.float32), strided_rows.contiguous().T.float())
    view = base.T  # columns at a stride: made contiguous first
    assert torch.equal(transposed_by_kernel(view, torch.bfloat16), base)
    broadcast = base[:1].expand(30, 90)  # rows at stride 0 (a gradient broadcast over rows): copied first
    assert torch.equal(transposed_by_kernel(broadcast, torch.float32), broadcast.T.float())


def test_two_threads_write_what_one_writes():
    generator = torch.Generator().manual_seed(2)
    src = torch.randn(1000, 333, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = transposed_by_kernel(src, torch.bfloat16, torch.tensor(1.5))
        torch.set_num_threads(2)
        two = transposed_by_kernel(src, torch.bfloat16, torch.tensor(1.5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_empty_and_wrong_inputs():
    assert transposed_by_kernel(torch.empty(0, 5), torch.bfloat16).shape == (5, 0)
    with pytest.raises(ValueError, match="2-D float32 or bf16 CPU tensor"):
        transposed_by_kernel(torch.zeros(2, 3, 4), torch.float32)
    with pytest.raises(ValueError, match="float64"):
        transposed_by_kernel(torch.zeros(2, 3, dtype=torch.float64), torch.float32)
    with pytest.raises(ValueError, match="into torch.float16"):
        transposed_by_kernel(torch.zeros(2, 3), torch.float16)
    with pytest.raises(ValueError, match="one number"):
        transposed_by_kernel(torch.zeros(2, 3), torch.float32, torch.ones(2))


def test_transposed_takes_the_kernel_only_for_its_tensors():
    """`fused.transposed` hands float32 and bf16 CPU matrices to its kernel, and anything else (float64
    here) to PyTorch's ops."""
    counted = Counted(transposed_by_kernel)
    src = torch.randn(20, 30)
    assert torch.equal(fused.transposed(src, torch.bfloat16, kernel=counted), src.T.bfloat16())
    assert counted.calls == 1
    assert torch.equal(fused.transposed(src.double(), torch.float64, kernel=counted), src.double().T)
    assert counted.calls == 1


def model_step(model, tokens):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_a_model_given_the_kernel_computes_the_same_step(monkeypatch):
    """`use_transpose_kernel` gives every Transformer the kernel; a bf16 step through every path that
    transposes (the feed-forward's W1 and W2, the attention's projections, the loss) gives the loss
    and gradients of the step without it, bit for bit, with the kernel called for each."""
    monkeypatch.setattr(fused, "BLOCKS_MIN", 1)  # W1's transposed form, as at a real model's size
    monkeypatch.setattr(fused, "CONTIGUOUS_FIRST_MIN", 1)  # the projections' own backward too
    config = Config.from_preset("tiny", max_seq_len=64)
    torch.manual_seed(0)
    model = build_transformer(config)
    tokens = torch.randint(0, config.num_tokens, (2, 41))
    plain = model_step(model, tokens)
    assert use_transpose_kernel(model)
    assert all(m.transpose is transposed_by_kernel for m in model.modules() if isinstance(m, Transformer))
    counted = model.transpose = Counted(transposed_by_kernel)
    with_kernel = model_step(model, tokens)
    # per block: W2's dy, W1's x and product, both projections' dy; the loss: its rows, the write-back
    assert counted.calls == 5 * config.depth + 2
    assert torch.equal(with_kernel[0], plain[0])
    for name, grad in plain[1].items():
        assert torch.equal(with_kernel[1][name], grad), name


def test_a_bf16_training_run_on_the_cpu_uses_the_kernel(tmp_path, corpus, monkeypatch):
    """`train` hands the kernel to its model, and a --bf16 run's steps go through it, learning as
    they do."""
    from andromeda.train import train

    counted = Counted(transposed_by_kernel)
    monkeypatch.setattr(transpose_kernel_module, "transpose_kernel", lambda: counted)
    result = train(tiny_train_config(tmp_path, corpus, bf16=True, eval_every=100, max_steps=4))
    assert result.step == 4 and result.train_loss is not None and result.train_loss < 5.0
    assert counted.calls >= 4 * 3  # each step: the feed-forwards' dy and the loss's rows and write-back


def test_the_kernel_is_given_where_it_runs():
    assert transpose_kernel() is transposed_by_kernel
