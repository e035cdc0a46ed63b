"""What the training loop's CPU kernels share: the AVX-512 kernels' build and CPU flags, and handing a
kernel to a model's Transformers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..model import Transformer

# The AVX-512F/BW kernels' (loss, LayerNorm, transposes) compiler flags, and the CPU features they need.
AVX512_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp", "-shared",
                "-fPIC", "-std=gnu11", "-lm")
AVX512_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


def give_transformers(model: nn.Module, attribute: str, kernel: Callable | None) -> bool:
    """Set `attribute` of every `Transformer` in `model` to `kernel`, where there is one (None: the
    kernel cannot run here, and the models keep PyTorch's ops); returns whether it did."""
    if kernel is None:
        return False
    for module in model.modules():
        if isinstance(module, Transformer):
            setattr(module, attribute, kernel)
    return True
