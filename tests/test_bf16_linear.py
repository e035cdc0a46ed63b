"""`inference.bf16_linear`: bf16 Linears whose decoding products go through the rows kernel
(`native.bf16_rows`), against PyTorch's float32 product, F.linear, a plain model, and compiled."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from andromeda.inference import native, packed
from andromeda.inference.bf16_linear import DECODE_ROWS, Bf16RowsLinear, use_bf16_rows
from andromeda.inference.generate import generate
from andromeda.inference.packed import PackedLinear, prepare_bf16, rows_kernel_preferred
from helpers import random_net

pytestmark = pytest.mark.skipif(not native.bf16_rows_kernel(),
                                reason="the bf16 rows kernel does not run here (AVX-512 BF16, the ops library)")


# one activation row reads tiles of 4 alone; more read pairs of tiles, 2 activation rows a pass (a
# last tile alone, a pair whose second tile is partial, an odd last row)
@pytest.mark.parametrize("M, K, N", [(1, 32, 7), (3, 2560, 258), (5, 96, 64), (17, 128, 33), (2, 64, 7), (3, 96, 13)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_is_the_float32_product_of_bf16_rows(M, K, N, bias, dtype):
    """Float32 results to float32 rounding of the sums; bf16 results the float32 one rounded (a
    last-place step apart where the sums' order tips the rounding)."""
    generator = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=generator).to(dtype)
    weight = torch.randn(N, K, generator=generator).bfloat16()
    b = torch.randn(N, generator=generator) if bias else None
    tiles = native.to_row_tiles(weight)
    got = native.bf16_rows(x, tiles, N, b)
    expected = native.bf16_rows_reference(x, tiles, N, b)
    assert got.dtype == expected.dtype == dtype and got.shape == (M, N)
    exact = F.linear(x.bfloat16().double(), weight.double(), None if b is None else b.double())
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4 * exact.abs().max().item())
    else:
        step = exact.abs().clamp_min(1e-3) * 2**-7  # one bf16 step
        assert ((got.double() - exact).abs() <= step).all()


def test_the_ops_registrations_hold():
    x, tiles = torch.randn(3, 64).bfloat16(), native.to_row_tiles(torch.randn(40, 64).bfloat16())
    torch.library.opcheck(torch.ops.andromeda.bf16_rows.default, (x, tiles, 40, None))
    torch.library.opcheck(torch.ops.andromeda.bf16_rows.default, (x.float(), tiles, 39, torch.randn(39)))


def test_bad_weights_are_refused_with_the_expected_form():
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(ValueError, match="bf16 weight"):
        native.bf16_rows(x, torch.randn(8, 64), 8, None)
    with pytest.raises(ValueError, match="12 rows for 9 rows"):
        native.bf16_rows(x, native.to_row_tiles(torch.randn(8, 64).bfloat16()), 9, None)
    with pytest.raises(RuntimeError, match="K=48"):
        native.bf16_rows(x[:, :48], torch.randn(8, 48).bfloat16(), 8, None)
    with pytest.raises(RuntimeError, match="x of shape"):
        native.bf16_rows(x, torch.randn(8, 32).bfloat16(), 8, None)


