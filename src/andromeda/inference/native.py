"""A small C file of int8 and int4 decoding kernels with AVX-512 VNNI, built on first use, and
their PyTorch references.

ATen's int8 and int4 kernels (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`)
convert every weight to floating point and are compute-bound at about half the memory bandwidth
on one core; PyTorch ships no x86 product of 4-bit weights with integer dot products (torchao's
CPU kernels are not in its PyPI wheels), and its fbgemm int8 path needs deprecated quantized
tensors, a repacked copy of every weight (8 ns a weight to pack) and one activation range for
the whole batch. So the project has one hand-written file, `kernels/vnni.c`, for a few rows
(decoding), reading the weights as stored:

- each activation row is quantized to int8 with one scale a = max|x| / 127 (round half to even),
  so a row's result never depends on the others in its batch;
- int8 (`int8_rows`): the weight in the row-tile layout (`to_row_tiles`), one scale per row; VNNI
  multiplies unsigned by signed bytes, so the activations go in shifted by 128 and each row's
  weight sum (`wsum`, computed once) takes the shift back out:
  y[m, n] = a[m] * scale[n] * (sum_k (xq[m, k] + 128) W[n, k] - 128 * wsum[n]);
- int4 (`int4_rows`): 4-bit codes q (a code's value is (q - 8) * scale + zero per group) in
  blocks of 128 inputs (64 bytes), in row tiles (`to_kernel_layout`); per
  group the integer dot products of the centred codes with the activations (VNNI: codes
  unsigned, activations signed, less 8 times the sum of the activation codes) are scaled by the
  group's scale, and its zero multiplies the exact float sum of the group's activations (X):
  y[m, n] = a[m] * sum_g scale[n, g] * sum_{k in g} xq[m, k] (q[n, k] - 8) + sum_g zero[n, g] X[m, g].
  Centring the codes keeps the activations' rounding error times q - 8 (about +-4), not q (7.5
  on average): on a tiny random model it cut the logits' error from 4.3% to 1.6% RMS. Scales
  and zeros are read in float32 or, a bf16 model's own, in bfloat16 (exact; 6% fewer bytes a row).

The row-tile layout (`to_row_tiles`, also the bf16 kernel's): rows in tiles (of 4, 8 for int8), rows
past N zeros, a tile's 64-byte blocks in input order, each block as its rows' 64 bytes one after
another, so a kernel reads each tile as one stream front to back. On an AMD EPYC (Zen 4, 2
threads) that reads at the machine's float32-sum probe, where 8-16 plain rows read side by side
(one stream each) reached 75-85% of it in its fast minutes.

Both read x and write y in bf16 or float32 (bf16 rows are exact in float32; the result, plus an
optional float32 bias, is rounded to bf16 as torch rounds): a decode step's product is one call,
with no conversions or bias add around it.

`int8_rows_reference` and `int4_rows_reference` compute the same in PyTorch; the tests hold the
kernels to them.

Build: the C file is compiled with the system's C compiler (`$CC`, else cc) into
`$ANDROMEDA_CACHE/kernels` (default ~/.cache/andromeda/kernels), named by a hash of the source and
the flags, in about a second, and loaded with ctypes (a call releases the GIL). It runs its
loops on PyTorch's own OpenMP runtime (the same libgomp.so.1, already loaded), so
`torch.set_num_threads` governs it. Where the CPU lacks AVX-512 VNNI or the build fails,
`kernels()` is None and the callers keep ATen's kernels (`unavailable_reason` says why).

Under torch.compile the products are the custom ops `andromeda::int8_rows` and
`andromeda::int4_rows` (`torch.library`: a fake implementation that gives the (M, N) shape in x's
dtype, and a CPU one that calls the kernel), so a decode step compiles as one graph (fullgraph)
with the kernels in it. The CPU implementations are C++ (`kernels/ops.cpp`, built with vnni.c
against the installed torch's headers by the system's C++ compiler, ~10 s once, cached like the
kernels, loaded with `torch.ops.load_library`): a compiled step reaches them through the dispatcher
with no Python in between. Where that build fails (no C++ compiler, no torch headers) the same ops
are registered in Python over the ctypes calls, a few microseconds a call slower; `kernels()`
registers one or the other, so the ops run once it has returned a kernel set. Eager calls take the
C++ op too where it is built (fewer microseconds a call than ctypes), else ctypes directly. The
profiler shows the kernels under the ops' names either way.

The same library holds a third op, `andromeda::decode_sdpa` (`kernels/decode_sdpa.c`): the
attention of a decoding step, G query heads per key/value head over its keys and values with an
additive mask, as F.scaled_dot_product_attention computes it. ATen's CPU flash kernel spends tens
of microseconds a call whatever the keys (packing, work splitting), which at a short context is
most of a step's attention, a compiled step reads its whole cache, mostly unwritten, and at long
contexts it reads keys and values at about half the memory bandwidth. The op reads only the
columns some head may attend to: bf16 by AMX tiles where the CPU has them (`decode_sdpa_amx`; its
file is compiled with the AMX flags where the compiler takes them), at any context; otherwise in
float32 FMAs, handing a call over to ATen's SDPA past `DECODE_SDPA_COLUMNS` readable columns or
where its shapes do not fit. `decode_sdpa_for(cache)` gives it to a CPU cache
(`model.cache.DecodeSDPA`); where ops.cpp did not build the op is registered as PyTorch's SDPA and
no cache is given it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..folders import cache_root
from ..model.cache import KVCache
from .huge_pages import empty_in_huge_pages

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "vnni.c"
# -ffp-contract=off: a product then a sum written apart stay two roundings (the dequantizers'
# weights are PyTorch's bit for bit; GNU C and clang would fuse them); written FMAs are kept.
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-fopenmp", "-shared",
         "-fPIC", "-std=c11", "-ffp-contract=off")
OPS_SOURCE = Path(__file__).parent / "kernels" / "ops.cpp"
ATTENTION_SOURCE = Path(__file__).parent / "kernels" / "decode_sdpa.c"  # `decode_sdpa`, built into the ops library
BF16_SOURCE = Path(__file__).parent / "kernels" / "bf16_rows.c"  # `bf16_rows`, built into the ops library
BF16_FLAGS = ("-mavx512bf16",)
# AMX tiles (Sapphire Rapids on): tried first for the attention kernels; a compiler without them
# builds the rest, and the C files leave their AMX paths out.
AMX_FLAGS = ("-mavx512bf16", "-mamx-tile", "-mamx-bf16")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
BLOCK = 128  # weights per 64-byte block of the kernel's layout; groups are whole blocks
TILE_ROWS = 4  # rows per tile of the row-tile layout of int4 and bf16 (vnni.c's and bf16_rows.c's ROWS)
INT8_TILE_ROWS = 8  # of int8 (vnni.c's INT8_ROWS)
TILE_BLOCK_BYTES = 64  # a tile's blocks: one vector load of each row
BF16_BLOCK = 32  # bf16 weights a block: the bf16 kernel's tiles, whatever dtype they are converted to
ACTIVATION_STEPS = 127


def int4_kernel_applies(in_features: int, group_size: int) -> bool:
    """Whether the int4 kernel's layout fits a layer: whole blocks of 128 inputs per group."""
    return group_size % BLOCK == 0 and in_features % group_size == 0


