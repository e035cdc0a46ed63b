"""Causal attention for bf16 training on the CPU, forward and backward, by a small C kernel.

A bf16 training step of `benchmarks/bench_train.py`'s model spends more in attention than in any
other op but the matrix products: PyTorch's CPU flash attention runs its 64-row blocks through
one small GEMM call each, and the model's ALiBi rides along as two extra key channels (a head of
64 becomes one of 66). `kernels/flash_attention.c` is the same algorithm (flash attention 2: an
online softmax over 64 x 64 tiles forward, the probabilities recomputed from the saved
log-sum-exp backward) with every tile's product done in registers by AVX-512 BF16's vdpbf16ps
(bf16 pairs, float32 sums), ALiBi computed in the kernel from the positions, and the grouped
key/value heads read in place. Where the CPU has AMX tiles (Sapphire Rapids on) and the head size is
a multiple of 32, the tiles' products are AMX's (`amx_tiles()`), forward and backward worked
transposed (S^T = K Q^T) so that every product's left operand is a row-major matrix, as AMX reads
it, and the online softmax's maxima and sums run down vectors of 16 queries:

    out_i = sum_{j <= i} softmax_j(scale q_i . k_j - slope_h |p_i - p_j|) v_j

for q (B, H, T, D), k and v (B, K, T, D) in bf16, query head h reading key/value head
h // (H / K) (SDPA's `enable_gqa`), p the positions (B or 1, T), slope_h 0 for heads without
ALiBi. Softmax, sums and gradients are float32; the probabilities and score gradients enter their
products rounded to bf16, as in flash attention's CUDA kernels. `reference_attention` is the
same function in float32 PyTorch ops, which the tests hold the kernel to.

On AMX tiles the forward's online softmax takes 128 keys an update (one rescale of the output and
one product over them). The backward keeps a key tile's probabilities and score gradients against a
segment of up to 16 query tiles and takes dV and dK as one product each over it, and dQ as one product
per query tile over a band of key tiles (`backward_band`: all of them up to 1,024 tokens): the float32
sums stay in the tiles across the products' depth instead of going through memory every 64 keys or
queries, in the same order as a product per tile pair (the same bits).

`attention_kernel()` gives it where it can run (AVX-512 BF16 and a C compiler; built on first use
like the other kernels, `inference.native.build_library`), else None; `use_attention_kernel(model)`
hands it to a model (`model.attention.CausalAttention`), which uses it for bf16 causal attention
on the CPU where every query reads all keys before it and no padding (training and evaluation
steps, and the prefill of a fresh KV cache; a decode step's one query keeps its own path). A NaN
score makes its row's output, and the gradients through that row, NaN. It is the custom op
`andromeda::causal_attention` with its backward registered, so compiled training steps keep it in
their graph.

The same library computes attention's prologue (`attention_prologue`, `model.attention.
AttentionPrologue`): from the fused projection's output (B, T, H + 2K, D), QK-norm, its learned
per-channel scales and the rotary xPos rotation in one pass forward and one backward, where
PyTorch's ops take a dozen passes each way over float32 copies (the scales are float32 under
autocast): forward and backward 26-37 -> 3-4 ms a layer at dim 512 and 240-340 -> 16-20 ms at the
2.5 B default's width (4 x 1024 tokens, one thread, Intel AMX; `benchmarks/bench_attention.py`).
The forward gives the ops' bf16 results (a last-bit difference in a few elements, the rotation's
products in another order); the backward rounds to bf16 once where the ops round four times, so
its gradients are closer to exact ones. `use_attention_kernel` gives it with the attention where
the model's heads and rotated channels are multiples of 16 (`prologue_fits`); the model uses it
where the fused attention reads its heads.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from ..inference.native import AMX_BF16_FLAGS, KernelLibrary, build_library, cpu_has
from ..model import Transformer
from ..model.attention import CausalAttention

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parents[1] / "inference" / "kernels" / "flash_attention.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fopenmp",
         "-shared", "-fPIC", "-std=gnu11", "-lm")
AMX_FLAGS = ("-mamx-tile", "-mamx-bf16")  # tried first: a compiler without them builds the AVX-512 BF16 path alone
AMX_HEAD_MULTIPLE = 32  # AMX products take heads of a multiple of 32 (a tile row: 32 bf16); others keep vdpbf16ps
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
LIBRARY = KernelLibrary("the attention kernel", SOURCE, FLAGS, CPU_FLAGS,
                        "set the model's causal_attention to None to use PyTorch's SDPA", build=lambda: _library_path())
TILE = 64  # the kernel's tile of queries and of keys; sequences are padded to a multiple in its buffers
MAX_HEAD = 256


def head_size_supported(dim_head: int) -> bool:
    """Whether the kernel takes heads of this size: a multiple of 16 (its vectors), at most 256."""
    return dim_head % 16 == 0 and 0 < dim_head <= MAX_HEAD


def causal_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slopes: Tensor | None,
                     scale: float) -> Tensor:
    """`model.attention.CausalAttention` by the C kernel (module docstring), through its op. A plain
    function, so a model holding it still deep-copies and pickles."""
    out, _ = _attention_op(q, k, v, positions, slopes, scale)
    return out


def reference_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slopes: Tensor | None,
                        scale: float) -> Tensor:
    """The kernel's function in float32 PyTorch ops, (B, H, T, D) in q's dtype, for the tests."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    k, v = k.float().repeat_interleave(G, dim=1), v.float().repeat_interleave(G, dim=1)
    scores = q.float() @ k.transpose(-1, -2) * scale  # (B, H, T, T)
    if slopes is not None:
        distance = (positions[:, :, None] - positions[:, None, :]).abs().float()  # (B or 1, T, T)
        scores = scores - slopes.float()[None, :, None, None] * distance[:, None]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


