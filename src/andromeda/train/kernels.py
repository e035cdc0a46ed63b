"""What the training loop's CPU kernels share: handing one to a model's Transformers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..model import Transformer


def give_transformers(model: nn.Module, attribute: str, kernel: Callable | None) -> bool:
    """Set `attribute` of every `Transformer` in `model` to `kernel`, where there is one (None: the
    kernel cannot run here, and the models keep PyTorch's ops); returns whether it did."""
    if kernel is None:
        return False
    for module in model.modules():
        if isinstance(module, Transformer):
            setattr(module, attribute, kernel)
    return True
