"""The training loss's softmax and gradient over bf16 logits by a small C kernel.

The loss (`model.loss.linear_cross_entropy`) forms each chunk's gradient d loss / d logits =
(softmax - onehot) * weight while the chunk's logits exist. With PyTorch's ops that is seven
passes over a float32 copy of a (1024, V) chunk (convert, max, subtract, exp, sum, scale, convert
back to bf16): 0.55 s of a 3.2 s bf16 training step of `benchmarks/bench_train.py`'s model at one
thread, more than the chunk's three matrix products' 0.45 s. `kernels/cross_entropy.c` reads the
bf16 logits where the product wrote them, a row at a time (100 KB for 50k words, in L2): its
maximum, then e^(x - max) into a float32 scratch row with their sum, then the scaled gradient over
the logits in bf16 (`model.loss.SoftmaxCrossEntropy`).

`loss_kernel()` gives it where it can run (AVX-512 and a C compiler; built on first use like the
decoding kernels, `inference.native.build_library`), else None and the loss keeps PyTorch's ops;
`use_loss_kernel(model)` hands it to a model. It is the custom op `andromeda::softmax_cross_entropy`
(mutating its logits), so a compiled training step keeps it in its graph.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor, nn

from ..inference.native import KernelLibrary
from ..model.loss import SoftmaxCrossEntropy
from .kernels import AVX512_CPU_FLAGS, AVX512_FLAGS, give_transformers

SOURCE = Path(__file__).parents[1] / "inference" / "kernels" / "cross_entropy.c"
LIBRARY = KernelLibrary("the loss kernel", SOURCE, AVX512_FLAGS, AVX512_CPU_FLAGS,
                        "set the model's softmax_cross_entropy to None to use PyTorch's ops")


def softmax_cross_entropy(logits: Tensor, targets: Tensor, row_weight: Tensor | None) -> Tensor:
    """`model.loss.SoftmaxCrossEntropy` by the C kernel (module docstring), through its op. A plain
    function, so a model holding it still deep-copies and pickles."""
    return _softmax_cross_entropy_op(logits, targets, row_weight)


@torch.library.custom_op("andromeda::softmax_cross_entropy", mutates_args=("logits",), device_types="cpu")
def _softmax_cross_entropy_op(logits: Tensor, targets: Tensor, row_weight: Tensor | None) -> Tensor:
    if logits.dtype != torch.bfloat16 or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a bf16 (n, V) tensor with contiguous rows, got {logits.dtype} "
                         f"{tuple(logits.shape)} with strides {logits.stride()}")
    n = logits.shape[0]
    targets = targets.to(torch.int64).contiguous()
    if targets.shape != (n,):
        raise ValueError(f"targets must be ({n},), got {tuple(targets.shape)}")
    if logits.stride(0) < logits.shape[1]:
        raise ValueError(f"logits' rows must not overlap: row stride {logits.stride(0)} under {logits.shape[1]} words")
    if row_weight is not None:
        if row_weight.shape != (n,):
            raise ValueError(f"row_weight must be ({n},), got {tuple(row_weight.shape)}")
        row_weight = row_weight.to(torch.float32).contiguous()
    losses = torch.empty(n, dtype=torch.float32)
    status = _kernel()(logits.data_ptr(), n, logits.shape[1], logits.stride(0), targets.data_ptr(),
                       None if row_weight is None else row_weight.data_ptr(), losses.data_ptr())
    if status == 1:
        raise ValueError(f"target ids must be in [0, {logits.shape[1]}) or -100 (ignored)")
    if status:
        raise MemoryError(f"no memory for the loss kernel's scratch row of {logits.shape[1]} floats")
    return losses


@_softmax_cross_entropy_op.register_fake
def _losses_shape(logits: Tensor, targets: Tensor, row_weight: Tensor | None) -> Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def loss_kernel() -> SoftmaxCrossEntropy | None:
    """The kernel as a `SoftmaxCrossEntropy`, or None where it cannot run (the reason is logged)."""
    return LIBRARY.offer(softmax_cross_entropy, "the loss's softmax runs in PyTorch's ops")


def use_loss_kernel(model: nn.Module) -> bool:
    """Give every `Transformer` in `model` the loss kernel where it can run; returns whether it did.
    Only bf16 logits on the CPU take it (`model.loss.linear_cross_entropy`)."""
    return give_transformers(model, "softmax_cross_entropy", loss_kernel())


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (no AVX-512, no C compiler, a failed build), or None."""
    return LIBRARY.unavailable_reason()


def _kernel() -> ctypes._CFuncPtr:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    return LIBRARY.function("andromeda_softmax_cross_entropy", [pointer, size, size, size, pointer, pointer, pointer])