def int8_kernel_applies(in_features: int) -> bool:
    """Whether the int8 kernel takes a layer: rows of whole 64-byte vectors."""
    return in_features % 64 == 0


@dataclass(frozen=True)
class Kernels:
    int8_rows: ctypes._CFuncPtr
    int4_rows: ctypes._CFuncPtr
    int4_dequantize: ctypes._CFuncPtr
    int8_dequantize: ctypes._CFuncPtr
    cpp_ops: bool  # the ops' CPU implementations are ops.cpp's (else Python's, over the ctypes calls)


@cache
def kernels() -> Kernels | None:
    """The compiled kernels' entry points, or None where they cannot run (`unavailable_reason`).
    The first call also registers the ops' CPU implementations: ops.cpp's, else Python's."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("VNNI kernels not used: %s; ATen's int8 and int4 kernels decode instead", reason)
        return None
    library = ctypes.CDLL(str(build_library(SOURCE, FLAGS)))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    int8, int4 = library.andromeda_int8_rows, library.andromeda_int4_rows
    flag = ctypes.c_int
    int8.argtypes = [pointer, size, size, flag, pointer, pointer, pointer, size, pointer, pointer]
    int4.argtypes = [pointer, size, size, flag, pointer, pointer, flag, size, size, pointer, pointer]
    dequantize = library.andromeda_int4_dequantize
    dequantize.argtypes = [pointer, pointer, flag, size, size, size, size, flag, pointer]
    dequantize8 = library.andromeda_int8_dequantize
    dequantize8.argtypes = [pointer, size, size, size, flag, pointer]
    int8.restype = int4.restype = dequantize.restype = dequantize8.restype = ctypes.c_int
    return Kernels(int8, int4, dequantize, dequantize8, _register_cpu_ops())


@cache  # once a process: a kernel registered twice for one op is an error
def _register_cpu_ops() -> bool:
    """Register the ops' CPU implementations: ops.cpp's (True) where it builds, else the Python
    ones over the ctypes calls (False, with the reason logged)."""
    try:
        torch.ops.load_library(str(build_ops_library()))
        return True
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        log.info("the kernels' C++ ops did not build (%s); their Python ones run instead", detail.strip()[:500])
    _LIBRARY.impl("int8_rows", _int8_rows, "CPU")
    _LIBRARY.impl("int4_rows", _int4_rows, "CPU")
    _LIBRARY.impl("decode_sdpa", decode_sdpa_reference, "CPU")
    return False


@cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (no VNNI, no compiler, a failed build), or None."""
    return missing_support(CPU_FLAGS, SOURCE, lambda: build_library(SOURCE, FLAGS))