class _Args(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("B", "H", "K", "T", "D")] + [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("q_stride", ctypes.c_int64 * 3), ("k_stride", ctypes.c_int64 * 3), ("v_stride", ctypes.c_int64 * 3),
        ("positions", ctypes.c_void_p), ("positions_stride", ctypes.c_int64),
        ("slopes", ctypes.c_void_p), ("scale", ctypes.c_float),
        ("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64 * 3),
        ("lse", ctypes.c_void_p), ("packed", ctypes.c_void_p),
        ("dout", ctypes.c_void_p), ("dout_stride", ctypes.c_int64 * 3),
        ("dq", ctypes.c_void_p), ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p),
        ("dq_stride", ctypes.c_int64 * 3), ("dk_stride", ctypes.c_int64 * 3), ("dv_stride", ctypes.c_int64 * 3),
        ("partials", ctypes.c_void_p), ("amx", ctypes.c_int64), ("band", ctypes.c_int64),
    ]


def _strides(x: Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 3)(*x.stride()[:3])


def _operand(x: Tensor) -> Tensor:
    """x with its last dimension contiguous and even strides (the kernel reads bf16 pairs)."""
    if x.stride(-1) != 1 or any(s % 2 for s in x.stride()[:3]) or x.storage_offset() % 2:
        x = x.contiguous()
    return x


