"""A small C kernel for int4 decoding with AVX-512 VNNI, built on first use, and its PyTorch reference.

ATen's int4 kernel (`torch._weight_int4pack_mm_for_cpu`) converts every weight to floating point
and is compute-bound at about half the memory bandwidth; PyTorch ships no int4 product with
integer dot products for x86 (torchao's CPU kernels are not in its PyPI wheels). So this is the
one hand-written kernel of the project, `kernels/int4_vnni.c`, for a few rows (decoding):

- each activation row is quantized to int8 with one scale a = max|x| / 127 (round half to even);
- per group of inputs, VNNI multiplies the 4-bit codes q (unsigned) by the int8 activations
  (signed) and sums them exactly in int32; the sum is scaled by the group's scale;
- the group's offset (zero - 8 * scale: a code's value is (q - 8) * scale + zero) multiplies the
  exact float sum of the group's activations:
  y[m, n] = a[m] * sum_g scale[n, g] * sum_{k in g} xq[m, k] q[n, k] + sum_g offset[n, g] X[m, g].

`int4_rows_reference` computes the same in PyTorch; the tests hold the kernel to it. Each row is
quantized on its own, so a row's result never depends on the others in its batch.

Build: the C file is compiled with the system's C compiler (`$CC`, else cc) into
`$ANDROMEDA_CACHE/kernels` (default ~/.cache/andromeda/kernels), named by a hash of the source and
the flags, in about a second, and loaded with ctypes (the call releases the GIL). It runs its
loop on PyTorch's own OpenMP runtime (the same libgomp.so.1, already loaded), so
`torch.set_num_threads` governs it. Where the CPU lacks AVX-512 VNNI or the build fails,
`int4_kernel()` is None and the caller keeps ATen's kernel (`unavailable_reason` says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "int4_vnni.c"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-fopenmp", "-shared",
         "-fPIC", "-std=c11"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
BLOCK = 128  # weights per 64-byte block of the kernel's layout; groups are whole blocks
ACTIVATION_STEPS = 127


def kernel_applies(in_features: int, group_size: int) -> bool:
    """Whether the kernel's layout fits a layer: whole blocks of 128 inputs per group."""
    return group_size % BLOCK == 0 and in_features % group_size == 0


@cache
def int4_kernel() -> ctypes._CFuncPtr | None:
    """The compiled kernel's entry point, or None where it cannot run (`unavailable_reason`)."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("int4 VNNI kernel not used: %s; ATen's int4 kernel decodes instead", reason)
        return None
    library = ctypes.CDLL(str(_built()))
    function = library.andromeda_int4_rows
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return function


@cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (no VNNI, no compiler, a failed build), or None."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "the CPU's features are unknown (no /proc/cpuinfo)"
    missing = [flag for flag in CPU_FLAGS if flag not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C compiler (set CC, or install gcc)"
    try:
        _built()
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        return f"building {SOURCE.name} failed: {detail.strip()[:500]}"
    return None


def int4_rows(x: Tensor, weight: Tensor, scale_offset: Tensor, group_size: int) -> Tensor:
    """x (M, K) @ W.T as float32 (M, N) with the kernel; `weight` (N, K // 2) uint8 in blocks of
    128 (`to_kernel_layout`), `scale_offset` (N, G, 2) float32."""
    function = int4_kernel()
    x = x.float().contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    status = function(x.data_ptr(), M, K, weight.data_ptr(), scale_offset.data_ptr(), N, group_size, y.data_ptr())
    if status:
        raise RuntimeError(f"int4 kernel refused its arguments (status {status}): M={M}, K={K}, "
                           f"group {group_size}")
    return y


def to_kernel_layout(codes: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """(codes (N, K) in 0..15, scales (N, G), zeros (N, G)) -> the kernel's (weight (N, K // 2)
    uint8, scale_offset (N, G, 2) float32): in each block of 128 inputs, byte j holds input j in
    its low nibble and input 64 + j in its high one."""
    N, K = codes.shape
    blocks = codes.to(torch.uint8).view(N, K // BLOCK, 2, BLOCK // 2)
    weight = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2).contiguous()
    scale = scales.float()
    offset = zeros.float() - 8 * scale
    return weight, torch.stack([scale, offset], dim=-1).contiguous()


def from_kernel_layout(weight: Tensor) -> Tensor:
    """The kernel's (N, K // 2) bytes -> codes (N, K); the inverse of `to_kernel_layout`'s first half."""
    N = weight.shape[0]
    blocks = weight.view(N, -1, BLOCK // 2)
    return torch.stack([blocks & 0xF, blocks >> 4], dim=2).reshape(N, -1)


def int4_rows_reference(x: Tensor, weight: Tensor, scale_offset: Tensor, group_size: int) -> Tensor:
    """What `int4_rows` computes, in PyTorch (float64 sums: the integer parts are exact)."""
    x = x.float()
    M, K = x.shape
    peak = x.abs().amax(dim=1, keepdim=True)
    a = torch.where(peak > 0, peak / ACTIVATION_STEPS, torch.ones_like(peak))  # (M, 1) float32
    xq = torch.round(x * (1.0 / a))  # (M, K), as the kernel: times the float32 inverse
    codes = from_kernel_layout(weight).double()  # (N, K)
    G = K // group_size
    dots = torch.einsum("mgk,ngk->mng", xq.double().view(M, G, group_size), codes.view(-1, G, group_size))
    scale, offset = scale_offset[..., 0].double(), scale_offset[..., 1].double()  # (N, G)
    sums = x.view(M, G, group_size).sum(dim=-1).double()  # (M, G)
    return (a.double() * (dots * scale).sum(-1) + sums @ offset.T).float()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    configured = os.environ.get("ANDROMEDA_CACHE")
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "andromeda"
    return root / "kernels"


@cache
def _built() -> Path:
    """The shared library, compiled once per source and flags (written to a temporary name, then
    renamed, so concurrent first uses never load a half-written file)."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"int4_vnni-{digest}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        partial = Path(scratch) / target.name
        subprocess.run([_compiler(), *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(partial, target)
    log.info("built %s", target)
    return target