def missing_support(cpu_features: Sequence[str], source: Path, build: Callable[[], object]) -> str | None:
    """Why a kernel of the C file `source` cannot run here: a CPU feature of `cpu_features` this CPU
    lacks, no C compiler, or `build()` failing; None once it is built."""
    flags = cpu_flags()
    if flags is None:
        return "the CPU's features are unknown (no /proc/cpuinfo)"
    missing = [flag for flag in cpu_features if flag not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if compiler() is None:
        return "no C compiler (set CC, or install gcc)"
    try:
        build()
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        return f"building {source.name} failed: {detail.strip()[:500]}"
    return None


AMX_BF16_FLAGS = ("amx_tile", "amx_bf16")  # AMX's bf16 tile products (Sapphire Rapids on)


class KernelLibrary:
    """A kernel's C file, built into a library of its own on first use (`build_library`, or
    `build`), as the training loop's kernels are: why it cannot run here, the kernel where it can,
    and its functions with their argument types."""

    def __init__(self, what: str, source: Path, flags: tuple[str, ...], cpu_features: Sequence[str],
                 remedy: str, build: Callable[[], Path] | None = None) -> None:
        self.what, self.source, self.remedy = what, source, remedy
        self.cpu_features = tuple(cpu_features)
        self.build = build or (lambda: build_library(source, flags))
        self._reason: tuple[str | None] | None = None
        self._functions: dict[str, ctypes._CFuncPtr] = {}

    def unavailable_reason(self) -> str | None:
        """Why the kernel cannot run here (a CPU feature missing, no C compiler, a failed build), or
        None; the build is tried once."""
        if self._reason is None:
            self._reason = (missing_support(self.cpu_features, self.source, self.build),)
        return self._reason[0]

    def offer(self, kernel: Callable, otherwise: str) -> Callable | None:
        """`kernel` where the library runs here, else None, logging why and what runs `otherwise`."""
        reason = self.unavailable_reason()
        if reason is not None:
            log.info("%s not used: %s; %s", self.what, reason, otherwise)
            return None
        return kernel

    def function(self, name: str, argtypes: list, restype: object = ctypes.c_int) -> ctypes._CFuncPtr:
        """The library's function `name`, typed. Raises RuntimeError where it cannot run here (a
        model pickled where it ran, loaded where it cannot), saying what to set (`remedy`)."""
        if name not in self._functions:
            reason = self.unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"{self.what} cannot run here: {reason}; {self.remedy}")
            function = getattr(ctypes.CDLL(str(self.build())), name)
            function.argtypes, function.restype = argtypes, restype
            self._functions[name] = function
        return self._functions[name]


def cpu_has(features: Sequence[str]) -> bool:
    """Whether the CPU lists every one of `features` (/proc/cpuinfo; False where unknown)."""
    return set(features) <= (cpu_flags() or frozenset())


@cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (/proc/cpuinfo), or None where they are unknown."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def int8_rows(x: Tensor, weight: Tensor, scale: Tensor, wsum: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ W.T + bias as (M, N) in x's dtype (bf16 or float32; others as float32) with the
    kernel: `weight` the int8 (N, K) weight in row tiles of INT8_TILE_ROWS (`to_row_tiles`), `scale` (N,)
    float32, `wsum` (N,) int32 (`int8_row_sums` of the plain weight), `bias` (N,) float32 or None."""
    if torch.compiler.is_compiling():  # the op: traced as a node of the graph
        return torch.ops.andromeda.int8_rows(_rows(x), weight, scale, wsum, bias)
    if kernels().cpp_ops:  # the dispatcher to C++: fewer microseconds than ctypes, profiled as the op
        return torch.ops.andromeda.int8_rows(x, weight, scale, wsum, bias)
    if torch._C._autograd._profiler_enabled():  # named as the op is (recording costs microseconds)
        with torch.profiler.record_function("andromeda::int8_rows"):
            return _int8_rows(x, weight, scale, wsum, bias)
    return _int8_rows(x, weight, scale, wsum, bias)


def int4_rows(x: Tensor, weight: Tensor, scale_zero: Tensor, group_size: int, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ W.T + bias as (M, N) in x's dtype (bf16 or float32; others as float32) with the
    kernel; `weight` (N rounded up to TILE_ROWS, K // 2) uint8 and `scale_zero` (N, 2, G) float32 or
    bfloat16 from `to_kernel_layout`, `bias` (N,) float32 or None."""
    if torch.compiler.is_compiling():
        return torch.ops.andromeda.int4_rows(_rows(x), weight, scale_zero, group_size, bias)
    if kernels().cpp_ops:
        return torch.ops.andromeda.int4_rows(x, weight, scale_zero, group_size, bias)
    if torch._C._autograd._profiler_enabled():
        with torch.profiler.record_function("andromeda::int4_rows"):
            return _int4_rows(x, weight, scale_zero, group_size, bias)
    return _int4_rows(x, weight, scale_zero, group_size, bias)


