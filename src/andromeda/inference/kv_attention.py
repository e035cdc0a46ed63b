"""Decode attention straight from an int8 KV cache on the CPU: a small C kernel, and its PyTorch
reference.

Reading an int8 cache the PyTorch way (`model.cache.CacheStep.read_layer`) dequantizes every row
read to the compute dtype and multiplies the keys by their xPos factors, in every layer, before the
fused attention kernel runs: at 8k context that pass costs several times the attention itself,
since no PyTorch attention kernel reads int8. `kernels/attention_int8.c` reads the int8 keys and
values as stored instead, for a call of one new position per row (decoding), and computes per
row b, key/value head h and each of its G query heads g (`kv_heads` grouping: every key is read
once for its G heads), over the key columns j the query may read (`attention.additive_bias`'s
mask: valid, at a position p_j <= i, inside a sliding window):

    s[g, j] = scale * kscale_j * sum_d q[g, d] f_d(p_j) kq_j[d] - slope_g * (i - p_j)
    out[g]  = sum_j softmax_j(s[g]) * vscale_j * vq_j

with f_d the xPos factor of rotary channel d, zeta_d^-((p - center) / base) (`KVCache._key_factors`;
the readable keys lie within `reach` of the center, where its cap never applies), 1 on the other
channels; a row that may read nothing averages all its columns' values, as the additive bias makes
today's path do. The factor is exponential in the position: for a block of keys at consecutive
positions p0 + j it is f_d(p0) exp(rate_d j), so f_d(p0) goes into the queries once per block and
the keys are multiplied by one shared table (a block with a gap, at a ring buffer's wrap or
padding, gets each key's factors exactly). The arithmetic is float32, so the kernel differs from
the dequantize-then-SDPA path by rounding only (that path rounds keys, factors and ALiBi biases to
the compute dtype first); where AMX tiles are there (`AMX_CPU_FLAGS`: Sapphire Rapids on), a bf16
model with 9 to 16 query heads per kv head and a head size that is a multiple of 32 takes the
products q.k from them, its queries and keys times factors rounded to bf16 as its SDPA path
rounds them, and the weighted values: each block's weights coded in 16 bits (two u8 tiles, to
2^-16 of the block's largest) against the int8 values as stored, summed in int32 (AMX-INT8), the
same as the float32 path's but for last-bit roundings (tested). Work is split over (rows x kv heads x column ranges), flash-decoding style, with one
pass combining the ranges' softmax sums, so threads share one row; within a range a head's running
max is raised lazily (only when a block beats it by e^8), so the weighted values already summed
are rarely rescaled. `decode_attention_reference` computes the same in PyTorch (float32
throughout); the tests hold the kernel to it.

The same object stores a decode step's keys and values (`Int8DecodeAttention.store`,
`kernels/kv_store.c`): quantized exactly as `CacheStep.store`'s PyTorch path quantizes them (keys
times their inverse xPos factors, absmax scales rounded to the compute dtype, codes rounded half to
even), bit for bit, in one call a layer where that path takes about twenty small ops.

The kernel reaches the model by injection: `decode_attention_for(cache)` is given to the cache by
the inference code that builds it (`generate.generation_cache`, the server's runner), and the
cache hands it to attention for the calls it applies to (`model.cache.DecodeAttention`). Where it
cannot run (no AVX-512, no C compiler, a failed build, a dtype other than bf16 and fp32, not the
CPU) `decode_attention_for` is None and attention reads the cache as before.

Build: as `native.py`'s VNNI kernels, compiled with the system's C compiler into
`$ANDROMEDA_CACHE/kernels`, named by a hash of source and flags (`native.build_library`), loaded with ctypes (a call releases the GIL), running its loops on PyTorch's
OpenMP runtime (`torch.set_num_threads` governs it).
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.attention import additive_bias
from ..model.cache import CacheStep, KVCache
from ..model.positions import alibi_bias, xpos_scale
from .native import AMX_FLAGS, build_library, cpu_flags, missing_support

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "attention_int8.c"
STORE_SOURCE = Path(__file__).parent / "kernels" / "kv_store.c"  # a decode step's keys and values into the cache
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp", "-shared", "-fPIC",
         "-std=gnu11", "-lm")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16")  # bf16 models: scores and values by AMX tiles
INT8_AMX_FLAGS = ("-mamx-int8",)  # with native.AMX_FLAGS: the values' products (TDPBUSD)
KERNEL_DTYPES = (torch.bfloat16, torch.float32)  # compute dtypes (and so scale dtypes) the kernel reads
AMX_HEADS = 16  # query heads per kv head one tile's columns hold
LANES_FROM = 8  # more query heads per kv head than this: the kernel computes scores with heads in lanes, or AMX
CHANNELS = 16  # float32 lanes of one AVX-512 vector: the kernel's query rows are padded to a multiple
BLOCK_COLUMNS = 128  # readable key columns one softmax block of the kernel holds at most (MAX_BLOCK)


class _Args(ctypes.Structure):
    """The kernel's argument block (`Args` in attention_int8.c), field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("rows", "kv_heads", "groups", "dim", "padded_dim", "rotary_dim", "columns", "read")] + [
        ("q", ctypes.c_void_p), ("q_row_stride", ctypes.c_int64), ("q_head_stride", ctypes.c_int64),
        ("bf16_io", ctypes.c_int64), ("scale", ctypes.c_float), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p), ("bf16_scales", ctypes.c_int64),
        ("amx", ctypes.c_int64), ("slots", ctypes.c_void_p), ("positions", ctypes.c_void_p), ("valid", ctypes.c_void_p),
        ("q_pos", ctypes.c_void_p), ("centers", ctypes.c_void_p), ("rates", ctypes.c_void_p),
        ("powers", ctypes.c_void_p), ("powers_rows", ctypes.c_int64), ("slopes", ctypes.c_void_p), ("window", ctypes.c_int64), ("sinks", ctypes.c_int64), ("out", ctypes.c_void_p)]


