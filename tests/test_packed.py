"""oneDNN-prepacked bf16 Linears: exact products, the same model and tokens, checkpoints, errors."""

import argparse
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from andromeda.config import Config
from andromeda.inference.generate import generate
from andromeda.inference.packed import (
    PackedLinear,
    can_prepack,
    inference_only_modules,
    packing_supported,
    prepack,
    unpack,
)
from andromeda.inference.quantize import quantize
from andromeda.model import build_transformer
from helpers import random_net

pytestmark = pytest.mark.skipif(not packing_supported(),
                                reason="this CPU has no oneDNN bf16 kernels "
                                       "(torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)")


def linear(in_features, out_features, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
        if bias:
            layer.bias.normal_(0.0, 0.1)
    return layer


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return build_transformer(Config.from_preset("tiny"), dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("shape", [(1, 256), (7, 256), (300, 256), (2, 5, 256), (3, 72)])
@pytest.mark.parametrize("out_features", [258, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_f_linear_bit_for_bit(shape, out_features, bias):
    """The same oneDNN kernel as the default F.linear: equal bits at one row (decoding), many rows
    (prefill), 3-D input, widths that are not multiples of 16 (258 outputs, 72 inputs)."""
    layer = linear(shape[-1], out_features, bias)
    packed = PackedLinear.from_linear(layer)
    x = torch.randn(shape, dtype=torch.bfloat16)
    with torch.no_grad():
        y = packed(x)
        assert y.shape == (*shape[:-1], out_features) and y.dtype == torch.bfloat16
        assert torch.equal(y, layer(x))
    # Other activation dtypes are rounded to bf16 and the result comes back in theirs.
    x32 = x.float() + 1e-3
    with torch.no_grad():
        assert torch.equal(packed(x32), layer(x32.bfloat16()).float())


def test_holds_no_dense_weight():
    packed = PackedLinear.from_linear(linear(256, 258))
    assert [name for name, _ in packed.named_parameters()] == []
    assert [name for name, _ in packed.named_buffers()] == ["bias"]
    assert torch.equal(packed.dense_weight(), linear(256, 258).weight)


def test_prepacked_model_gives_the_same_logits_and_tokens():
    """Bit-identical logits (every product is the one F.linear computes) and greedy tokens."""
    net = tiny_net()
    packed = prepack(copy.deepcopy(net))
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert len([m for m in packed.modules() if isinstance(m, PackedLinear)]) == 2 * 4 + 1
    tokens = torch.randint(0, 258, (2, 24))
    with torch.no_grad():
        assert torch.equal(packed(tokens), net(tokens))
    prompt = tokens[:1, :6]
    assert torch.equal(generate(packed, prompt, 16, temperature=0), generate(net, prompt, 16, temperature=0))


def test_state_dict_round_trip(tmp_path):
    """The state dict is the dense one, exactly; loading packs the loaded weights."""
    net = tiny_net()
    state = net.state_dict()
    packed = prepack(copy.deepcopy(net))
    again = packed.state_dict()
    assert list(again) == list(state)
    assert all(again[n].dtype == state[n].dtype and torch.equal(again[n], state[n]) for n in state)
    file = tmp_path / "model.safetensors"
    save_file(again, file)
    other = tiny_net(seed=1)
    packed.load_state_dict(other.state_dict())
    tokens = torch.randint(0, 258, (1, 16))
    with torch.no_grad():
        assert torch.equal(packed(tokens), other(tokens))
        packed.load_state_dict(load_file(file), assign=True)
        assert torch.equal(packed(tokens), net(tokens))
    with pytest.raises(RuntimeError, match=r"size mismatch for to_logits.weight"):
        packed.load_state_dict({**state, "to_logits.weight": torch.zeros(3, 64, dtype=torch.bfloat16)})
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "to_logits.weight"'):
        packed.load_state_dict({n: t for n, t in state.items() if n != "to_logits.weight"})


def test_copies_pickles_and_unpacks():
    net = tiny_net()
    packed = prepack(copy.deepcopy(net))
    tokens = torch.randint(0, 258, (1, 16))
    with torch.no_grad():
        expected = net(tokens)
        assert torch.equal(copy.deepcopy(packed)(tokens), expected)
        assert torch.equal(pickle.loads(pickle.dumps(packed))(tokens), expected)
        plain = unpack(packed)
        assert all(type(m) is not PackedLinear for m in plain.modules())
        assert torch.equal(plain(tokens), expected)
    assert plain.to_logits.weight.requires_grad  # trainable again


def test_inference_only_modules_are_named():
    net = tiny_net()
    assert inference_only_modules(net) == []
    prepack(net.blocks[0])
    quantize(net.blocks[1], "int8")
    assert inference_only_modules(net) == [f"blocks.{i}.{layer}" for i in (0, 1)
                                           for layer in ("attn.to_qkv", "attn.to_out", "ff.proj_in", "ff.proj_out")]


def test_fp32_model_is_refused_before_anything_changes():
    torch.manual_seed(0)
    net = build_transformer(Config.from_preset("tiny"))
    assert not can_prepack(net)
    with pytest.raises(ValueError, match=r"cannot prepack layer 'blocks.0.attn.to_qkv': its weight is "
                                         r"torch.float32; convert the model first: model.to\(torch.bfloat16\)"):
        prepack(net)
    assert not any(isinstance(m, PackedLinear) for m in net.modules())
    assert can_prepack(net.to(torch.bfloat16))
    with torch.device("meta"):
        meta = nn.Linear(8, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="meta device; load the weights first"):
        PackedLinear.from_linear(meta)


def test_gradients_and_conversions_are_refused():
    packed = PackedLinear.from_linear(linear(64, 32))
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"inference-only: its oneDNN op has no backward.*unpack\(model\)"):
        packed(x)
    with torch.no_grad():
        assert torch.equal(packed(x), F.linear(x, packed.dense_weight(), packed.bias))
    assert packed.to("cpu", torch.bfloat16) is packed  # no-ops are allowed
    with pytest.raises(ValueError, match=r"cannot become torch.float32 on cpu; call .*unpack\(model\)"):
        packed.float()
    with pytest.raises(ValueError, match=r"cannot become torch.bfloat16 on meta"):
        packed.to("meta")


def test_generate_prepacks_bf16_weights_and_gives_the_same_text(tmp_path, capsys):
    """`andromeda generate --dtype bf16` on a CPU prepares every Linear once: for the bf16 rows
    kernel where it beats oneDNN (`inference.packed.rows_kernel_preferred`), else packed for
    oneDNN (the same products as F.linear, bit for bit); its text equals generating with the plain
    bf16 model."""
    from andromeda.inference.bf16_linear import Bf16RowsLinear
    from andromeda.inference.packed import rows_kernel_preferred

    from andromeda import cli
    from andromeda.checkpoint import load_transformer, open_model_source, save_pretrained
    from andromeda.cli.common import load_from_args
    from andromeda.cli.generate import add_arguments
    from andromeda.inference.generate import stream_text
    from andromeda.tokenizers import ByteTokenizer

    tokenizer = ByteTokenizer()
    save_pretrained(random_net(), tmp_path / "ckpt", tokenizer=tokenizer)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "ckpt"), "--dtype", "bf16"])
    loaded = load_from_args(open_model_source(args.checkpoint), args, torch.device("cpu"))
    prepared = Bf16RowsLinear if rows_kernel_preferred() else PackedLinear
    assert isinstance(loaded.blocks[0].attn.to_qkv, prepared) and isinstance(loaded.to_logits, prepared)
    plain = load_transformer(tmp_path / "ckpt", dtype=torch.bfloat16)
    expected = "To be" + "".join(stream_text(plain, tokenizer, "To be", 24, temperature=0))
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--dtype", "bf16", "--prompt", "To be",
                     "--max-new-tokens", "24", "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"