def layer(bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(96, 40, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.bias.normal_() if bias else None
    return linear


class Counting:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = native.bf16_rows

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(native, "bf16_rows", counted)


@pytest.mark.parametrize("bias", [True, False])
def test_module_sends_decoding_rows_to_the_kernel_and_the_rest_to_f_linear(bias, monkeypatch):
    plain = layer(bias)
    rows = Bf16RowsLinear.from_linear(plain)
    assert torch.equal(rows.dense_weight(), plain.weight) and rows.dense_weight().data_ptr() != plain.weight.data_ptr()
    counting = Counting(monkeypatch)
    with torch.no_grad():
        few = torch.randn(2, 3, 96).bfloat16()  # 6 rows: the kernel
        torch.testing.assert_close(rows(few), plain(few), rtol=2**-7, atol=1e-2)
        assert counting.calls == 1
        many = torch.randn(DECODE_ROWS + 1, 96).bfloat16()  # a prefill: F.linear, bit for bit
        assert torch.equal(rows(many), plain(many))
        assert counting.calls == 1
    x = torch.randn(2, 96).bfloat16().requires_grad_()  # gradients wanted by x: F.linear, they flow
    rows(x).sum().backward()
    expected = x.detach().requires_grad_()
    plain(expected).sum().backward()
    assert counting.calls == 1 and torch.equal(x.grad, expected.grad)


def test_many_rows_go_a_slab_at_a_time_as_f_linear(monkeypatch):
    """A prefill reads the weight back from its tiles a slab of ~4 MB at a time: F.linear's result."""
    from andromeda.inference import quantized_linear

    monkeypatch.setattr(quantized_linear, "DEQUANT_WEIGHTS", 64 * 96)  # slabs of 64 rows: 3 of them here
    torch.manual_seed(3)
    plain = nn.Linear(96, 150, dtype=torch.bfloat16)
    rows = Bf16RowsLinear.from_linear(plain)
    x = torch.randn(2, 20, 96).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(rows(x), plain(x), rtol=0, atol=0)
        assert torch.equal(rows.float()(x.float()), plain.float()(x.float()))  # other dtypes: the same path


def test_state_dict_copies_and_unpacking_give_the_plain_layer():
    from andromeda.inference.packed import inference_only_modules, unpack

    plain = layer(bias=True)
    rows = Bf16RowsLinear.from_linear(plain)
    state = rows.state_dict()
    assert list(state) == ["weight", "bias"] and torch.equal(state["weight"], plain.weight)
    other = Bf16RowsLinear.from_linear(layer(bias=True, seed=1))
    other.load_state_dict(state)
    assert torch.equal(other.dense_weight(), plain.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict({"weight": torch.zeros(41, 96, dtype=torch.bfloat16), "bias": state["bias"]})
    assert torch.equal(other.dense_weight(), plain.weight)  # a refused load changes nothing
    assert torch.equal(copy.deepcopy(rows).dense_weight(), plain.weight)
    net = nn.Sequential(rows)
    assert inference_only_modules(net) == ["0"]
    unpack(net, row_tiles=False)
    assert net[0] is rows
    unpack(net)
    assert type(net[0]) is nn.Linear and torch.equal(net[0].weight, plain.weight) and torch.equal(net[0].bias, plain.bias)


def test_a_model_decodes_through_the_kernel_as_the_plain_model_does(monkeypatch):
    """Every Linear swapped, its weight in row tiles: the state dict is the plain model's, copies
    and pickles work, logits agree to bf16 rounding, greedy tokens are the plain model's, and the
    compiled decode step gives the eager one's tokens."""
    plain = random_net(dtype=torch.bfloat16).eval()
    net = copy.deepcopy(plain)
    linears = sum(type(m) is nn.Linear for m in net.modules())
    assert use_bf16_rows(net) == linears > 0
    assert not any(type(m) is nn.Linear for m in net.modules())
    assert net.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), plain.state_dict().values()))
    assert isinstance(pickle.loads(pickle.dumps(net)).to_logits, Bf16RowsLinear)
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad(), monkeypatch.context() as patch:
        counting = Counting(patch)
        got = net(tokens[:, :1])
        assert counting.calls == linears
        torch.testing.assert_close(got.float(), plain(tokens[:, :1]).float(), rtol=0.02, atol=0.05)
    expected = generate(plain, tokens[:, :4], 16, temperature=0)
    assert torch.equal(generate(net, tokens[:, :4], 16, temperature=0), expected)
    assert torch.equal(generate(net, tokens[:, :4], 16, temperature=0, compile=True), expected)


def without_amx(monkeypatch):
    """As on a CPU without AMX tiles, where the rows kernel beats oneDNN (`rows_kernel_preferred`)."""
    monkeypatch.setattr(packed, "_amx_tiles", lambda: False)


