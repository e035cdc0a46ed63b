"""Compiled decoding of int8/int4 models: the VNNI kernels as custom ops that torch.compile traces
(`inference.native`), `generate(compile=True)` on quantized models, and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from andromeda.inference import native
from andromeda.inference import quantized_linear as Q
from andromeda.inference.generate import generate
from andromeda.inference.quantize import pack_for_decoding, quantize
from helpers import random_net

NO_VNNI = native.unavailable_reason()
needs_vnni = pytest.mark.skipif(NO_VNNI is not None and not NO_VNNI.startswith("building"),
                                reason=f"VNNI kernels: {NO_VNNI}")


def kernel_inputs(scheme: str, dtype: torch.dtype = torch.float32, M: int = 3, K: int = 256, N: int = 96) -> tuple:
    torch.manual_seed(0)
    x, bias = torch.randn(M, K).to(dtype), torch.randn(N)
    if scheme == "int8":
        weight = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        return (x, native.to_row_tiles(weight, tile=native.INT8_TILE_ROWS), torch.rand(N) / 100,
                native.int8_row_sums(weight), bias)
    codes, group = torch.randint(0, 16, (N, K)), 128
    weight, scale_zero = native.to_kernel_layout(codes, torch.rand(N, K // group) / 10, torch.randn(N, K // group) / 10)
    return x, weight, scale_zero, group, bias


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_kernels_are_custom_ops_with_a_shape_function(scheme, dtype):
    """`torch.ops.andromeda.<scheme>_rows` computes what the direct call does, bit for bit, and
    passes torch.library's checks of its schema and fake (shape-only) implementation. The
    kernel's bias and bf16 output are the float32 product plus the bias, rounded as torch rounds."""
    args = kernel_inputs(scheme, dtype)
    op = getattr(torch.ops.andromeda, f"{scheme}_rows")
    direct = getattr(native, f"{scheme}_rows")(*args)
    assert direct.shape == (3, 96) and direct.dtype == dtype and torch.equal(op(*args), direct)
    x, *rest, bias = args
    plain = getattr(native, f"{scheme}_rows")(x.float(), *rest, None)  # float32, no bias
    assert plain.dtype == torch.float32 and torch.equal(direct, (plain + bias).to(dtype))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def mixed_quantized_net():
    """A one-block model whose attention is int8 and the rest int4 (group 128, the kernel's),
    packed for decoding: one small compile covers both ops."""
    net = random_net(dim=128, dim_head=32, depth=1).eval()
    quantize(net.blocks[0].attn, "int8")
    quantize(net, "int4", 128)
    assert pack_for_decoding(net) == len([m for m in net.modules() if isinstance(m, Q.QuantizedLinear)])
    return net


@needs_vnni
def test_compiled_quantized_decoding_gives_the_eager_tokens():
    """compile=True takes int8 and int4 layers whose VNNI kernels run: the step compiles as one
    graph with the kernels in it (fullgraph), greedy tokens equal eager decoding's, and the
    profiler names the kernels inside the compiled graph."""
    net = mixed_quantized_net()
    prompts = [torch.randint(0, net.config.num_tokens, (n,), generator=torch.Generator().manual_seed(n))
               for n in (5, 9)]
    eager = generate(net, prompts, 12, temperature=0)
    with torch.profiler.profile() as profile:
        compiled = generate(net, prompts, 12, temperature=0, compile=True)
    assert torch.equal(compiled, eager)
    names = {event.name for event in profile.events()}
    assert {"andromeda::int8_rows", "andromeda::int4_rows"} <= names
    assert any(name.startswith("Torch-Compiled Region") for name in names)


@needs_vnni
def test_compile_refuses_quantized_layers_without_their_kernel_path():
    """Only the kernels' path traces: layers the kernel cannot take (int4 groups of 32), layers
    not packed for decoding and batches over DECODE_KERNEL_ROWS are refused, naming the layer
    and the reason, before anything is compiled."""
    small_groups = quantize(random_net(), "int4", 32)
    pack_for_decoding(small_groups)
    with pytest.raises(ValueError, match=r"Int4Linear layer blocks\.0\.\w+\.\w+: .*group size 32"):
        generate(small_groups, [[1, 2]], 2, compile=True)
    unpacked = quantize(random_net(), "int8")
    with pytest.raises(ValueError, match=r"Int8Linear layer .*pack_for_decoding\(model\)"):
        generate(unpacked, [[1, 2]], 2, compile=True)
    pack_for_decoding(unpacked)
    rows = Q.DECODE_KERNEL_ROWS + 1
    with pytest.raises(ValueError, match=f"a batch of {rows} rows .* split the batch"):
        generate(unpacked, [[1, 2]] * rows, 2, compile=True)


