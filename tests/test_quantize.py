"""Weight-only int8/int4 quantization: the stored codes, the kernels, the model, checkpoints, errors."""

import copy
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from andromeda import Andromeda, Config
from andromeda.inference import native
from andromeda.inference import quantize as Q
from andromeda.inference.quantize import (
    Int4Linear,
    Int8Linear,
    build_quantized_transformer,
    dequantize_weight,
    load_quantized_transformer,
    quantize,
    quantized_state_dict_shapes,
)

# fp32 arithmetic in w / scale and (q - 8) * scale + zero: a few units in the last place of the
# scale, far below the half step the bound is about.
FP32_SLACK = 2**-20


def linear(in_features, out_features, bias=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
        layer.weight[3] *= 10  # one row with outliers, one constant group, one all-zero row
        layer.weight[5, :128] = 0.0125
        layer.weight[7] = 0.0
        if bias:
            layer.bias.normal_(0.0, 0.1)
    return layer.to(dtype)


def quantized(layer, scheme, group_size=32):
    return Int8Linear.from_linear(layer) if scheme == "int8" else Int4Linear.from_linear(layer, group_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_codes_within_half_a_step(dtype):
    layer = linear(256, 96, dtype=dtype)
    module = Int8Linear.from_linear(layer)
    w, deq = layer.weight.float(), dequantize_weight(module).float()
    scales = module.scales.float()[:, None]  # (N, 1)
    assert module.weight.dtype == torch.int8 and module.weight.abs().max() <= 127
    assert ((w - deq).abs() <= scales / 2 * (1 + FP32_SLACK)).all()
    assert torch.equal(deq[7], torch.zeros(256))  # an all-zero row stays zero
    # The scale is the smallest of its dtype that reaches the row's largest weight with code 127.
    amax = w.abs().amax(dim=1).double()
    below = torch.nextafter(module.scales, torch.tensor(0.0, dtype=dtype)).double()
    rows = amax > 0
    assert (module.scales.double() * 127 >= amax * (1 - FP32_SLACK)).all()
    assert (below[rows] * 127 < amax[rows]).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_codes_within_half_a_step(group_size, dtype):
    layer = linear(256, 96, dtype=dtype)
    module = Int4Linear.from_linear(layer, group_size)
    weight, scales, zeros = module.plain()
    assert weight.shape == (96, 128) and scales.shape == zeros.shape == (96, 256 // group_size)
    w, deq = layer.weight.float(), dequantize_weight(module).float()
    step = scales.float().repeat_interleave(group_size, dim=1)  # (N, K): each weight's scale
    assert ((w - deq).abs() <= step / 2 * (1 + FP32_SLACK)).all()
    assert torch.equal(deq[5, :128], w[5, :128])  # a constant group is exact


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, Q.INT8_KERNEL_ROWS + 1, Q.INT4_KERNEL_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_linear_with_the_dequantized_weight(scheme, rows, bias):
    """Both paths (packed kernel for few rows, dequantized slabs for many), 3-D input, widths
    that are not a multiple of ATen's int4 row block (200) nor of 16 (258)."""
    for out_features in (200, 258):
        layer = linear(128, out_features, bias=bias)
        module = quantized(layer, scheme)
        x = torch.randn(2, rows, 128, dtype=torch.bfloat16)
        w = dequantize_weight(module).float()
        b = None if not bias else module.bias.float()
        y = module(x)
        ref = F.linear(x.float(), w, b)
        assert y.dtype == torch.bfloat16 and y.shape == (2, rows, out_features)
        # bf16 products and output: a few roundings of 2^-9 relative, to the magnitudes summed.
        bound = 2**-6 * (F.linear(x.float().abs(), w.abs()) + (0 if b is None else b.abs()))
        assert ((y.float() - ref).abs() <= bound).all()


def test_int8_width_the_kernel_cannot_take():
    """K = 72 is not a multiple of 16: torch 2.13's int8 kernel returns garbage there."""
    module = Int8Linear.from_linear(linear(72, 64))
    x = torch.randn(1, 72, dtype=torch.bfloat16)
    ref = F.linear(x.float(), dequantize_weight(module), module.bias.float())
    assert torch.allclose(module(x).float(), ref, rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_output_dtype_follows_input(scheme):
    module = quantized(linear(64, 48), scheme)
    x = torch.randn(3, 64)
    y = module(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y, module(x.bfloat16()).float(), rtol=0, atol=1e-2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_activations_off_alignment(scheme):
    """A view starting mid-vector (torch 2.13's int8 kernel would crash on it) gives the same
    result as an aligned copy."""
    module = quantized(linear(64, 48), scheme)
    buffer = torch.randn(2 * 64 + 1, dtype=torch.bfloat16)
    x = buffer[1:].view(2, 64)  # 2 bytes past an aligned start
    assert x.data_ptr() % 32 and torch.equal(module(x), module(x.clone()))


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func.overloadpacket), out.numel() if isinstance(out, torch.Tensor) else 0))
        return out


@pytest.mark.parametrize("scheme, kernel", [("int8", "_weight_int8pack_mm"),
                                            ("int4", "_weight_int4pack_mm_for_cpu")])
def test_decoding_step_runs_the_packed_kernel(scheme, kernel):
    """One row: the packed kernel runs and no tensor the size of the weight is made (a path that
    dequantized the whole weight per call would be slower than bf16)."""
    module = quantized(linear(512, 256), scheme)
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    with torch.inference_mode(), OpRecorder() as recorder:
        module(x)
    names = [name for name, _ in recorder.calls]
    assert f"aten.{kernel}" in names
    assert max(numel for _, numel in recorder.calls) < 256 * 512 // 8


# Skipped only where the machine cannot run them (no VNNI, no compiler); a failed build fails.
NO_VNNI = native.unavailable_reason()
needs_vnni = pytest.mark.skipif(NO_VNNI is not None and not NO_VNNI.startswith("building"),
                                reason=f"VNNI kernels: {NO_VNNI}")


@needs_vnni
def test_vnni_kernels_build_where_the_cpu_has_vnni():
    assert native.unavailable_reason() is None and native.kernels() is not None


@needs_vnni
def test_int8_vnni_kernel_agrees_with_its_pytorch_reference():
    """The C kernel against `int8_rows_reference` (the same arithmetic in PyTorch, float64 sums):
    equal to float32 rounding, for 1..16 rows (in passes of 2, and a part pass) and a width that is
    not a multiple of its 8-row tiles. The kernel reads the row tiles; a plain weight is refused."""
    torch.manual_seed(0)
    N, K = 203, 320
    weight = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    tiles, sums = native.to_row_tiles(weight, tile=native.INT8_TILE_ROWS), native.int8_row_sums(weight)
    scale = torch.rand(N) * 0.01
    for rows in (1, 3, 6, 16):
        x = torch.randn(rows, K)
        x[0, :5] *= 40  # an outlier sets row 0's scale
        y = native.int8_rows(x, tiles, scale, sums)
        ref = native.int8_rows_reference(x, weight, scale)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    zero = native.int8_rows(torch.zeros(2, K), tiles, scale, sums)
    assert torch.equal(zero, torch.zeros(2, N))  # all-zero rows: scale 1, codes 0
    with pytest.raises(ValueError, match="208 rows( of 320)? for 203 rows"):
        native.int8_rows(torch.zeros(2, K), weight, scale, sums)


@needs_vnni
@pytest.mark.parametrize("in_features", [128, 192])
def test_int8_packed_for_decoding_quantizes_each_row_alone(in_features):
    """After `pack_for_decoding`, up to DECODE_KERNEL_ROWS rows run the VNNI kernel: each row within
    its own 8-bit quantization's error of the dequantized product (half a step of peak / 127 per
    activation), bit for bit the same whatever else is in the batch; more rows keep bf16
    activations (ATen's kernel, the slabs)."""
    module = Int8Linear.from_linear(linear(in_features, 200))
    x = torch.randn(Q.DECODE_KERNEL_ROWS, in_features, dtype=torch.bfloat16)
    x[3] *= 50  # rows of very different magnitudes share a batch
    x[5] = 0.0
    assert module.pack_for_decoding()
    with torch.inference_mode(), OpRecorder() as recorder:
        y = module(x)
    assert "aten._weight_int8pack_mm" not in [name for name, _ in recorder.calls]
    w, b = dequantize_weight(module).float(), module.bias.float()
    ref = F.linear(x.float(), w, b)
    step = x.float().abs().amax(dim=1, keepdim=True) / native.ACTIVATION_STEPS  # (M, 1)
    bound = step / 2 * w.abs().sum(dim=1) + 2**-8 * (ref.abs() + 1e-3)  # + the bf16 output's rounding
    assert ((y.float() - ref).abs() <= bound).all()
    assert torch.equal(y[5], module.bias)  # a zero row: the bias alone
    for row in range(Q.DECODE_KERNEL_ROWS):
        assert torch.equal(module(x[row : row + 1])[0], y[row])
    x_many = torch.randn(Q.DECODE_KERNEL_ROWS + 1, in_features, dtype=torch.bfloat16)
    assert torch.allclose(module(x_many).float(), F.linear(x_many.float(), w, b), rtol=2**-6, atol=2**-6)
    assert not Int8Linear.from_linear(linear(72, 64)).pack_for_decoding()  # rows of whole 64-byte vectors only


@pytest.mark.parametrize("N", [1, 4, 7, 41])
def test_row_tiles_hold_the_plain_weight(N):
    """Tiles of 4 rows, each 64-byte block of a tile its rows' blocks in turn, rows past N zeros; read
    back whole or from any rows (int8's 64-value blocks and bf16's 32 alike)."""
    for dtype, per_block, tile in ((torch.bfloat16, 32, 4), (torch.int8, 64, 8), (torch.int8, 64, 4)):
        weight = torch.randint(-100, 100, (N, 3 * per_block)).to(dtype)
        tiles = native.to_row_tiles(weight, tile=tile)
        rows = native.tiled_rows(N, tile)
        assert tiles.shape == (rows, 3 * per_block) and rows % tile == 0 and rows - N < tile and tiles.is_contiguous()
        stream = tiles.view(-1, 3, tile, per_block)  # (tiles, blocks, rows, values)
        padded = torch.cat([weight, weight.new_zeros(rows - N, 3 * per_block)])
        for row in range(rows):  # row r's block b is tile r // tile's block b, at place r % tile
            assert torch.equal(stream[row // tile, 2, row % tile], padded[row, 2 * per_block:])
        assert torch.equal(native.from_row_tiles(tiles, 0, N, tile=tile), weight)
        for start, end in ((0, 1), (N // 2, N), (max(N - 3, 0), N)):
            assert torch.equal(native.from_row_tiles(tiles, start, end, tile=tile), weight[start:end])
        assert not native.from_row_tiles(tiles, N, rows, tile=tile).any()
    with pytest.raises(ValueError, match="64-byte blocks"):
        native.to_row_tiles(torch.zeros(4, 48, dtype=torch.bfloat16))


@needs_vnni
def test_int8_row_tiles_hold_the_plain_weight_everywhere_it_is_read():
    """pack_for_decoding lays an int8 weight out in row tiles of 8 (203 rows: the last tile padded);
    the state dict, dequantized(), the slabs of a prefill and a move give the plain weight back, and
    the kernel's rows agree with the plain weight's reference."""
    module = Int8Linear.from_linear(linear(128, 203))
    plain, before = module.weight.clone(), module.state_dict()
    w = dequantize_weight(module)
    assert module.pack_for_decoding() and module.pack_for_decoding()  # a second call changes nothing
    assert module.weight.shape == (native.tiled_rows(203, native.INT8_TILE_ROWS), 128)
    assert torch.equal(native.from_row_tiles(module.weight, 0, 203, tile=native.INT8_TILE_ROWS), plain)
    assert all(torch.equal(module.state_dict()[k], before[k]) for k in before)
    assert torch.equal(dequantize_weight(module), w)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = module(x).float()
        ref = native.int8_rows_reference(x.float(), plain, module.scales.float()) + module.bias.float()
        assert torch.allclose(y, ref, rtol=2**-7, atol=1e-3)
        many = torch.randn(Q.DECODE_KERNEL_ROWS + 3, 128, dtype=torch.bfloat16)
        assert torch.allclose(module(many).float(), F.linear(many.float(), w.float(), module.bias.float()),
                              rtol=2**-6, atol=2**-6)
    module.to(torch.float32)
    assert module._decode_weight is None and torch.equal(module.weight, plain)


@needs_vnni
def test_int8_decoding_state_is_dropped_when_the_weight_changes():
    """What `pack_for_decoding` derives is not in the state dict and is gone after loading other
    weights or moving the module, so it can never answer for a weight it no longer holds."""
    module = Int8Linear.from_linear(linear(64, 48))
    plain = module.state_dict()
    assert module.pack_for_decoding()
    assert module.state_dict().keys() == plain.keys()
    assert all(torch.equal(module.state_dict()[k], plain[k]) for k in plain)
    other = Int8Linear.from_linear(linear(64, 48, seed=1))
    module.load_state_dict(other.state_dict())
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert module._decode_weight is None and torch.equal(module(x), other(x))
    assert module.pack_for_decoding() and module.to(torch.float32)._decode_weight is None


@needs_vnni
@pytest.mark.parametrize("scheme, group_size", [("int8", 128), ("int4", 128)])
def test_model_packed_for_decoding_stays_near_the_weight_only_model(scheme, group_size):
    """A whole quantized model after `pack_for_decoding` (as `load_for_inference` prepares it):
    every Linear takes the kernel, and a one-token step's logits stay within 2% RMS of the same
    model without it (the 8-bit activations' whole cost), for a batch of 3 as for each row alone."""
    config = Config.from_preset("tiny").replace(dim=128, dim_head=32)
    torch.manual_seed(0)
    plain = quantize(Andromeda.from_config(config, dtype=torch.float32), scheme, group_size)
    packed = copy.deepcopy(plain)
    assert Q.pack_for_decoding(packed) == 2 * 4 + 1
    tokens = torch.randint(0, 258, (3, 1))
    with torch.no_grad():
        expected, logits = plain.Andromeda(tokens), packed.Andromeda(tokens)
        assert torch.equal(packed.Andromeda(tokens[1:2]), logits[1:2])
    assert ((logits - expected).norm() / expected.norm()).item() < 0.02


@needs_vnni
@pytest.mark.parametrize("group_size", [128, 256])
def test_int4_vnni_kernel_agrees_with_its_pytorch_reference(group_size):
    """The C kernel against `int4_rows_reference` (the same arithmetic in PyTorch, float64 sums):
    equal to float32 rounding, for 1..16 rows and a width that is not a multiple of its 4-row tiles."""
    torch.manual_seed(0)
    N, K = 203, 512
    codes = torch.randint(0, 16, (N, K))
    scales, zeros = torch.rand(N, K // group_size) * 0.02, torch.randn(N, K // group_size) * 0.01
    weight, scale_zero = native.to_kernel_layout(codes, scales, zeros)
    assert weight.shape == (204, K // 2)  # whole tiles of 4 rows
    assert not native.from_kernel_layout(weight, N, 204).any()  # zeros past N
    tile = weight[4:8].view(K // 128, 4, 64)  # rows 4..7, block by block
    assert torch.equal(tile[1, 2] & 0xF, codes[6, 128:192].to(torch.uint8))  # row 6, block 1: its low nibbles
    assert torch.equal(native.from_kernel_layout(weight, 0, N), codes)
    for start, end in ((0, 1), (5, 11), (200, 203), (7, 8)):
        assert torch.equal(native.from_kernel_layout(weight, start, end), codes[start:end])
    for rows in (1, 3, 16):
        x = torch.randn(rows, K)
        x[0, :7] *= 40  # an outlier sets row 0's scale
        y = native.int4_rows(x, weight, scale_zero, group_size)
        ref = native.int4_rows_reference(x, weight, scale_zero, group_size)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    x = torch.zeros(2, K)  # an all-zero row: scale 1, codes 0, sums 0: output 0
    assert torch.equal(native.int4_rows(x, weight, scale_zero, group_size), torch.zeros(2, N))
    with torch.profiler.profile() as profile:  # named in profiles (profile_decode counts it)
        native.int4_rows(x, weight, scale_zero, group_size)
    assert "andromeda::int4_rows" in {event.name for event in profile.events()}


@needs_vnni
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_vnni_kernel_takes_rows_of_more_groups_than_it_converts_at_once(scale_dtype):
    """The kernel turns a tile's scales into float32 64 groups at a time: rows of 81 groups (a
    whole pass and a partial one, whose last vector of 16 is partial too) agree with the reference,
    for 1 and 5 activation rows and a short last tile."""
    torch.manual_seed(0)
    N, group_size = 9, 128
    K = group_size * 81
    codes = torch.randint(0, 16, (N, K))
    scales = (torch.rand(N, K // group_size) * 0.02).to(scale_dtype)
    zeros = (torch.randn(N, K // group_size) * 0.01).to(scale_dtype)
    weight, scale_zero = native.to_kernel_layout(codes, scales, zeros)
    for rows in (1, 5):
        x = torch.randn(rows, K)
        y = native.int4_rows(x, weight, scale_zero, group_size)
        ref = native.int4_rows_reference(x, weight, scale_zero.float(), group_size)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_vnni
def test_the_kernels_c_file_builds_without_optimisation(tmp_path):
    """Intrinsics that take an immediate get a constant, not a loop variable that only -O3's
    unrolling makes constant: the C file builds at -O0 too (clang requires it at every level)."""
    flags = [flag for flag in native.FLAGS if not flag.startswith("-O")]
    result = subprocess.run([native.compiler(), "-O0", *flags, str(native.SOURCE), "-o", str(tmp_path / "k.so")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@needs_vnni
@pytest.mark.parametrize("scheme,dtype", [("int8", torch.float32), ("int4", torch.float32), ("int4", torch.float16)])
def test_packed_layers_take_many_rows_of_other_dtypes_through_their_slabs(scheme, dtype):
    """More rows than the kernels take, in float32 or float16, read the slabs back from the
    kernels' layout (dequantized in float32 for float16) and agree with the dequantized weight."""
    module = (Int8Linear.from_linear(linear(256, 72, dtype=dtype)) if scheme == "int8"
              else Int4Linear.from_linear(linear(256, 72, dtype=dtype), 128))
    assert module.pack_for_decoding()
    x = torch.randn(Q.DECODE_KERNEL_ROWS + 5, 256, dtype=dtype)
    with torch.inference_mode():
        y = module(x)
    ref = F.linear(x.float(), dequantize_weight(module).float(), module.bias.float())
    assert y.dtype == dtype and torch.allclose(y.float(), ref, rtol=2**-9, atol=2**-9 * ref.abs().max().item())


@needs_vnni
def test_int8_dequantize_reads_the_row_tiles_back_exactly():
    """The library's one-pass read of int8 row tiles (a prefill's slabs) gives the plain codes as
    float32 and bf16 exactly, for rows from a tile boundary to any end; a start inside a tile and
    other dtypes are refused."""
    torch.manual_seed(0)
    plain = torch.randint(-127, 128, (203, 192), dtype=torch.int8)
    tiles = native.to_row_tiles(plain, tile=native.INT8_TILE_ROWS)
    for start, end in ((0, 203), (8, 16), (64, 203), (200, 203), (16, 16)):
        for dtype in (torch.float32, torch.bfloat16):
            got = native.int8_dequantize(tiles, start, end, dtype)
            assert got.dtype == dtype and torch.equal(got, plain[start:end].to(dtype))
    with pytest.raises(ValueError, match="multiple of 8"):
        native.int8_dequantize(tiles, 4, 10, torch.float32)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        native.int8_dequantize(tiles, 0, 8, torch.float16)


@needs_vnni
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_dequantize_gives_each_weight_bit_for_bit(scale_dtype):
    """The library's one-pass dequantizing (a prefill's slabs) gives (q - 8) * scale + zero as
    PyTorch computes it in float32, and its rounding to bf16, bit for bit: for rows from a tile
    boundary to any end (a short last tile, none), groups of 128 and 256; a start inside a tile and
    other dtypes are refused."""
    torch.manual_seed(0)
    N, K = 203, 1024
    for group_size in (128, 256):
        codes = torch.randint(0, 16, (N, K))
        scales = (torch.rand(N, K // group_size) * 0.02).to(scale_dtype)
        zeros = (torch.randn(N, K // group_size) * 0.01).to(scale_dtype)
        weight, scale_zero = native.to_kernel_layout(codes, scales, zeros)
        expected = ((codes.float() - 8) * scales.float().repeat_interleave(group_size, dim=1)
                    + zeros.float().repeat_interleave(group_size, dim=1))
        for start, end in ((0, N), (4, 8), (64, 203), (200, 203), (8, 8)):
            for dtype in (torch.float32, torch.bfloat16):
                got = native.int4_dequantize(weight, scale_zero, group_size, start, end, dtype)
                assert got.dtype == dtype and torch.equal(got, expected[start:end].to(dtype))
                assert torch.equal(got, native.int4_dequantize_reference(weight, scale_zero, group_size, start, end,
                                                                         dtype))
    with pytest.raises(ValueError, match="multiple of 4"):
        native.int4_dequantize(weight, scale_zero, 256, 2, 10, torch.float32)
    with pytest.raises(ValueError, match="scales and zeros of shape"):  # the scales are for groups of 256
        native.int4_dequantize(weight, scale_zero, 128, 0, 4, torch.float32)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        native.int4_dequantize(weight, scale_zero, 256, 0, 4, torch.float16)


@needs_vnni
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_int4_vnni_kernel_reads_bf16_scales_as_their_float32_values(x_dtype):
    """A bf16 model's scales and zeros stay bf16 in the kernel's layout (half the bytes): the
    products are bit for bit those of the same values in float32, over 20 groups (a full and a
    partial vector of 16); float16 ones become float32, and the kernel refuses other dtypes."""
    torch.manual_seed(0)
    N, K, group_size = 37, 2560, 128
    codes = torch.randint(0, 16, (N, K))
    scales = (torch.rand(N, K // group_size) * 0.02).bfloat16()
    zeros = (torch.randn(N, K // group_size) * 0.01).bfloat16()
    weight, scale_zero = native.to_kernel_layout(codes, scales, zeros)
    assert scale_zero.dtype == torch.bfloat16 and scale_zero.shape == (N, 2, K // group_size)
    _, as_float = native.to_kernel_layout(codes, scales.float(), zeros.float())
    assert as_float.dtype == torch.float32 and torch.equal(as_float, scale_zero.float())
    x = torch.randn(3, K, dtype=x_dtype)
    y = native.int4_rows(x, weight, scale_zero, group_size)
    assert torch.equal(y, native.int4_rows(x, weight, as_float, group_size))
    ref = native.int4_rows_reference(x, weight, as_float, group_size)
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    assert native.to_kernel_layout(codes, scales.half(), zeros.half())[1].dtype == torch.float32
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        native.int4_rows(x, weight, scale_zero.half(), group_size)


@needs_vnni
def test_int4_packed_for_decoding_runs_the_kernel_per_row():
    """After `pack_for_decoding` the weight is in the VNNI kernel's layout (not beside ATen's): up
    to DECODE_KERNEL_ROWS rows run the kernel, each within its own 8-bit quantization's error of
    the dequantized product and bit for bit the same alone or in a batch; more rows dequantize
    slabs from that layout; the state dict is the same bytes; a move restores ATen's layout."""
    module = Int4Linear.from_linear(linear(256, 200), 128)
    plain = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(Q.DECODE_KERNEL_ROWS, 256, dtype=torch.bfloat16)
    x[2] *= 30
    assert module.pack_for_decoding() and module.weight.shape == (200, 128)  # no ATen padding rows
    assert all(torch.equal(module.state_dict()[k], v) for k, v in plain.items())
    with torch.inference_mode(), OpRecorder() as recorder:
        y = module(x)
    assert "aten._weight_int4pack_mm_for_cpu" not in [name for name, _ in recorder.calls]
    w, b = dequantize_weight(module).float(), module.bias.float()
    ref = F.linear(x.float(), w, b)
    step = x.float().abs().amax(dim=1, keepdim=True) / native.ACTIVATION_STEPS
    bound = step / 2 * w.abs().sum(dim=1) + 2**-8 * (ref.abs() + 1e-3)
    assert ((y.float() - ref).abs() <= bound).all()
    for row in range(0, Q.DECODE_KERNEL_ROWS, 5):
        assert torch.equal(module(x[row : row + 1])[0], y[row])
    for rows in (Q.DECODE_KERNEL_ROWS + 1, 2 * Q.DECODE_KERNEL_ROWS + 3):  # slabs from the kernel's layout
        x_many = torch.randn(rows, 256, dtype=torch.bfloat16)
        assert torch.allclose(module(x_many).float(), F.linear(x_many.float(), w, b), rtol=2**-6, atol=2**-6)
    module.to(torch.float32)
    assert module._decode_weight is None and module.packed_for_cpu
    assert torch.allclose(module(x[:1].float()), F.linear(x[:1].float(), w, b), rtol=2**-6, atol=2**-6)
    assert all(torch.equal(module.state_dict()[k].float(), v.float()) for k, v in plain.items())
    assert not Int4Linear.from_linear(linear(256, 200), 64).pack_for_decoding()  # groups of 64: ATen's


def test_vnni_kernels_that_cannot_build_leave_aten_in_charge(monkeypatch, tmp_path):
    """A failed build is a reason, not an error: the layers keep ATen's kernels."""
    monkeypatch.setenv("ANDROMEDA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    for cached in (native.kernels, native.unavailable_reason, native.build_library):
        cached.cache_clear()
    try:
        reason = native.unavailable_reason()
        assert reason is not None and ("failed" in reason or "lacks" in reason)
        assert not Int8Linear.from_linear(linear(256, 64)).pack_for_decoding()
        module = Int4Linear.from_linear(linear(256, 64), 128)
        assert not module.pack_for_decoding()
        x = torch.randn(1, 256, dtype=torch.bfloat16)
        assert torch.allclose(module(x).float(), F.linear(x.float(), dequantize_weight(module).float(),
                                                          module.bias.float()), rtol=2**-6, atol=2**-6)
    finally:
        monkeypatch.undo()
        for cached in (native.kernels, native.unavailable_reason, native.build_library):
            cached.cache_clear()


def tiny_model(dtype):
    torch.manual_seed(0)
    return Andromeda.from_config("tiny", dtype=dtype)


def dequantized_copy(model):
    """The float model whose every Linear holds the quantized model's dequantized weight."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Q.QuantizedLinear):
            layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            layer = layer.to(module.bias.dtype if module.bias is not None else dequantize_weight(module).dtype)
            with torch.no_grad():
                layer.weight.copy_(dequantize_weight(module))
                if module.bias is not None:
                    layer.bias.copy_(module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
    return model


@pytest.mark.parametrize("scheme, group_size, bound", [("int8", 128, 0.03), ("int4", 32, 0.25)])
def test_quantized_model_logits_and_generation(scheme, group_size, bound):
    """fp32: the quantized model computes exactly the dequantized model (logits to 1e-4, greedy
    tokens equal), and its logits stay near full precision: relative RMS error under `bound`
    (measured 0.009 for int8, 0.12 for int4 g32 on this random-init model: 8 bits give ~1%
    noise per weight, 4 bits with a group's range over 15 steps ~10%)."""
    model = tiny_model(torch.float32)
    q = quantize(copy.deepcopy(model), scheme, group_size)
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert len([m for m in q.modules() if isinstance(m, Q.QuantizedLinear)]) == 4 * 2 + 1
    tokens = torch.randint(0, 258, (2, 24))
    with torch.no_grad():
        full, logits = model.Andromeda(tokens), q.Andromeda(tokens)
        same = dequantized_copy(q).Andromeda(tokens)
    assert torch.allclose(logits, same, rtol=0, atol=1e-4)
    assert ((logits - full).norm() / full.norm()).item() < bound
    prompt = tokens[:, :6]
    assert torch.equal(q.decoder.generate(prompt, 12, temperature=0.0),
                       dequantized_copy(q).decoder.generate(prompt, 12, temperature=0.0))


@pytest.mark.parametrize("scheme, group_size", [("int8", 128), ("int4", 64)])
def test_state_dict_round_trip_through_safetensors(scheme, group_size, tmp_path):
    config = Config.from_preset("tiny")
    q = quantize(tiny_model(torch.bfloat16).Andromeda, scheme, group_size)
    state = q.state_dict()
    expected = quantized_state_dict_shapes(config, scheme, group_size, torch.bfloat16)
    assert {name: (tuple(t.shape), t.dtype) for name, t in state.items()} == expected
    if scheme == "int4":  # plain nibbles in the file, whatever the CPU's packed layout
        assert state["to_logits.weight"].shape == (258, 32) and state["to_logits.weight"].dtype == torch.uint8
    file = tmp_path / "model.safetensors"
    save_file(state, file)
    tokens = torch.randint(0, 258, (1, 16))
    for source in (file, load_file(file)):  # read layer by layer, or from a state dict
        loaded = load_quantized_transformer(config, source, scheme, group_size)
        again = loaded.state_dict()
        assert state.keys() == again.keys() and all(torch.equal(state[n], again[n]) for n in state)
        with torch.no_grad():
            assert torch.equal(q(tokens), loaded(tokens))


def test_meta_build_allocates_nothing():
    net = build_quantized_transformer(Config.from_preset("tiny"), "int4", 32)
    assert all(t.is_meta for t in net.state_dict().values())
    assert isinstance(net.blocks[0].attn.to_qkv, Int4Linear)


def test_loading_a_mismatched_state_dict_names_the_problem():
    config = Config.from_preset("tiny")
    state = quantize(tiny_model(torch.bfloat16).Andromeda, "int4", 32).state_dict()
    with pytest.raises(ValueError, match=r"int4 \(group size 64\).*blocks.0.attn.to_qkv.scales"):
        load_quantized_transformer(config, state, "int4", 64)
    del state["to_logits.zeros"]
    with pytest.raises(ValueError, match="missing to_logits.zeros"):
        load_quantized_transformer(config, state, "int4", 32)


def test_bad_scheme_and_group_sizes_are_refused_before_anything_changes():
    model = tiny_model(torch.float32)
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; choose one of int8, int4"):
        quantize(model, "int3")
    with pytest.raises(ValueError, match=r"group size must be one of \(32, 64, 128, 256\).*got 48"):
        quantize(model, "int4", 48)
    with pytest.raises(ValueError, match=r"got 512"):
        quantize(model, "int4", 512)
    # tiny's width is 64: a group of 128 divides no layer's input; the first one is named.
    with pytest.raises(ValueError, match="group size 128 does not divide the input width 64 of layer "
                                         "'Andromeda.blocks.0.attn.to_qkv'"):
        quantize(model, "int4", 128)
    assert all(type(m) is not Int4Linear for m in model.modules())
    assert isinstance(model.Andromeda.to_logits, nn.Linear)