def int4_dequantize(weight: Tensor, scale_zero: Tensor, group_size: int, start: int, end: int,
                    dtype: torch.dtype) -> Tensor:
    """Rows start:end (end - start, K) of the weight an int4 layer's `to_kernel_layout` tensors hold,
    in `dtype` (bf16 or float32), by the kernels' library in one pass; `start` a multiple of
    TILE_ROWS. Each weight is (q - 8) * scale + zero in float32 (`int4_dequantize_reference`)."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"int4 weights dequantize to bfloat16 or float32, not {dtype}")
    N, K = scale_zero.shape[0], weight.shape[1] * 2
    _check_scales(scale_zero, N, K, group_size)
    _check_tiles(weight, N, K // 2, "int4", "to_kernel_layout")
    if not 0 <= start <= end <= N or start % TILE_ROWS:
        raise ValueError(f"rows {start}:{end} of {N}: the start must be a multiple of {TILE_ROWS}")
    out = torch.empty(end - start, K, dtype=dtype)
    status = kernels().int4_dequantize(weight.data_ptr(), scale_zero.data_ptr(), scale_zero.dtype == torch.bfloat16,
                                       K, group_size, start, end, dtype == torch.bfloat16, out.data_ptr())
    _check(status, f"int4 dequantizing (group {group_size})", end - start, K)
    return out


def int8_dequantize(weight: Tensor, start: int, end: int, dtype: torch.dtype) -> Tensor:
    """Rows start:end (end - start, K) of an int8 weight in row tiles of INT8_TILE_ROWS
    (`to_row_tiles`), as `dtype` (bf16 or float32: exact), in one pass by the kernels' library;
    `start` a multiple of INT8_TILE_ROWS. What `from_row_tiles(...).to(dtype)` gives."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"int8 weights dequantize to bfloat16 or float32, not {dtype}")
    if weight.dtype != torch.int8 or not weight.is_contiguous() or weight.shape[0] % INT8_TILE_ROWS:
        raise ValueError(f"expected an int8 weight in row tiles of {INT8_TILE_ROWS} (to_row_tiles), "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    K = weight.shape[1]
    if not 0 <= start <= end <= weight.shape[0] or start % INT8_TILE_ROWS:
        raise ValueError(f"rows {start}:{end} of {weight.shape[0]}: the start must be a multiple of {INT8_TILE_ROWS}")
    out = torch.empty(end - start, K, dtype=dtype)
    status = kernels().int8_dequantize(weight.data_ptr(), K, start, end, dtype == torch.bfloat16, out.data_ptr())
    _check(status, "int8 dequantizing", end - start, K)
    return out


def int4_dequantize_reference(weight: Tensor, scale_zero: Tensor, group_size: int, start: int, end: int,
                              dtype: torch.dtype) -> Tensor:
    """What `int4_dequantize` computes, in PyTorch."""
    if start == end:
        return torch.empty(0, weight.shape[1] * 2, dtype=dtype)
    codes = from_kernel_layout(weight, start, end).float() - 8  # (n, K)
    scale, zero = (scale_zero[start:end, i].float().repeat_interleave(group_size, dim=1) for i in (0, 1))
    return (codes * scale + zero).to(dtype)


def _int8_rows(x: Tensor, weight: Tensor, scale: Tensor, wsum: Tensor, bias: Tensor | None) -> Tensor:
    x = _rows(x)
    M, K = x.shape
    N = scale.shape[0]
    _check_tiles(weight, N, K, "int8", tile=INT8_TILE_ROWS)
    y = x.new_empty(M, N)
    args = (x.data_ptr(), M, K, x.dtype == torch.bfloat16, weight.data_ptr(), scale.data_ptr(), wsum.data_ptr(),
            N, _pointer(bias), y.data_ptr())
    _check(kernels().int8_rows(*args), "int8", M, K)
    return y


def _int4_rows(x: Tensor, weight: Tensor, scale_zero: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    x = _rows(x)
    M, K = x.shape
    N = scale_zero.shape[0]
    y = x.new_empty(M, N)
    _check_tiles(weight, N, K // 2, "int4", "to_kernel_layout")
    _check_scales(scale_zero, N, K, group_size)
    args = (x.data_ptr(), M, K, x.dtype == torch.bfloat16, weight.data_ptr(), scale_zero.data_ptr(),
            scale_zero.dtype == torch.bfloat16, N, group_size, _pointer(bias), y.data_ptr())
    _check(kernels().int4_rows(*args), f"int4 (group {group_size})", M, K)
    return y


def _check_tiles(weight: Tensor, N: int, width: int, kind: str, made_by: str = "to_row_tiles",
                 tile: int = TILE_ROWS) -> None:
    if weight.shape != (tiled_rows(N, tile), width) or not weight.is_contiguous():
        raise ValueError(f"the {kind} kernel takes a contiguous weight of {tiled_rows(N, tile)} rows of {width} for "
                         f"{N} rows ({made_by}), not {list(weight.shape)}")


def _check_scales(scale_zero: Tensor, N: int, K: int, group_size: int) -> None:
    """The int4 scales and zeros must be `to_kernel_layout`'s for this group size: (N, 2, K // group),
    float32 or bfloat16."""
    if scale_zero.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the int4 kernel's scales and zeros must be float32 or bfloat16, not {scale_zero.dtype}")
    if group_size <= 0 or K % group_size or scale_zero.shape != (N, 2, K // group_size) or not scale_zero.is_contiguous():
        raise ValueError(f"expected contiguous scales and zeros of shape (N, 2, K / group) = {(N, 2, K // max(group_size, 1))} "
                         f"for group size {group_size} and K = {K} (to_kernel_layout), got {tuple(scale_zero.shape)}")


def _rows(x: Tensor) -> Tensor:
    """x as the kernels read it: contiguous bf16 or float32 (another dtype as float32)."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        x = x.float()
    return x if x.is_contiguous() else x.contiguous()


def _pointer(bias: Tensor | None) -> int | None:
    return None if bias is None else bias.data_ptr()


# The custom ops torch.compile traces (a ctypes call cannot be traced). Defined with the low-level
# `torch.library.Library`, whose dispatch costs about half of `torch.library.custom_op`'s (3 us
# against 6.5 us a call, measured): the compiled step calls them through the dispatcher. Their
# CPU implementations are registered by `kernels()` (ops.cpp's, or `_int8_rows` and `_int4_rows`).
_LIBRARY = torch.library.Library("andromeda", "DEF")
_LIBRARY.define("int8_rows(Tensor x, Tensor weight, Tensor scale, Tensor wsum, Tensor? bias) -> Tensor")
_LIBRARY.define("int4_rows(Tensor x, Tensor weight, Tensor scale_zero, int group_size, Tensor? bias) -> Tensor")
_LIBRARY.define("decode_sdpa(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, int limit) -> Tensor")
_LIBRARY.define("bf16_rows(Tensor x, Tensor weight, int n, Tensor? bias) -> Tensor")


@torch.library.register_fake("andromeda::int8_rows", lib=_LIBRARY)
def _int8_rows_shape(x: Tensor, weight: Tensor, scale: Tensor, wsum: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], scale.shape[0])


@torch.library.register_fake("andromeda::int4_rows", lib=_LIBRARY)
def _int4_rows_shape(x: Tensor, weight: Tensor, scale_zero: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], scale_zero.shape[0])


@torch.library.register_fake("andromeda::bf16_rows", lib=_LIBRARY)
def _bf16_rows_shape(x: Tensor, weight: Tensor, n: int, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], n, dtype=x.dtype if x.dtype == torch.bfloat16 else torch.float32)


@torch.library.register_fake("andromeda::decode_sdpa", lib=_LIBRARY)
def _decode_sdpa_shape(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, limit: int) -> Tensor:
    return q.new_empty(q.shape)


# Most key columns a task of `decode_sdpa`'s FMA path reads (float32, and bf16 on CPUs without AMX
# tiles); past it ATen's SDPA is faster. Measured before the AMX path existed, on the bf16 calls it
# now takes (`benchmarks/bench_decode_attention.py --threads 2`, the compiled int4 step of a
# 32-layer model of width 256, 12 query heads per key/value head of 128 channels, a 256-column
# cache, FMA path against SDPA): 5.06 against 6.09 ms a step at 16-64 keys written, 4.57 against
# 4.86 at 80-128, 5.27 against 5.28 at 120-168, 6.12 against 6.01 at 160-208.
DECODE_SDPA_COLUMNS = 128


def decode_sdpa_for(kv_cache: KVCache) -> Callable[..., Tensor] | None:
    """The fused one-query attention a KV cache on the CPU is given (`model.cache.DecodeSDPA`):
    `andromeda::decode_sdpa` where ops.cpp built and the compute dtype is bf16 or float32, else None
    (attention keeps PyTorch's SDPA)."""
    if kv_cache.k.device.type != "cpu" or kv_cache.dtype not in (torch.bfloat16, torch.float32):
        return None
    found = kernels()
    return fused_decode_sdpa if found is not None and found.cpp_ops else None


@cache
def decode_sdpa_amx() -> bool:
    """Whether `andromeda::decode_sdpa` computes bf16 calls with AMX tiles here: ops.cpp built,
    decode_sdpa.c compiled with the AMX flags, and Linux granted this process the tiles (Sapphire
    Rapids on). Elsewhere bf16 calls take the FMA path up to `DECODE_SDPA_COLUMNS` and SDPA past it."""
    found = kernels()
    if found is None or not found.cpp_ops:
        return False
    return bool(ctypes.CDLL(str(build_ops_library())).andromeda_decode_sdpa_amx())


@cache
def bf16_rows_kernel() -> bool:
    """Whether `andromeda::bf16_rows` runs bf16_rows.c's kernel here: ops.cpp built, the file compiled
    with AVX-512 BF16, and this CPU has it (Cooper Lake, Sapphire Rapids and later; AMD Zen 4 on)."""
    found = kernels()
    if found is None or not found.cpp_ops:
        return False
    return bool(ctypes.CDLL(str(build_ops_library())).andromeda_bf16_rows_built())


def bf16_rows(x: Tensor, tiles: Tensor, n: int, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ W.T + bias for a bf16 weight W (n, K) in the row-tile layout (`to_row_tiles`; K a
    multiple of 32), by the op: (M, n) in x's dtype for bf16 or float32 x (others as float32); x
    rounded to bf16, float32 sums, `bias` (n,) float32 or None (`bf16_rows_reference`). Where the
    kernel does not run, the op is that reference (registered for every backend at import;
    ops.cpp's CPU kernel, once `kernels()` has loaded it, takes precedence)."""
    return torch.ops.andromeda.bf16_rows(_rows(x), tiles, n, bias)


def bf16_rows_reference(x: Tensor, tiles: Tensor, n: int, bias: Tensor | None) -> Tensor:
    """The bf16 kernel's result in PyTorch: x rounded to bf16, the product and bias in float32, in
    x's dtype (bf16) or float32."""
    weight = from_row_tiles(tiles, 0, n, BF16_BLOCK)
    y = F.linear(x.to(torch.bfloat16).float(), weight.float(), None if bias is None else bias.float())
    return y.to(torch.bfloat16) if x.dtype == torch.bfloat16 else y


_LIBRARY.impl("bf16_rows", bf16_rows_reference, "CompositeExplicitAutograd")


def fused_decode_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """`model.cache.DecodeSDPA` by the op: softmax(q k^T * scale + mask) v (`decode_sdpa_reference`)."""
    return torch.ops.andromeda.decode_sdpa(q, k, v, mask, scale, DECODE_SDPA_COLUMNS)


def decode_sdpa_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, limit: int) -> Tensor:
    """What `andromeda::decode_sdpa` computes (`kernels/decode_sdpa.c`; `limit` only says when its
    FMA path hands over to this): softmax(q k^T * scale + mask) v for q (B, K, G, D), k and v
    (B, K, S, D), mask broadcast to (B, K, G, S). Its CPU implementation where ops.cpp did not build."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _check(status: int, kind: str, M: int, K: int) -> None:
    if status:
        raise RuntimeError(f"the {kind} kernel refused its arguments (status {status}): M={M}, K={K}")


def int8_row_sums(weight: Tensor) -> Tensor:
    """Each row's sum of int8 codes, (N,) int32: what takes the kernel's shift of 128 back out."""
    return weight.sum(dim=1, dtype=torch.int32)


def _quantized_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(xq (M, K) float32 holding integers, a (M, 1)): each row on its own 8-bit grid."""
    x = x.float()
    peak = x.abs().amax(dim=1, keepdim=True)
    a = torch.where(peak > 0, peak / ACTIVATION_STEPS, torch.ones_like(peak))
    return torch.round(x * (1.0 / a)), a  # times the float32 inverse, as the kernel


def int8_rows_reference(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """What `int8_rows` computes, in PyTorch (float64 sums: the integer part is exact), for the
    plain (N, K) weight."""
    xq, a = _quantized_rows(x)
    dots = xq.double() @ weight.double().T  # (M, N)
    return (a.double() * scale.double() * dots).float()


def tiled_rows(rows: int, tile: int = TILE_ROWS) -> int:
    """Rows of the row-tile layout for `rows` rows: whole tiles of `tile` rows."""
    return -(-rows // tile) * tile


def to_row_tiles(weight: Tensor, per_block: int | None = None, tile: int = TILE_ROWS) -> Tensor:
    """A (N, W) weight (rows of whole 64-byte blocks) in the row-tile layout, as a new contiguous
    (`tiled_rows(N, tile)`, W) tensor of its dtype: rows in tiles of `tile` rows (the rows past N
    zeros), a tile's blocks in input order, each as its rows' 64 bytes one after another.
    `per_block`: values a block, where not 64 bytes' worth of the dtype (tiles converted to another
    dtype keep theirs)."""
    N, width = weight.shape
    per_block = per_block or TILE_BLOCK_BYTES // weight.element_size()
    if width % per_block:
        raise ValueError(f"row tiles take rows of whole {TILE_BLOCK_BYTES}-byte blocks ({per_block} "
                         f"{weight.dtype} values), not {width}")
    padded = weight.contiguous()
    if N % tile:
        padded = weight.new_zeros(tiled_rows(N, tile), width)
        padded[:N] = weight
    blocks = padded.view(-1, tile, width // per_block, per_block).transpose(1, 2)  # (tiles, blocks, rows, 64 B)
    if weight.device.type == "cpu":  # the stream a kernel reads, in 2 MiB pages where Linux has them
        tiles = empty_in_huge_pages(padded.shape[0], width, dtype=weight.dtype)
    else:
        tiles = torch.empty(padded.shape[0], width, dtype=weight.dtype, device=weight.device)
    tiles.view(blocks.shape).copy_(blocks)
    return tiles


def from_row_tiles(tiles: Tensor, start: int, end: int, per_block: int | None = None, tile: int = TILE_ROWS) -> Tensor:
    """Rows start:end (end - start, W) of a weight from its row tiles (`to_row_tiles`, with the same
    `per_block` and `tile`), reading only the tiles those rows lie in."""
    width = tiles.shape[1]
    per_block = per_block or TILE_BLOCK_BYTES // tiles.element_size()
    first, last = start // tile, -(-end // tile)
    blocks = tiles[first * tile : last * tile].view(last - first, width // per_block, tile, per_block)
    rows = blocks.transpose(1, 2).reshape((last - first) * tile, width)  # a copy where blocks interleave
    offset = start - first * tile
    rows = rows[offset : offset + end - start]
    return rows.clone() if width == per_block else rows  # one block a row: `rows` is a view of the tiles


def to_kernel_layout(codes: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """(codes (N, K) in 0..15, scales (N, G), zeros (N, G)) -> the kernel's (weight (N', K // 2)
    uint8 with N' = `tiled_rows(N)`, scale_zero (N, 2, G): each row's scales, then its zeros). In
    each block of 128 inputs of a row (64 bytes), byte j holds input j in its low nibble and input
    64 + j in its high one; the rows' bytes are in the row-tile layout (`to_row_tiles`: the kernel
    reads a tile as one stream). Scales and zeros stay bfloat16 when both are (a bf16 model's: the
    kernel reads them exactly, and a step reads 6% fewer bytes than in float32), else become float32."""
    N, K = codes.shape
    blocks = codes.to(torch.uint8).view(N, K // BLOCK, 2, BLOCK // 2)
    rows = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).view(N, K // 2)  # each row's blocks of 64 bytes
    dtype = torch.bfloat16 if scales.dtype == zeros.dtype == torch.bfloat16 else torch.float32
    return to_row_tiles(rows), torch.stack([scales.to(dtype), zeros.to(dtype)], dim=1).contiguous()


def from_kernel_layout(weight: Tensor, start: int, end: int) -> Tensor:
    """Codes (end - start, K) of rows start:end from the kernel's bytes (`to_kernel_layout`'s
    weight): the inverse of its first half, reading only the tiles those rows lie in."""
    rows = from_row_tiles(weight, start, end)  # (n, K // 2)
    blocks = rows.view(end - start, -1, BLOCK // 2)
    return torch.stack([blocks & 0xF, blocks >> 4], dim=2).reshape(end - start, -1)


def int4_rows_reference(x: Tensor, weight: Tensor, scale_zero: Tensor, group_size: int) -> Tensor:
    """What `int4_rows` computes, in PyTorch (float64 sums: the integer parts are exact)."""
    xq, a = _quantized_rows(x)
    M, K = xq.shape
    G = K // group_size
    centred = from_kernel_layout(weight, 0, scale_zero.shape[0]).double() - 8  # (N, K)
    dots = torch.einsum("mgk,ngk->mng", xq.double().view(M, G, group_size), centred.view(-1, G, group_size))
    scale, zero = scale_zero[:, 0].double(), scale_zero[:, 1].double()  # (N, G)
    sums = x.float().view(M, G, group_size).sum(dim=-1).double()  # (M, G)
    return (a.double() * (dots * scale).sum(-1) + sums @ zero.T).float()


def compiler() -> str | None:
    """The C compiler kernels are built with: $CC, else cc or gcc on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cxx_compiler() -> str | None:
    """The C++ compiler of the ops: $CXX, else c++ or g++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@cache
def build_library(source: Path, flags: tuple[str, ...]) -> Path:
    """The shared library of one C file, compiled once per source and flags into
    cache_root()/kernels as <stem>-<hash>.so (written to a temporary name, then renamed, so
    concurrent first uses never load a half-written file)."""
    def build(partial: Path, scratch: Path) -> None:
        # Libraries (-l) go after the source: linkers resolve left to right.
        options = [flag for flag in flags if not flag.startswith("-l")]
        libraries = [flag for flag in flags if flag.startswith("-l")]
        _run([compiler(), *options, str(source), "-o", str(partial), *libraries])

    return _cached_build(source.stem, source.read_bytes() + kernel_headers() + " ".join(flags).encode(), build)


def kernel_headers() -> bytes:
    """The headers the kernels' C files include (kernels/*.h), for the builds' cache keys."""
    return b"".join(path.read_bytes() for path in sorted(SOURCE.parent.glob("*.h")))


@cache
def build_ops_library() -> Path:
    """vnni.c, decode_sdpa.c, bf16_rows.c and ops.cpp as one shared library of the ops' C++ implementations, compiled against
    this torch's headers and libraries (its version and C++ ABI are part of the cache key)."""
    if cxx_compiler() is None:
        raise OSError("no C++ compiler (set CXX, or install g++)")
    root = Path(torch.__file__).parent
    cxx_flags = ("-O2", "-std=c++20", "-fPIC", "-shared", "-fopenmp",
                 f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
                 f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}")
    libraries = (f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-ltorch_cpu", "-lc10")
    c_flags = tuple(flag for flag in FLAGS if flag != "-shared")

    def build(partial: Path, scratch: Path) -> None:
        objects = [str(scratch / f"{source.stem}.o") for source in (SOURCE, ATTENTION_SOURCE, BF16_SOURCE)]
        _run([compiler(), *c_flags, "-c", str(SOURCE), "-o", objects[0]])
        # decode_sdpa.c's AMX path and bf16_rows.c's kernel where the compiler has the flags
        for source, extra, target in ((ATTENTION_SOURCE, AMX_FLAGS, objects[1]), (BF16_SOURCE, BF16_FLAGS, objects[2])):
            try:
                _run([compiler(), *c_flags, *extra, "-c", str(source), "-o", target])
            except subprocess.CalledProcessError as error:
                log.info("%s built without %s (%s): its kernel will refuse calls", source.name, " ".join(extra),
                         (error.stderr or "").strip()[:300])
                _run([compiler(), *c_flags, "-c", str(source), "-o", target])
        _run([cxx_compiler(), *cxx_flags, str(OPS_SOURCE), *objects, "-o", str(partial), *libraries, "-lm"])

    key = b"\0".join([SOURCE.read_bytes(), ATTENTION_SOURCE.read_bytes(), BF16_SOURCE.read_bytes(),
                      OPS_SOURCE.read_bytes(), kernel_headers(), torch.__version__.encode(),
                      " ".join(c_flags + AMX_FLAGS + BF16_FLAGS + cxx_flags + libraries).encode()])
    return _cached_build(OPS_SOURCE.stem, key, build)


def _cached_build(stem: str, key: bytes, build: Callable[[Path, Path], None]) -> Path:
    """cache_root()/kernels/<stem>-<hash of key>.so, made by build(partial path, scratch folder)
    where it is not there yet: written to a temporary name, then renamed, so concurrent first uses
    never load a half-written file."""
    folder = cache_root() / "kernels"
    target = folder / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        partial = Path(scratch) / target.name
        build(partial, Path(scratch))
        os.replace(partial, target)
    log.info("built %s", target)
    return target


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