@needs_vnni
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_kernel_ops_are_cpp_where_they_build_and_equal_the_ctypes_calls(scheme):
    """Where a C++ compiler is at hand the ops' CPU implementations are ops.cpp's: for float32,
    bf16, float16 (read as float32) and non-contiguous rows they give the ctypes calls' results
    bit for bit, and refuse rows of the wrong width naming the expected shape (int4: and scales of
    another group size than the call's)."""
    assert native.kernels().cpp_ops, "ops.cpp did not build (g++ and torch's headers are expected here)"
    op = getattr(torch.ops.andromeda, f"{scheme}_rows")
    direct = getattr(native, f"_{scheme}_rows")  # the ctypes call (the Python implementation)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        args = kernel_inputs(scheme, dtype)
        assert torch.equal(op(*args), direct(*args))
    x, *rest = kernel_inputs(scheme, torch.bfloat16)
    strided = torch.randn(256, 3, dtype=torch.bfloat16).T  # (3, 256), not contiguous
    assert torch.equal(op(strided, *rest), direct(strided.contiguous(), *rest))
    with pytest.raises(RuntimeError, match=r"takes x of shape \(M, 256\)"):
        op(x[:, :128], *rest)
    # the weight's rows are whole tiles for the rows of the scales (int4: scale_zero; int8: scale, wsum)
    weight, *more = rest
    # (int8: 8 fewer rows, as its tiles are 8 rows)
    shorter = [more[0][:-4], *more[1:]] if scheme == "int4" else [more[0][:-8], more[1][:-8], *more[2:]]
    rows = 92 if scheme == "int4" else 88
    for call in (op, direct):
        with pytest.raises(ValueError, match=f"takes a contiguous weight of {rows} rows( of 128| of 256)? for {rows} rows"):
            call(x, weight, *shorter)
    if scheme == "int4":  # scales and zeros of another group size than the call's: refused, not read past
        scale_zero, group, bias = more
        for call in (op, direct):
            for wrong in (64, 0):
                with pytest.raises(ValueError, match=r"scales and zeros of shape \(N, 2, K / group\)|shape \(96, 2"):
                    call(x, weight, scale_zero, wrong, bias)


FALLBACK = """
import json, torch
from andromeda.inference import native
import test_compiled_decoding as t
kernels = native.kernels()
results = {}
for scheme in ("int8", "int4"):
    args = t.kernel_inputs(scheme, torch.bfloat16)
    op = getattr(torch.ops.andromeda, scheme + "_rows")
    results[scheme] = op(*args).float().tolist()
q, k, v = (torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(n)) for n in (3, 5, 5))
mask = torch.zeros(1, 1, 1, 5)
sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
cache = type("Cache", (), {"k": k, "dtype": torch.float32})()
print(json.dumps({"cpp_ops": kernels.cpp_ops, "results": results, "decode_sdpa_for": native.decode_sdpa_for(cache),
                  "decode_sdpa": torch.equal(torch.ops.andromeda.decode_sdpa(q, k, v, mask, 0.3, 192), sdpa)}))
"""


@needs_vnni
def test_kernel_ops_fall_back_to_python_where_cpp_does_not_build(tmp_path):
    """With no working C++ compiler (CXX=false, a fresh kernel cache) the C kernels still build and
    the ops are registered in Python over them: the same results as the C++ ops in this process;
    `decode_sdpa` is then PyTorch's SDPA, and caches are given no fused attention."""
    env = {**os.environ, "CXX": "false", "ANDROMEDA_CACHE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=300,
                          check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cpp_ops"] is False and native.kernels().cpp_ops
    assert report["decode_sdpa"] is True and report["decode_sdpa_for"] is None
    for scheme in ("int8", "int4"):
        op = getattr(torch.ops.andromeda, f"{scheme}_rows")
        assert torch.equal(torch.tensor(report["results"][scheme]), op(*kernel_inputs(scheme, torch.bfloat16)).float())