def _check(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slopes: Tensor | None) -> None:
    if any(x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() != 4 for x in (q, k, v)):
        raise ValueError(f"q, k and v must be bf16 CPU tensors of 4 dimensions, got {q.dtype} {tuple(q.shape)}, "
                         f"{k.dtype} {tuple(k.shape)}, {v.dtype} {tuple(v.shape)}")
    B, H, T, D = q.shape
    K = k.shape[1]
    if k.shape != (B, K, T, D) or v.shape != k.shape or K == 0 or H % K:
        raise ValueError(f"k and v must be (B, K, T, D) = ({B}, K, {T}, {D}) with K dividing {H} query heads, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if not head_size_supported(D):
        raise ValueError(f"the attention kernel takes heads of a multiple of 16 up to {MAX_HEAD}, got {D}")
    if positions.dim() != 2 or positions.shape[0] not in (1, B) or positions.shape[1] != T:
        raise ValueError(f"positions must be (1, {T}) or ({B}, {T}), got {tuple(positions.shape)}")
    if slopes is not None and slopes.shape != (H,):
        raise ValueError(f"slopes must be ({H},), got {tuple(slopes.shape)}")


def _common(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slopes: Tensor | None, scale: float,
            keep: list[Tensor]) -> _Args:
    B, H, T, D = q.shape
    positions = positions.to(torch.float32).contiguous()
    keep.append(positions)
    if slopes is not None:
        slopes = slopes.to(torch.float32).contiguous()
        keep.append(slopes)
    return _Args(B=B, H=H, K=k.shape[1], T=T, D=D, q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                 q_stride=_strides(q), k_stride=_strides(k), v_stride=_strides(v),
                 positions=positions.data_ptr(), positions_stride=T if positions.shape[0] > 1 else 0,
                 slopes=None if slopes is None else slopes.data_ptr(), scale=scale,
                 amx=int(D % AMX_HEAD_MULTIPLE == 0 and amx_tiles()))


def _padded(T: int) -> int:
    return -(-T // TILE) * TILE


def _run(function: ctypes._CFuncPtr, args: _Args) -> None:
    if function(ctypes.byref(args)) != 0:
        raise MemoryError("no memory for the attention kernel's per-thread scratch")


@torch.library.custom_op("andromeda::causal_attention", mutates_args=(), device_types="cpu")
def _attention_op(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slopes: Tensor | None,
                  scale: float) -> tuple[Tensor, Tensor]:
    _check(q, k, v, positions, slopes)
    q, k, v = _operand(q), _operand(k), _operand(v)
    B, H, T, D = q.shape
    keep: list[Tensor] = []
    args = _common(q, k, v, positions, slopes, scale, keep)
    out = q.new_empty(B, T, H, D).transpose(1, 2)  # (B, H, T, D) whose (B, T, H * D) view is free
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    packed = q.new_empty(2 * B * k.shape[1] * _padded(T) * D)
    args.out, args.out_stride, args.lse, args.packed = out.data_ptr(), _strides(out), lse.data_ptr(), packed.data_ptr()
    _run(_kernels()[0], args)
    return out, lse


@_attention_op.register_fake
def _attention_shape(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slopes: Tensor | None,
                     scale: float) -> tuple[Tensor, Tensor]:
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty(B, H, T, dtype=torch.float32)


def tasks_per_kv_head(B: int, K: int) -> bool:
    """Whether the backward's tasks are key/value heads, each summing its group's dK and dV in place,
    where B x K tasks share out evenly over the threads (a multiple of them, or at least 4 each): no
    float32 partials per query head (2 B H T D floats, 100 MB at the 2.5 B's shapes and 4 x 1,024
    tokens) and no pass summing them; the backward 1.33-1.37x faster there at one thread (1.1-1.24x at
    dim 512; `benchmarks/bench_attention.py`). Else a task per query head. The two sum dK and dV in
    another float32 order, so those bits follow the thread count (one thread count, one result)."""
    tasks, threads = B * K, torch.get_num_threads()
    return tasks % threads == 0 or tasks >= 4 * threads


BAND_BYTES = 2 << 20  # the AMX backward's kept score gradients, per thread


def backward_band(T: int) -> int:
    """How many key tiles' score gradients (dS^T against every query tile, 8 KiB a tile pair) the AMX
    backward keeps to take dQ as one product per query tile over them: as many as fit BAND_BYTES at
    this length (all of them up to 1,024 tokens), at least one. Any band gives the same bits."""
    tiles = _padded(T) // TILE
    return max(1, min(tiles, BAND_BYTES // max(1, tiles * TILE * TILE * 2)))


@torch.library.custom_op("andromeda::causal_attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           positions: Tensor, slopes: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = _operand(q), _operand(k), _operand(v)
    grad, out = _operand(grad.to(torch.bfloat16)), _operand(out)
    lse = lse.to(torch.float32).contiguous()  # read as (B, H, T)
    B, H, T, D = q.shape
    K = k.shape[1]
    keep: list[Tensor] = []
    args = _common(q, k, v, positions, slopes, scale, keep)
    dq = q.new_empty(B, T, H, D).transpose(1, 2)
    dk, dv = k.new_empty(B, T, K, D).transpose(1, 2), v.new_empty(B, T, K, D).transpose(1, 2)
    packed = q.new_empty(3 * B * K * _padded(T) * D)
    partials = None if tasks_per_kv_head(B, K) else q.new_empty(2 * B * H * _padded(T) * D, dtype=torch.float32)
    args.out, args.out_stride, args.lse, args.packed = out.data_ptr(), _strides(out), lse.data_ptr(), packed.data_ptr()
    args.dout, args.dout_stride = grad.data_ptr(), _strides(grad)
    args.dq, args.dk, args.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    args.dq_stride, args.dk_stride, args.dv_stride = _strides(dq), _strides(dk), _strides(dv)
    args.partials = None if partials is None else partials.data_ptr()
    args.band = backward_band(T)
    _run(_kernels()[1], args)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _attention_backward_shape(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              positions: Tensor, slopes: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    B, H, T, D = q.shape
    K = k.shape[1]
    return (q.new_empty(B, T, H, D).transpose(1, 2), k.new_empty(B, T, K, D).transpose(1, 2),
            v.new_empty(B, T, K, D).transpose(1, 2))


def _save(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, positions, slopes, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], positions, slopes)
    ctx.scale = scale


def _backward(ctx, grad: Tensor, grad_lse: Tensor | None) -> tuple:
    q, k, v, out, lse, positions, slopes = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad, q, k, v, out, lse, positions, slopes, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_backward, setup_context=_save)


class _PrologueArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("B", "T", "H", "K", "D", "R")] + [
        (name, ctypes.c_void_p) for name in ("qkv", "q_scale", "k_scale", "q_cos", "q_sin", "k_cos", "k_sin")] + [
        ("table_stride", ctypes.c_int64), ("eps", ctypes.c_float),
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("dq", ctypes.c_void_p), ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p),
        ("dq_stride", ctypes.c_int64 * 3), ("dk_stride", ctypes.c_int64 * 3), ("dv_stride", ctypes.c_int64 * 3),
        ("dqkv", ctypes.c_void_p), ("dscale", ctypes.c_void_p),
    ]


def prologue_fits(dim_head: int, rotary_dim: int) -> bool:
    """Whether the prologue kernel takes heads of this size rotated over this many channels: both
    multiples of 16 (its vectors), the head at most 256."""
    return head_size_supported(dim_head) and rotary_dim % 16 == 0 and 0 < rotary_dim <= dim_head


def attention_prologue(qkv: Tensor, q_scale: Tensor, k_scale: Tensor,
                       rotary: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]], eps: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """`model.attention.AttentionPrologue` by the C kernel, through its op: qkv (B, T, H + 2K, D)
    bf16, the QK-norm scales (H, 1, D) and (K, 1, D) float32, the query's and key's rotary tables
    ((cos, sin), (cos, sin)) each (B or 1, 1, T, R / 2) float32 -> q (B, H, T, D), k and v
    (B, K, T, D) bf16, as l2_normalize, the scales and apply_rotary give them and attention casts them."""
    (q_cos, q_sin), (k_cos, k_sin) = rotary
    return _prologue_op(qkv, q_scale, k_scale, q_cos, q_sin, k_cos, k_sin, eps)


def _prologue_common(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, tables: tuple[Tensor, ...], eps: float,
                     keep: list[Tensor]) -> _PrologueArgs:
    if qkv.dim() != 4 or q_scale.dim() != 3 or k_scale.dim() != 3:
        raise ValueError(f"the attention prologue takes qkv (B, T, H + 2K, D) and scales (H, 1, D) and (K, 1, D), got "
                         f"{tuple(qkv.shape)}, {tuple(q_scale.shape)} and {tuple(k_scale.shape)}")
    B, T, heads, D = qkv.shape
    H, K = q_scale.shape[0], k_scale.shape[0]
    R = 2 * tables[0].shape[-1]
    if (qkv.dtype != torch.bfloat16 or not qkv.is_contiguous() or heads != H + 2 * K or not prologue_fits(D, R)
            or q_scale.shape != (H, 1, D) or k_scale.shape != (K, 1, D)):
        raise ValueError(f"the attention prologue takes a contiguous bf16 qkv (B, T, H + 2K, D) with scales (H, 1, D) "
                         f"and (K, 1, D) and heads and rotated channels of a multiple of 16, got qkv {qkv.dtype} "
                         f"{tuple(qkv.shape)}, scales {tuple(q_scale.shape)} {tuple(k_scale.shape)}, {R} rotated")
    if q_scale.dtype != torch.float32 or k_scale.dtype != torch.float32:
        raise ValueError(f"the attention prologue takes float32 scales (as CPU autocast leaves them), got "
                         f"{q_scale.dtype} and {k_scale.dtype}")
    if any(t.shape not in ((1, 1, T, R // 2), (B, 1, T, R // 2)) or t.dtype != torch.float32 for t in tables):
        raise ValueError(f"the attention prologue's rotary tables must be float32 (1 or {B}, 1, {T}, R / 2) with one "
                         f"R, got {[(t.dtype, tuple(t.shape)) for t in tables]}")
    scales = [s.contiguous() for s in (q_scale, k_scale)]
    shared = all(t.shape[0] == 1 for t in tables)
    rows = 1 if shared else B
    flat = [t.expand(rows, 1, T, R // 2).reshape(rows, T, R // 2).contiguous() for t in tables]
    keep += scales + flat
    return _PrologueArgs(B=B, T=T, H=H, K=K, D=D, R=R, qkv=qkv.data_ptr(), q_scale=scales[0].data_ptr(),
                         k_scale=scales[1].data_ptr(), q_cos=flat[0].data_ptr(), q_sin=flat[1].data_ptr(),
                         k_cos=flat[2].data_ptr(), k_sin=flat[3].data_ptr(),
                         table_stride=0 if shared else T * R // 2, eps=eps)


@torch.library.custom_op("andromeda::attention_prologue", mutates_args=(), device_types="cpu")
def _prologue_op(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, q_cos: Tensor, q_sin: Tensor, k_cos: Tensor,
                 k_sin: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    keep: list[Tensor] = []
    args = _prologue_common(qkv, q_scale, k_scale, (q_cos, q_sin, k_cos, k_sin), eps, keep)
    q, k, v = _prologue_shape(qkv, q_scale, k_scale, q_cos, q_sin, k_cos, k_sin, eps)
    args.q, args.k, args.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    _prologue_kernels()[0](ctypes.byref(args))
    return q, k, v


@_prologue_op.register_fake
def _prologue_shape(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, q_cos: Tensor, q_sin: Tensor, k_cos: Tensor,
                    k_sin: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    B, T, _, D = qkv.shape
    H, K = q_scale.shape[0], k_scale.shape[0]
    # (B, T, heads, D) memory seen as (B, heads, T, D): the layout the attention kernel reads in place
    return (qkv.new_empty(B, T, H, D).transpose(1, 2), qkv.new_empty(B, T, K, D).transpose(1, 2),
            qkv.new_empty(B, T, K, D).transpose(1, 2))


@torch.library.custom_op("andromeda::attention_prologue_backward", mutates_args=(), device_types="cpu")
def _prologue_backward_op(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_scale: Tensor, k_scale: Tensor,
                          q_cos: Tensor, q_sin: Tensor, k_cos: Tensor, k_sin: Tensor,
                          eps: float) -> tuple[Tensor, Tensor, Tensor]:
    keep: list[Tensor] = []
    args = _prologue_common(qkv, q_scale, k_scale, (q_cos, q_sin, k_cos, k_sin), eps, keep)
    dq, dk, dv = (_operand(g.to(torch.bfloat16)) for g in (dq, dk, dv))
    dqkv = torch.empty_like(qkv)
    dscale = torch.zeros(args.H + args.K, args.D, dtype=torch.float32)
    args.dq, args.dk, args.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    args.dq_stride, args.dk_stride, args.dv_stride = _strides(dq), _strides(dk), _strides(dv)
    args.dqkv, args.dscale = dqkv.data_ptr(), dscale.data_ptr()
    if _prologue_kernels()[1](ctypes.byref(args)) != 0:
        raise MemoryError("no memory for the attention prologue's per-thread sums")
    # the query scales' part copied: a custom op's outputs must not share memory
    return dqkv, dscale[:args.H].view(q_scale.shape).clone(), dscale[args.H:].view(k_scale.shape)


@_prologue_backward_op.register_fake
def _prologue_backward_shape(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_scale: Tensor, k_scale: Tensor,
                             q_cos: Tensor, q_sin: Tensor, k_cos: Tensor, k_sin: Tensor,
                             eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(qkv), torch.empty_like(q_scale), torch.empty_like(k_scale)


def _prologue_save(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    *tensors, eps = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps = eps


def _prologue_backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor) -> tuple:
    dqkv, dq_scale, dk_scale = _prologue_backward_op(dq, dk, dv, *ctx.saved_tensors, ctx.eps)
    return dqkv, dq_scale, dk_scale, None, None, None, None, None


_prologue_op.register_autograd(_prologue_backward, setup_context=_prologue_save)


def attention_kernel() -> CausalAttention | None:
    """The kernel as a `CausalAttention`, or None where it cannot run (the reason is logged)."""
    return LIBRARY.offer(causal_attention, "attention runs in PyTorch's SDPA")


def use_attention_kernel(model: nn.Module) -> bool:
    """Give every `Transformer` in `model` whose head size the kernel takes the attention kernel,
    where it can run; returns whether any took it. Only bf16 attention on the CPU uses it."""
    kernel = attention_kernel()
    given = False
    for module in model.modules():
        if kernel is not None and isinstance(module, Transformer) and head_size_supported(module.config.dim_head):
            module.causal_attention = kernel
            config = module.config
            if config.use_qk_norm and config.attn_qk_norm_dim_scale and config.rotary_xpos and prologue_fits(
                    config.dim_head, config.rotary_dim):
                module.attention_prologue = attention_prologue
            given = True
    return given


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (no AVX-512 BF16, no C compiler, a failed build), or None."""
    return LIBRARY.unavailable_reason()


@cache
def _library_path() -> Path:
    """The kernel's library, with its AMX path where the compiler has the flags."""
    try:
        return build_library(SOURCE, FLAGS + AMX_FLAGS)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        log.info("attention kernel built without AMX: %s", detail.strip()[:300])
        return build_library(SOURCE, FLAGS)


@cache
def amx_tiles() -> bool:
    """Whether the kernel's products run on AMX tiles here (Sapphire Rapids on, for heads of a
    multiple of 32): built with them and granted them by Linux; else AVX-512 BF16's vdpbf16ps."""
    if not cpu_has(AMX_BF16_FLAGS) or unavailable_reason() is not None:
        return False
    return bool(LIBRARY.function("andromeda_flash_amx", [])())


def _kernels() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    return tuple(LIBRARY.function(name, [ctypes.POINTER(_Args)])
                 for name in ("andromeda_flash_forward", "andromeda_flash_backward"))


def _prologue_kernels() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    arguments = [ctypes.POINTER(_PrologueArgs)]
    return (LIBRARY.function("andromeda_prologue_forward", arguments, None),
            LIBRARY.function("andromeda_prologue_backward", arguments))