class _StoreArgs(ctypes.Structure):  # kv_store.c's StoreArgs
    _fields_ = [(name, ctypes.c_int64) for name in ("rows", "heads", "dim", "rotary")] + [
        ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("bf16_k", ctypes.c_int64), ("bf16_v", ctypes.c_int64)] + [
        (name, ctypes.c_int64) for name in ("k_row_stride", "k_head_stride", "v_row_stride", "v_head_stride")] + [
        (name, ctypes.c_void_p) for name in ("factors", "k_out", "v_out", "k_scale", "v_scale")] + [
        ("bf16_scales", ctypes.c_int64), ("columns", ctypes.c_int64), ("slots", ctypes.c_void_p),
        ("cols", ctypes.c_void_p)]


def decode_attention_for(kv_cache: KVCache) -> Int8DecodeAttention | None:
    """The decode-attention kernel for `kv_cache` (give it as the cache's `decode_attention`), or
    None where the cache is read the PyTorch way: not int8, not on the CPU, a compute dtype the
    kernel does not read, or no kernel here (`unavailable_reason`)."""
    if not kv_cache.quantized or kv_cache.k.device.type != "cpu" or kv_cache.dtype not in KERNEL_DTYPES:
        return None
    if _kernel() is None:
        return None
    return Int8DecodeAttention()


