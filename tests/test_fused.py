"""The lean feed-forward autograd function and the scratch workspace it shares across layers."""

import weakref

import pytest
import torch
import torch.nn.functional as F

from andromeda import Andromeda
from andromeda.model import transformer as transformer_module
from andromeda.model.fused import Workspace
from andromeda.model.fused import lean_feed_forward as feed_forward
from helpers import Counted


def plain_feed_forward(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def ff_inputs(dtype=torch.float64, frozen=()):
    torch.manual_seed(0)
    C, Fw = 12, 48
    shapes = dict(x=(2, 7, C), w1=(Fw, C), b1=(Fw,), w2=(C, Fw), b2=(C,))
    return {name: torch.randn(shape, dtype=dtype, requires_grad=name not in frozen)
            for name, shape in shapes.items()}


@pytest.mark.parametrize("frozen", [(), ("w1", "b1", "w2", "b2"), ("x", "w2")])
def test_feed_forward_and_gradients_equal_the_autograd_version(frozen):
    inputs = ff_inputs(frozen=frozen)
    grad_y = torch.randn(2, 7, 12, dtype=torch.float64)
    lean = feed_forward(*inputs.values(), Workspace())
    plain = plain_feed_forward(*inputs.values())
    torch.testing.assert_close(lean, plain)
    wanted = [t for t in inputs.values() if t.requires_grad]
    for a, b in zip(torch.autograd.grad(lean, wanted, grad_y), torch.autograd.grad(plain, wanted, grad_y)):
        torch.testing.assert_close(a, b)


def test_feed_forward_passes_gradcheck():
    inputs = ff_inputs()
    assert torch.autograd.gradcheck(lambda *t: feed_forward(*t, Workspace()), tuple(inputs.values()))


def test_feed_forward_under_bf16_autocast_matches_autocast_linear_layers():
    inputs = ff_inputs(dtype=torch.float32)
    grad_y = torch.randn(2, 7, 12, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = feed_forward(*inputs.values(), Workspace())
        plain = plain_feed_forward(*inputs.values())
    assert lean.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(lean, plain)
    values = list(inputs.values())
    for a, b in zip(torch.autograd.grad(lean, values, grad_y), torch.autograd.grad(plain, values, grad_y)):
        assert a.dtype == b.dtype == torch.float32  # gradients in each input's own dtype
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("blocks", [True, False])
def test_transposed_writes_in_blocks_what_one_transposed_pass_writes(blocks, monkeypatch):
    """`transposed`: over several blocks of rows and a short last one (or in one pass, under
    BLOCKS_MIN entries), bit-equal to src.T converted (and, with a scale, to src.T * scale),
    contiguous in the new dtype."""
    from andromeda.model import fused

    src = torch.randn(2 * fused.TRANSPOSE_BLOCK + 22, 37).bfloat16()
    monkeypatch.setattr(fused, "BLOCKS_MIN", 1 if blocks else src.numel() + 1)
    calls, copy_ = [], torch.Tensor.copy_

    def counted_copy(self, *args, **kwargs):
        calls.append(self.shape)
        return copy_(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", counted_copy)
    out = fused.transposed(src, torch.float32)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    assert len(calls) == (3 if blocks else 1)
    assert out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, src.T.float())
    scale = torch.tensor(0.37)
    assert torch.equal(fused.transposed(src.float(), torch.bfloat16, scale), (src.float().T * scale).bfloat16())
    # a bf16 source scaled into float32: multiplied in float32 (torch.mul would round the product to bf16)
    assert torch.equal(fused.transposed(src, torch.float32, scale), src.float().T * scale)


@pytest.mark.parametrize("large", [True, False])
def test_w1_gradient_under_bf16_on_the_cpu_is_the_transposed_product_written_back(large, monkeypatch):
    """Under CPU bf16 autocast a W1 of BLOCKS_MIN weights or more has its gradient formed as (C, F) =
    x.T @ dh and written back (F, C) in float32 (`transposed`, counted, as the transposed operands
    are; a smaller one keeps dh.T @ x): the float64 product of the same bf16 operands to one bf16
    rounding, over a width of several blocks; the other gradients as the plain autocast ops'."""
    from andromeda.model import fused

    counted = Counted(fused.transposed)
    monkeypatch.setattr(fused, "transposed", counted)
    monkeypatch.setattr(fused, "BLOCKS_MIN", 1 if large else 1 << 20)
    torch.manual_seed(0)
    C, Fw = 2 * fused.TRANSPOSE_BLOCK + 22, 96
    x = torch.randn(3, 11, C, requires_grad=True)
    w1, b1 = torch.randn(Fw, C, requires_grad=True), torch.randn(Fw, requires_grad=True)
    w2, b2 = torch.randn(C, Fw, requires_grad=True), torch.randn(C, requires_grad=True)
    grad_y = torch.randn(3, 11, C).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = feed_forward(x, w1, b1, w2, b2, Workspace())
        plain = plain_feed_forward(x, w1, b1, w2, b2)
    grads = torch.autograd.grad(lean, (x, w1, b1, w2, b2), grad_y)
    assert counted.calls == (3 if large else 1)  # W2's dy (and W1's x) made contiguous, W1's product written back
    gw1 = grads[1]
    assert gw1.dtype == torch.float32 and gw1.shape == (Fw, C) and gw1.is_contiguous()
    # the reference from the same bf16 operands: x and d loss / d h as the backward forms them
    xb = x.detach().reshape(-1, C).bfloat16()
    hb = F.linear(xb, w1.bfloat16(), b1.bfloat16())
    d_act = (grad_y.reshape(-1, C) @ w2.detach().bfloat16())
    d_h = torch.ops.aten.gelu_backward(d_act, hb)
    exact = d_h.double().T @ xb.double()
    torch.testing.assert_close(gw1.double(), exact, rtol=2**-8, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(plain, (x, w1, b1, w2, b2), grad_y)):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", [(4096, 768), (100, 37), (1, 5), (333, 2560)])
def test_column_sums_by_a_product_are_the_column_reduction(shape):
    """The feed-forward's bias gradients under CPU bf16 (`column_sums`, a ones-row product): the bits
    of x.sum(0)."""
    from andromeda.model import fused

    x = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 4).bfloat16()
    assert torch.equal(fused.column_sums(x), x.sum(0))


def test_no_grad_runs_the_plain_ops_and_leaves_the_workspace_empty():
    inputs, workspace = ff_inputs(), Workspace()
    with torch.no_grad():
        out = feed_forward(*inputs.values(), workspace)
        torch.testing.assert_close(out, plain_feed_forward(*inputs.values()))
    assert workspace._buffers == {}


def test_workspace_reuses_one_buffer_and_grows_when_asked_for_more():
    workspace = Workspace()
    big = workspace.get("ff", (4, 8), torch.float32, torch.device("cpu"))
    small = workspace.get("ff", (2, 3), torch.float32, torch.device("cpu"))
    assert small.data_ptr() == big.data_ptr() and small.shape == (2, 3) and small.is_contiguous()
    other_dtype = workspace.get("ff", (2, 3), torch.float64, torch.device("cpu"))
    assert other_dtype.dtype == torch.float64 and other_dtype.data_ptr() != big.data_ptr()
    bigger = workspace.get("ff", (8, 8), torch.float32, torch.device("cpu"))
    assert bigger.numel() == 64


def test_layers_of_one_forward_share_a_workspace_that_dies_with_the_graph(monkeypatch):
    """All blocks of a forward write their scratch into one buffer, and nothing outlives the
    backward: a training step leaves no scratch memory behind."""
    made = []

    class Recorded(Workspace):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            made.append(weakref.ref(self))

    monkeypatch.setattr(transformer_module, "Workspace", Recorded)
    model = Andromeda.from_config("tiny")
    loss = model(torch.randint(0, 258, (2, 17)))
    assert len(made) == 1 and len(made[0]()._buffers) == 1  # both blocks' (N, F) scratch: one buffer
    loss.backward()
    del loss
    assert made[0]() is None


def test_large_projections_under_bf16_autocast_compute_what_autocast_linear_does(monkeypatch):
    """`projection`: a bias-free Linear of CONTIGUOUS_FIRST_MIN weights or more, trained under CPU
    bf16 autocast, gives nn.Linear's output and input gradient bit for bit and its weight gradient
    to bf16 rounding (the same product of a contiguous dy.T); smaller weights, no autocast, no grad,
    a frozen weight and a bias keep the module's own call."""
    from andromeda.model import fused

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64, bias=False)
    x = torch.randn(3, 50, 96, requires_grad=True)
    grad = torch.randn(3, 50, 64)

    def run(function):
        x.grad = linear.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = function(x, linear)
        y.backward(grad)
        return y, x.grad.clone(), linear.weight.grad.clone(), type(y.grad_fn).__name__

    monkeypatch.setattr(fused, "CONTIGUOUS_FIRST_MIN", linear.weight.numel())
    y, grad_x, grad_w, node = run(fused.projection)
    y0, grad_x0, grad_w0, node0 = run(lambda x, module: module(x))
    assert "_Projection" in node and "_Projection" not in node0
    assert y.dtype == torch.bfloat16 and torch.equal(y, y0)
    assert grad_x.dtype == grad_x0.dtype == torch.float32 and torch.equal(grad_x, grad_x0)
    assert grad_w.dtype == torch.float32
    torch.testing.assert_close(grad_w, grad_w0, rtol=2**-7, atol=1e-6)

    monkeypatch.setattr(fused, "CONTIGUOUS_FIRST_MIN", linear.weight.numel() + 1)  # one entry too small
    assert "_Projection" not in run(fused.projection)[3]
    monkeypatch.setattr(fused, "CONTIGUOUS_FIRST_MIN", 1)
    assert "_Projection" not in type(fused.projection(x, linear).grad_fn).__name__  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert fused.projection(x, linear).grad_fn is None
        linear.weight.requires_grad_(False)
        assert "_Projection" not in type(fused.projection(x, linear).grad_fn).__name__
        linear.weight.requires_grad_(True)
        biased = torch.nn.Linear(96, 64)
        assert "_Projection" not in type(fused.projection(x, biased).grad_fn).__name__


def test_a_model_with_large_attention_projections_trains_as_with_linear_calls(monkeypatch):
    """The attention's two projections through `projection` (threshold lowered so a small model
    takes it): under autocast the loss is the same and the gradients agree to bf16 rounding."""
    from andromeda.model import fused

    model = Andromeda.from_config("tiny", max_seq_len=64).Andromeda
    tokens = torch.randint(0, model.config.num_tokens, (2, 33))
    calls, apply = [], fused._Projection.apply
    monkeypatch.setattr(fused._Projection, "apply", lambda *args: calls.append(1) or apply(*args))
    results = []
    for threshold in (1 << 40, 1):
        monkeypatch.setattr(fused, "CONTIGUOUS_FIRST_MIN", threshold)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(calls) == 2 * model.config.depth  # the second pass: each layer's two projections
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=2e-2, atol=1e-5, msg=name)
