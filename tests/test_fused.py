"""The lean feed-forward autograd function and the scratch workspace it shares across layers."""

import weakref

import pytest
import torch
import torch.nn.functional as F

from andromeda import Andromeda
from andromeda.model import transformer as transformer_module
from andromeda.model.fused import Workspace
from andromeda.model.fused import lean_feed_forward as feed_forward


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
        def __init__(self) -> None:
            super().__init__()
            made.append(weakref.ref(self))

    monkeypatch.setattr(transformer_module, "Workspace", Recorded)
    model = Andromeda.from_config("tiny")
    loss = model(torch.randint(0, 258, (2, 17)))
    assert len(made) == 1 and len(made[0]()._buffers) == 1  # both blocks' (N, F) scratch: one buffer
    loss.backward()
    del loss
    assert made[0]() is None
