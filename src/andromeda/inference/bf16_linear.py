"""bf16 Linears whose decoding products read the weight in row tiles, by `native.bf16_rows`.

Shape letters: M rows of activations (batch x positions), K input features, N output features.

A decode step reads every weight once, so its speed is the memory bandwidth's. oneDNN's bf16
product for one row reaches it only with the weight packed in its blocked layout
(`inference.packed`), and a packed weight is an opaque tensor Inductor cannot lower: a prepacked
model decodes eagerly, paying Python and dispatch between its ~130 products a token. The kernel
(`kernels/bf16_rows.c`, AVX-512 BF16) streams the weight in the row-tile layout
(`native.to_row_tiles`: 4 rows a tile, their 64-byte blocks interleaved, so a tile is one stream
the hardware prefetchers follow), one vdpbf16ps per 32 weights, float32 sums: the same products to
float32 rounding, at the bandwidth, from an ordinary tensor -- so its decode step compiles
(`generate --compile`), the op traced as one node. On an AMD EPYC (Zen 4, 2 threads) row tiles
read at the machine's float32-sum probe where plain rows read side by side (this kernel's earlier
form, which read nn.Linear's own weight) reached 75-85% of it.

`Bf16RowsLinear` computes F.linear(x, W, bias) with W held only in row tiles: up to DECODE_ROWS
rows of a CPU product without gradient go to the op, more rows (a prefill) to F.linear a slab of W
at a time, each slab read back from the tiles (a copy of 4 MB), and other devices or dtypes, or x
wanting gradients, take the same path.
Like a prepacked layer it is for inference (its weight does not train; `inference_only_modules`
names it) and the checkpoint is unchanged: `state_dict()` gives the plain bf16 `weight` and
`bias`, `load_state_dict` tiles what it loads, copies and pickles carry the tiles.
`use_bf16_rows(model)` swaps a model's plain bf16 CPU Linears for it where the kernel runs (a CPU
with AVX-512 BF16 and the ops library built, `native.bf16_rows_kernel`); `packed.prepare_bf16`
does that where the kernel beats oneDNN (`packed.rows_kernel_preferred`: CPUs without AMX tiles), else
prepacks them for oneDNN: what `checkpoint.load_for_inference` does; `generate --compile` takes
the kernel wherever it runs (prepacked weights do not compile); `to_linear` and `packed.unpack`
give nn.Linears back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.fused import is_plain_linear
from . import native
from .laid_out import LaidOutLinear, replace_module
from .quantized_linear import _slab_matmul

DTYPE = torch.bfloat16
# Rows up to which the kernel computes a product: decoding, a batch of decoding rows, a speculative
# verify step. It re-reads each pair of tiles from cache once per 2 activation rows, so its time
# grows with the rows, where oneDNN's (the weight reordered once a call) barely does.
DECODE_ROWS = 16
K_MULTIPLE = 32  # the kernel's 64-byte vectors of 32 bf16 weights: the tiles' blocks, whatever their dtype


class Bf16RowsLinear(LaidOutLinear):
    """F.linear(x, W, bias) for x (..., K) -> (..., N), with the bf16 weight W kept in the row-tile
    layout (module docstring). Built from an nn.Linear by `from_linear`, or by `use_bf16_rows`."""

    def __init__(self, tiles: Tensor, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = tiles.shape[1], out_features
        self._tiles = tiles  # a plain attribute: the state dict holds the plain weight instead
        self.register_buffer("bias", bias)
        # Whether the kernel runs in this process (`native.bf16_rows_kernel`), set where the module
        # is made or unpickled: a model prepared on one machine and loaded on another takes F.linear.
        self._kernel = native.bf16_rows_kernel()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Bf16RowsLinear:
        """The same layer with its weight in row tiles (a copy) and its bias shared."""
        if not kernel_takes(linear):
            raise ValueError(f"the bf16 rows kernel takes a plain nn.Linear with a contiguous bf16 CPU weight of "
                             f"rows of whole {K_MULTIPLE}-weight vectors (and a bf16 bias), not {linear}")
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(native.to_row_tiles(linear.weight.detach(), K_MULTIPLE), linear.out_features, bias)

    def forward(self, x: Tensor) -> Tensor:
        tiles = self._tiles
        if (self._kernel and x.device.type == tiles.device.type == "cpu" and tiles.dtype == DTYPE
                and 0 < x.numel() <= DECODE_ROWS * self.in_features
                and not (torch.is_grad_enabled() and x.requires_grad)):  # the op has no backward
            bias = None if self.bias is None else self.bias.float()
            y = native.bf16_rows(x.reshape(-1, self.in_features), tiles, self.out_features, bias)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        x2 = x.reshape(-1, self.in_features)
        y = _slab_matmul(x2, self.out_features, self._slab, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def _slab(self, start: int, end: int, dtype: torch.dtype) -> tuple[Tensor, None]:
        return native.from_row_tiles(self._tiles, start, end, K_MULTIPLE).to(dtype), None

    def dense_weight(self) -> Tensor:
        """The (N, K) weight in the plain layout, in a fresh tensor."""
        return native.from_row_tiles(self._tiles, 0, self.out_features, K_MULTIPLE)

    def _apply(self, fn, recurse: bool = True):
        self._tiles = fn(self._tiles)  # moves and conversions apply to the tiles as to a buffer
        return super()._apply(fn, recurse)

    def _store_dense(self, weight: Tensor) -> None:
        self._tiles = native.to_row_tiles(weight.contiguous(), K_MULTIPLE)

    def _stand_in(self) -> Tensor:
        return torch.empty(self.out_features, self.in_features, dtype=self._tiles.dtype, device=self._tiles.device)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._kernel = native.bf16_rows_kernel()


def kernel_takes(linear: nn.Module) -> bool:
    """Whether `linear` is a plain nn.Linear the kernel can read: a contiguous bf16 CPU weight whose
    rows are whole vectors (K a multiple of 32)."""
    if not is_plain_linear(linear):
        return False
    w = linear.weight
    return (w.device.type == "cpu" and w.dtype == DTYPE and w.is_contiguous() and linear.in_features % K_MULTIPLE == 0
            and (linear.bias is None or linear.bias.dtype == DTYPE))


def use_bf16_rows(module: nn.Module) -> int:
    """Swap every plain nn.Linear in `module` the kernel takes (`kernel_takes`) for a
    Bf16RowsLinear with its weight in row tiles, in place, one layer at a time (each plain weight is
    freed once its layer is swapped, if nothing else holds it), where the kernel runs here; returns
    how many."""
    if not native.bf16_rows_kernel():
        return 0
    names = [name for name, child in module.named_modules() if kernel_takes(child)]
    for name in names:
        replace_module(module, name, Bf16RowsLinear.from_linear)
    return len(names)