class Int8DecodeAttention:
    """`model.cache.DecodeAttention` for an int8 cache on the CPU, through the C kernel. What is the
    same in every layer of a call (slots, positions, centers, slopes) is prepared by its first
    layer; each layer then sets only its pointers (tens of microseconds a call less)."""

    def __init__(self, amx: bool = True) -> None:
        """amx: a bf16 cache's scores by AMX tiles where the CPU has them (module docstring)."""
        self.amx = amx
        self._store_step: CacheStep | None = None  # the call `_store_args` was built for
        self._store_args = _StoreArgs()
        self._store_alive: tuple = ()
        self._step: CacheStep | None = None
        self._args = _Args()
        self._alive: tuple = ()  # the tensors the argument block points into

    def __call__(self, step: CacheStep, layer: int, q: Tensor, slopes: Tensor | None, scale: float) -> Tensor:
        kv_cache = step.cache
        B, H, _, D = q.shape
        args = self._prepare(step, slopes, H)
        if q.dtype not in KERNEL_DTYPES or q.stride(-1) != 1:
            q = q.float().contiguous()
        out = torch.empty(B, H, 1, D, dtype=q.dtype)
        args.q, args.q_row_stride, args.q_head_stride = q.data_ptr(), q.stride(0), q.stride(1)
        args.bf16_io, args.scale, args.out = q.dtype == torch.bfloat16, scale, out.data_ptr()
        args.k, args.v, args.k_scale, args.v_scale = (tensor.data_ptr() + layer * tensor.stride(0) * tensor.element_size()
                                                      for tensor in kv_cache.storage)
        status = _run(args)
        if status:
            raise RuntimeError(f"the int8 decode-attention kernel refused its arguments (status {status}): "
                               f"{H // args.kv_heads} query heads per kv head, head size {D}, {step.read} columns read")
        return out

    def store(self, step: CacheStep, layer: int, k: Tensor, v: Tensor) -> None:
        """Write `layer`'s new keys and values (B, K, 1, D), quantized with their xPos inverse
        factors as `CacheStep.store`'s PyTorch path does (kv_store.c, bit for bit), in one call."""
        if self._store_step is not step:  # what every layer of this call shares
            factors = None if step.xpos_factors is None else step.xpos_factors[0].contiguous()  # (B, 1, 1, R)
            slots, columns = step.index.to(torch.long).contiguous(), step.columns[:, 0].to(torch.long).contiguous()
            kv_cache = step.cache
            self._store_args = _StoreArgs(
                rows=len(slots), heads=kv_cache.k.shape[2], dim=kv_cache.k.shape[-1],
                rotary=0 if factors is None else factors.shape[-1],
                factors=None if factors is None else factors.data_ptr(),
                bf16_scales=kv_cache.dtype == torch.bfloat16, columns=kv_cache.k.shape[3],
                slots=slots.data_ptr(), cols=columns.data_ptr())
            self._store_step, self._store_alive = step, (factors, slots, columns)
        args = self._store_args
        if k.dtype not in KERNEL_DTYPES or k.stride(-1) != 1:
            k = k.float().contiguous()
        if v.dtype not in KERNEL_DTYPES or v.stride(-1) != 1:
            v = v.float().contiguous()
        args.k, args.bf16_k, args.k_row_stride, args.k_head_stride = (k.data_ptr(), k.dtype == torch.bfloat16,
                                                                      k.stride(0), k.stride(1))
        args.v, args.bf16_v, args.v_row_stride, args.v_head_stride = (v.data_ptr(), v.dtype == torch.bfloat16,
                                                                      v.stride(0), v.stride(1))
        args.k_out, args.v_out, args.k_scale, args.v_scale = (
            tensor.data_ptr() + layer * tensor.stride(0) * tensor.element_size() for tensor in step.cache.storage)
        status = _store_kernel()(ctypes.byref(args))
        if status:
            raise RuntimeError(f"the int8 KV store kernel refused its arguments (status {status}): head size "
                               f"{args.dim}")

    def _prepare(self, step: CacheStep, slopes: Tensor | None, heads: int) -> _Args:
        """The argument block with this call's shared fields (built by its first layer)."""
        if step is self._step:
            return self._args
        kv_cache, config = step.cache, step.cache.config
        K, D = kv_cache.k.shape[2], kv_cache.k.shape[-1]
        slots = step.index.to(torch.long).contiguous()
        q_pos = step.q_pos[:, 0].to(torch.long).contiguous()
        centers = step.center.reshape(-1).to(torch.float32).contiguous()
        rates = xpos_rates(config.rotary_dim, config.xpos_scale_base) if config.rotary_xpos else None
        powers = xpos_powers(config.rotary_dim, config.xpos_scale_base) if config.rotary_xpos else None
        slopes = None if slopes is None else slopes.float().contiguous()
        args = _Args(rows=len(slots), kv_heads=K, groups=heads // K, dim=D, padded_dim=D + -D % CHANNELS,
                     rotary_dim=config.rotary_dim if rates is not None else 0, columns=kv_cache.k.shape[3],
                     read=step.read, bf16_scales=kv_cache.dtype == torch.bfloat16, slots=slots.data_ptr(),
                     amx=self.amx and kv_cache.dtype == torch.bfloat16 and LANES_FROM < heads // K <= AMX_HEADS
                     and D % 32 == 0 and _amx_ready(),
                     positions=kv_cache.positions.data_ptr(), valid=kv_cache.valid.data_ptr(),
                     q_pos=q_pos.data_ptr(), centers=centers.data_ptr(),
                     rates=None if rates is None else rates.data_ptr(),
                     powers=None if powers is None else powers.data_ptr(), powers_rows=BLOCK_COLUMNS,
                     slopes=None if slopes is None else slopes.data_ptr(),
                     window=step.window[0] if step.window else 0, sinks=step.window[1] if step.window else 0)
        self._step, self._args, self._alive = step, args, (slots, q_pos, centers, rates, powers, slopes)
        return args


def _run(args: _Args) -> int:
    """Call the kernel, named in a running torch.profiler (a ctypes call is invisible to it)."""
    if torch._C._autograd._profiler_enabled():
        with torch.profiler.record_function("andromeda::int8_decode_attention"):
            return _kernel()(ctypes.byref(args))
    return _kernel()(ctypes.byref(args))