def test_prepare_bf16_leaves_what_the_kernel_cannot_take_to_onednn(monkeypatch):
    """Linears with K off the kernel's 32-weight vectors stay nn.Linear for the kernel and are
    prepacked instead; fp32 models are left alone."""
    without_amx(monkeypatch)
    net = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 64)).bfloat16()
    prepare_bf16(net)
    assert isinstance(net[0], Bf16RowsLinear) and isinstance(net[1], PackedLinear)
    fp32 = nn.Sequential(nn.Linear(64, 48))
    assert use_bf16_rows(fp32) == 0 and type(prepare_bf16(fp32)[0]) is nn.Linear


def test_prepare_bf16_keeps_onednn_where_the_cpu_has_amx_tiles(monkeypatch):
    """With AMX, oneDNN's prepacked product outruns the kernel at every row count (module
    `rows_kernel_preferred`): decoding models keep it; `use_bf16_rows` still swaps when asked."""
    if not packed.packing_supported():
        pytest.skip("this torch has no oneDNN bf16 kernels: the rows kernel is preferred")
    monkeypatch.setattr(packed, "_amx_tiles", lambda: True)
    assert not rows_kernel_preferred()
    net = prepare_bf16(nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 64)).bfloat16())
    assert all(isinstance(layer, PackedLinear) for layer in net)
    assert use_bf16_rows(nn.Sequential(nn.Linear(64, 48)).bfloat16()) == 1


def test_load_for_inference_reads_bf16_weights_by_the_kernel(tmp_path, monkeypatch):
    from andromeda.checkpoint import load_for_inference, save_pretrained
    from andromeda.tokenizers import ByteTokenizer

    without_amx(monkeypatch)
    save_pretrained(random_net(), tmp_path / "ckpt", tokenizer=ByteTokenizer())
    net = load_for_inference(tmp_path / "ckpt", dtype="bf16")
    assert isinstance(net.blocks[0].attn.to_qkv, Bf16RowsLinear) and isinstance(net.to_logits, Bf16RowsLinear)


def test_a_pickled_model_runs_in_a_fresh_process_and_where_the_kernel_does_not(tmp_path, monkeypatch):
    """Unpickled in a new process (nothing registered the op yet), a Bf16RowsLinear computes what it
    did; unpickled where the kernel does not run, it takes F.linear."""
    import subprocess
    import sys

    plain = layer(bias=True)
    rows = Bf16RowsLinear.from_linear(plain)
    x = torch.randn(3, 96).bfloat16()
    with torch.no_grad():
        expected = rows(x)
    torch.save({"module": rows, "x": x}, tmp_path / "layer.pt")
    script = ("import sys, torch\n"
              "saved = torch.load(sys.argv[1], weights_only=False)\n"
              "with torch.no_grad():\n"
              "    torch.save(saved['module'](saved['x']), sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "layer.pt"), str(tmp_path / "out.pt")],
                   check=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    monkeypatch.setattr(native, "bf16_rows_kernel", lambda: False)
    elsewhere = pickle.loads(pickle.dumps(rows))
    with torch.no_grad():
        assert not elsewhere._kernel and torch.equal(elsewhere(x), plain(x))


def test_empty_input_takes_f_linear(monkeypatch):
    plain = layer(bias=True)
    rows = Bf16RowsLinear.from_linear(plain)
    assert native.bf16_rows(torch.empty(0, 96).bfloat16(), rows._tiles, 40).shape == (0, 40)  # the op takes none
    counting = Counting(monkeypatch)
    with torch.no_grad():
        assert rows(torch.empty(0, 96, dtype=torch.bfloat16)).shape == (0, 40)
    assert counting.calls == 0


def test_quantize_takes_row_tiled_layers_as_their_plain_linears():
    """A model loaded for decoding (its bf16 Linears row-tiled) quantizes to what the plain model
    quantizes to: every layer converted, none skipped, the same codes."""
    from andromeda.inference.quantize import dequantize_weight, quantization_of, quantize

    plain = random_net(dtype=torch.bfloat16).eval()
    tiled = copy.deepcopy(plain)
    assert use_bf16_rows(tiled) > 0
    assert torch.equal(dequantize_weight(tiled.to_logits), plain.to_logits.weight)
    quantize(plain, "int8")
    quantize(tiled, "int8")
    assert quantization_of(tiled) == ("int8", None)
    assert tiled.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(tiled.state_dict().values(), plain.state_dict().values()))
