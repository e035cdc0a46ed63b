"""int4 codes and their layouts: two codes per byte in a checkpoint, ATen's packed layout in memory.

A checkpoint stores an int4 weight (N, K) as (N, K // 2) uint8, column 2j in the low nibble and
2j + 1 in the high (`pack_nibbles`). ATen's CPU kernel wants its own layout, which depends on the
CPU's vector width; it is built on load (`pack_for_cpu`) and read back for saving and for the
dequantizing path (`plain_from_cpu`, `unpack_cpu_rows`), a block of rows at a time.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

INT4_LEVELS = 16  # codes 0..15
INT4_OFFSET = 8  # the kernels dequantize (q - 8) * scale + zero
# Rows repacked or unpacked at a time when loading and saving int4 weights.
PACK_ROWS = 1024
# ATen packs int4 weights in blocks of up to 64 output rows and needs N divisible by this.
INT4_ROW_MULTIPLE = 16
LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # the low nibble of each byte of an int64


def pack_nibbles(codes: Tensor) -> Tensor:
    """(N, K) codes in 0..15 -> (N, K // 2) uint8: column 2j low nibble, 2j + 1 high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """(N, K // 2) uint8 -> (N, K) codes; the inverse of pack_nibbles."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


# ATen's CPU int4 layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel):
# output rows go in blocks of BLOCK_N (64 with AVX-512, 32 otherwise), each block stored as
# (K, BLOCK_N // 2) bytes. In a full block on AVX-512/AVX2 the low nibbles hold rows 0..B/2-1 and
# the high nibbles rows B/2..B-1 ("halves"); in a last, partial block and without AVX2, byte j
# holds rows 2j (low) and 2j + 1 (high) ("pairs"). The layout is found once per process by
# packing a probe and comparing, so a PyTorch that packs differently fails loudly, not silently.
_LAYOUT_CANDIDATES = ((64, "halves"), (32, "halves"), (32, "pairs"), (16, "pairs"), (64, "pairs"))


@functools.cache
def cpu_int4_layout() -> tuple[int, str]:
    """(BLOCK_N, full-block format) of this process's ATen int4 packing, checked both ways."""
    K = 4
    codes = torch.randint(0, INT4_LEVELS, (112, K), dtype=torch.uint8)  # 112 = 64 + 48: full and partial blocks
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    for layout in _LAYOUT_CANDIDATES:
        if (torch.equal(_unpack_layout(packed, 0, codes.shape[0], K, *layout), codes)
                and torch.equal(_pack_layout(codes, *layout), packed)):
            return layout
    raise RuntimeError("this PyTorch build packs int4 weights in a layout andromeda does not know; "
                       "use --quantize int8, or a torch version whose layout is listed in "
                       "andromeda/inference/int4_packing.py")


def _unpack_layout(packed: Tensor, start: int, end: int, K: int, block: int, form: str) -> Tensor:
    """Codes (end - start, K) uint8 of rows start:end of an ATen-packed weight; `start` is a
    multiple of `block`, `end` of 16 or the padded row count."""
    rows = packed.shape[0]
    flat = packed.view(-1)
    out = torch.empty(end - start, K, dtype=torch.uint8, device=packed.device)
    full_end = min(end, rows // block * block)
    if full_end > start:
        nb = (full_end - start) // block
        blocks = flat[start * K // 2 : full_end * K // 2].view(nb, K, block // 2)  # (nb, K, B/2)
        low, high = blocks & 0xF, blocks >> 4
        if form == "halves":
            codes = torch.cat([low, high], dim=-1)  # (nb, K, B)
        else:
            codes = torch.stack([low, high], dim=-1).view(nb, K, block)
        out[: full_end - start].view(nb, block, K).copy_(codes.transpose(1, 2))
    if end > full_end:  # the partial last block, always in pairs
        tail = end - full_end
        last = flat[full_end * K // 2 : end * K // 2].view(K, tail // 2)
        out[full_end - start :] = torch.stack([last & 0xF, last >> 4], dim=-1).view(K, tail).T
    return out


def _pack_layout(codes: Tensor, block: int, form: str) -> Tensor:
    """The inverse of _unpack_layout for a whole weight: codes (N, K), N a multiple of 16 ->
    ATen's packed (N, K // 2) uint8."""
    N, K = codes.shape
    out = torch.empty(N, K // 2, dtype=torch.uint8, device=codes.device)
    flat = out.view(-1)
    full_end = N // block * block
    if full_end:
        nb, half = full_end // block, block // 2
        by_k = codes[:full_end].view(nb, block, K).transpose(1, 2)  # (nb, K, B)
        if form == "halves":
            low, high = by_k[..., :half], by_k[..., half:]
        else:
            low, high = by_k[..., 0::2], by_k[..., 1::2]
        torch.bitwise_or(low, high << 4, out=flat[: full_end * K // 2].view(nb, K, half))
    if N > full_end:
        last = codes[full_end:].T  # (K, tail)
        torch.bitwise_or(last[:, 0::2], last[:, 1::2] << 4, out=flat[full_end * K // 2 :].view(K, -1))
    return out


def unpack_cpu_rows(packed: Tensor, start: int, end: int, K: int) -> Tensor:
    """Codes (end - start, K) of rows start:end (not past the real rows) of a CPU-packed weight."""
    padded_end = min(packed.shape[0], -(-end // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE)
    return _unpack_layout(packed, start, padded_end, K, *cpu_int4_layout())[: end - start]


def pack_for_cpu(weight: Tensor, scales_and_zeros: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Plain (N, K // 2) nibbles and (G, N, 2) scales/zeros -> ATen's packed weight and the
    scales/zeros padded to the same row count (a multiple of 16; pad rows are zero)."""
    layout = cpu_int4_layout()
    N = weight.shape[0]
    padded = -(-N // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
    if padded != N:
        weight = F.pad(weight, (0, 0, 0, padded - N))
        scales_and_zeros = F.pad(scales_and_zeros, (0, 0, 0, padded - N))
    packed = torch.empty_like(weight)
    for i in range(0, padded, PACK_ROWS):  # PACK_ROWS is a multiple of every block size
        packed[i : i + PACK_ROWS] = _pack_layout(unpack_nibbles(weight[i : i + PACK_ROWS]), *layout)
    return packed, scales_and_zeros.contiguous()


def plain_from_cpu(packed: Tensor, N: int, K: int) -> Tensor:
    """The plain (N, K // 2) nibbles of a CPU-packed weight, PACK_ROWS rows at a time."""
    plain = torch.empty(N, K // 2, dtype=torch.uint8, device=packed.device)
    for i in range(0, N, PACK_ROWS):
        end = min(i + PACK_ROWS, N)
        plain[i:end] = pack_nibbles(unpack_cpu_rows(packed, i, end, K))
    return plain