@cache
def xpos_rates(rotary_dim: int, scale_base: float) -> Tensor:
    """ln(1 / zeta_d) / scale_base per rotary channel d, (R,) float64: the key factor of position p
    around center c is exp(rate_d * (p - c)). zeta is `positions.xpos_scale`'s own, read back as
    its power (scale_base - 0) / scale_base = 1."""
    zeta = xpos_scale(torch.tensor([[scale_base]]), rotary_dim, scale_base, 0).flatten()  # (R/2,) float32
    rates = (-zeta.double().log() / scale_base).repeat_interleave(2)  # pairs: adjacent channels
    return F.pad(rates, (0, -rotary_dim % CHANNELS)).contiguous()  # 0 past R: factors of 1


@cache
def xpos_powers(rotary_dim: int, scale_base: float) -> Tensor:
    """exp(rate_d * j) for the first BLOCK_COLUMNS offsets j of a block of keys at consecutive
    positions, (BLOCK_COLUMNS, R rounded up to 16) float32 (powers taken in float64): the keys'
    factors relative to the block's first, made once per shape instead of in every call."""
    offsets = torch.arange(BLOCK_COLUMNS, dtype=torch.float64)[:, None]
    return (offsets * xpos_rates(rotary_dim, scale_base)).exp().float().contiguous()


def decode_attention_reference(step: CacheStep, layer: int, q: Tensor, slopes: Tensor | None,
                               scale: float) -> Tensor:
    """What the kernel computes, in PyTorch, float32 throughout: (B, H, 1, D) in q's dtype."""
    kv_cache = step.cache
    B, H, _, D = q.shape
    K = kv_cache.k.shape[2]
    keys, values = ((stored[layer][step.rows, :, : step.read].float() * scales[layer][step.rows, :, : step.read].float())
                    for stored, scales in ((kv_cache.k, kv_cache.k_scale), (kv_cache.v, kv_cache.v_scale)))
    if kv_cache.config.rotary_xpos:
        factors = kv_cache._key_factors(step.k_pos, step.center, torch.float32)  # (B, 1, S, R)
        keys[..., : factors.shape[-1]] *= factors
    scores = torch.einsum("bkgd,bksd->bkgs", q.float().view(B, K, H // K, D) * scale, keys)  # (B, K, G, S)
    bias = additive_bias(step.q_pos, step.k_pos, step.k_valid, None, step.window, torch.float32)  # (B, 1, 1, S)
    if slopes is not None:
        bias = bias + alibi_bias(slopes.float(), step.q_pos, step.k_pos)  # (B, H, 1, S)
    scores = scores + (bias.view(B, K, H // K, -1) if bias.shape[1] > 1 else bias.view(B, 1, 1, -1))
    out = torch.einsum("bkgs,bksd->bkgd", scores.softmax(dim=-1), values)  # (B, K, G, D)
    return out.to(q.dtype).view(B, H, 1, D)


@cache
def _kernel() -> ctypes._CFuncPtr | None:
    """The kernel's entry point, or None where it cannot run (`unavailable_reason`)."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("int8 decode-attention kernel not used: %s; an int8 KV cache is dequantized for SDPA", reason)
        return None
    function = _library().andromeda_int8_decode_attention
    function.argtypes = [ctypes.POINTER(_Args)]
    function.restype = ctypes.c_int
    return function


@cache
def _store_kernel() -> ctypes._CFuncPtr:
    """kv_store.c's entry point (built with the attention kernel's flags, where that one runs)."""
    function = ctypes.CDLL(str(build_library(STORE_SOURCE, FLAGS))).andromeda_int8_kv_store
    function.argtypes = [ctypes.POINTER(_StoreArgs)]
    function.restype = ctypes.c_int
    return function


@cache
def _amx_ready() -> bool:
    """Whether the CPU has AMX bf16 tiles and the kernel may use them (Linux grants per process)."""
    flags = cpu_flags() or frozenset()
    return all(flag in flags for flag in AMX_CPU_FLAGS) and _kernel() is not None and \
        bool(_library().andromeda_amx_ready())


@cache
def _library() -> ctypes.CDLL:
    return ctypes.CDLL(str(_library_path()))


@cache
def _library_path() -> Path:
    """The kernel built with the AMX flags, or without them where the compiler lacks them (the
    C file then leaves its AMX path out)."""
    try:
        return build_library(SOURCE, FLAGS + AMX_FLAGS + INT8_AMX_FLAGS)
    except subprocess.CalledProcessError:
        return build_library(SOURCE, FLAGS)


@cache
def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (no AVX-512, no compiler, a failed build), or None."""
    return missing_support(CPU_FLAGS, SOURCE, _library_path) or missing_support(CPU_FLAGS, STORE_SOURCE, _store_kernel)
