"""Relative positions: ALiBi biases and rotary xPos.

Shape letters: B batch, H query heads, T query positions, S key positions, R rotary channels.

Both read absolute positions given per row, (B, T), so rows of one batch may sit at different
offsets (a left-padded prompt, or sequences admitted to a server's batch at different times).

xPos at any length. xPos multiplies query i by zeta^((i - c) / base) and key j by
zeta^(-(j - c) / base), per rotary pair, for a center c that cancels in q.k. Each factor alone
grows or shrinks exponentially with the distance to c: with zeta = 0.4/1.4 and base 512 it
passes e^88 (fp32's and bf16's largest number) about 36,000 positions from c, and q.k turns
into inf * 0 = NaN. So no factor is ever allowed past `xpos_max_factor(dtype)` (e^29.6 in fp32
and bf16, leaving room for products of two of them): every query and key that is read sits
within `xpos_reach` positions of the center it is scaled with. The forward pass keeps one center
per sequence while that holds (x-transformers' T // 2, up to 24k positions in fp32), and beyond
it gives each block of queries its own center, its keys rescaled to match
(`attention._attend_in_xpos_blocks`); the KV cache moves a slot's center forward as its
positions grow, rescaling the stored keys once (`cache.KVCache`). A key far behind its center
only shrinks, to 0 at worst, where the true factor zeta^((i - j) / base) is below 1e-25 anyway.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

# xPos (Sun et al. 2022, section 3.2): per rotary pair p of R channels, zeta_p = (2p + gamma R) /
# ((1 + gamma) R) with gamma = 0.4, so zeta runs from 0.4/1.4 (fastest decay) up to nearly 1.
XPOS_GAMMA = 0.4
XPOS_ZETA_MIN = XPOS_GAMMA / (1 + XPOS_GAMMA)
# A factor may reach the cube root of the dtype's largest number: a query factor times a key
# factor (a masked pair, or a key on its way to being rescaled) then stays far from overflow.
XPOS_FACTOR_ROOT = 3


def xpos_max_factor(dtype: torch.dtype = torch.float32) -> float:
    """The largest xPos factor activations of `dtype` get: e^29.6 for fp32 and bf16, 40 for fp16."""
    return torch.finfo(dtype).max ** (1 / XPOS_FACTOR_ROOT)


def xpos_reach(scale_base: float, dtype: torch.dtype = torch.float32) -> int:
    """How many positions from its center a query or key may sit with every xPos factor within
    `xpos_max_factor(dtype)`: 12,086 for base 512 in fp32 and bf16 (the fastest-decaying pair,
    zeta = 0.4/1.4, sets it)."""
    return int(math.log(xpos_max_factor(dtype)) / math.log(1 / XPOS_ZETA_MIN) * scale_base)


def xpos_blocks(positions: Tensor, rows: int, reach: int) -> list[tuple[int, int]]:
    """Split query rows 0..T-1 into consecutive blocks of at most `rows` rows whose positions
    (B, T), in every row of the batch, span at most 2 * reach: each block then has a center
    within `reach` of all its queries. Positions increase along each row; a jump (positions
    [0, 1, 2, 90000, ...]) starts a new block."""
    positions = positions.detach().to("cpu", torch.long)
    T = positions.shape[1]
    blocks, start = [], 0
    while start < T:
        limit = positions[:, start : start + 1] + 2 * reach  # (B, 1)
        fits = int(torch.searchsorted(positions, limit, right=True).min())  # rows [start, fits) fit
        end = min(start + rows, max(fits, start + 1))
        blocks.append((start, end))
        start = end
    return blocks


@lru_cache(maxsize=None)
def alibi_slopes(num_alibi_heads: int, heads: int) -> tuple[float, ...]:
    """Per-head ALiBi slopes (Press et al. 2021, https://arxiv.org/abs/2108.12409), zero for the
    heads after the first `num_alibi_heads`.

    For n a power of two the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ...; otherwise
    the slopes of the closest lower power of two are followed by every other slope of the next
    power of two (the paper's interleaved schedule).
    """

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n = num_alibi_heads
    if n == 0:
        return (0.0,) * heads
    if math.log2(n).is_integer():
        slopes = power_of_two_slopes(n)
    else:
        lower = 2 ** math.floor(math.log2(n))
        slopes = power_of_two_slopes(lower) + power_of_two_slopes(2 * lower)[0::2][: n - lower]
    return tuple(slopes) + (0.0,) * (heads - n)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """-slope * |i - j| for query positions i (B, T) and key positions j (B, S): (B, H, T, S)."""
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(slopes.dtype)  # (B, T, S)
    return -slopes[None, :, None, None] * distance[:, None]


def xpos_tables(
    positions: Tensor, rotary_dim: int, base: float, scale_base: float | None, center: Tensor | int,
    *, max_factor: float | None = None,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Rotation tables for queries and keys at `positions` (B, T): ((cos, sin), (cos, sin)), each
    (B, 1, T, R/2) fp32 (the 1 broadcasts over heads), with the xPos scale folded in.

    Rotary embeddings (Su et al. 2021) turn q.k into a function of i - j; xPos (Sun et al. 2022,
    https://arxiv.org/abs/2212.10554) additionally scales queries by zeta^((i - center) / base)
    and keys by zeta^-((j - center) / base), so their product decays with distance. Any center
    cancels in q.k (per row: `center` is a scalar or (B, 1)); it only keeps the powers small, so
    keys cached under one center stay valid only for queries using the same one.
    `scale_base=None` turns xPos off (pure rotations). No factor exceeds `max_factor` (default
    `xpos_max_factor()`); within `xpos_reach` of the center none comes near it, so the tables
    there are exactly the unclamped ones.
    """
    cos, sin = rotary_tables(positions, rotary_dim, base)
    if scale_base is None:
        return (cos, sin), (cos, sin)
    scale = xpos_scale(positions, rotary_dim, scale_base, center)  # (B, 1, T, R/2)
    max_factor = xpos_max_factor() if max_factor is None else max_factor
    return xpos_fold(cos, sin, scale, max_factor, query=True), xpos_fold(cos, sin, scale, max_factor, query=False)


def rotary_tables(positions: Tensor, rotary_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """Pure rotations at `positions` (B, T): (cos, sin), each (B, 1, T, R/2) fp32."""
    pairs = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = base ** (-pairs / rotary_dim)  # (R/2,)
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, T, R/2)
    return angles.cos(), angles.sin()


def xpos_scale(positions: Tensor, rotary_dim: int, scale_base: float, center: Tensor | int) -> Tensor:
    """zeta^((position - center) / scale_base) per rotary pair: (B, 1, T, R/2) fp32, unclamped.
    `center` is a scalar or per row, (B, 1)."""
    pairs = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
    zeta = (pairs + XPOS_GAMMA * rotary_dim) / ((1 + XPOS_GAMMA) * rotary_dim)  # (R/2,)
    pos = positions.to(torch.float32)[:, None, :, None]  # (B, 1, T, 1)
    if isinstance(center, Tensor):
        center = center.to(torch.float32).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return zeta ** ((pos - center) / scale_base)


def xpos_fold(cos: Tensor, sin: Tensor, scale: Tensor, max_factor: float, *, query: bool) -> tuple[Tensor, Tensor]:
    """Rotation tables times the query factor `scale` (query=True) or the key factor 1 / scale,
    each capped at `max_factor`: a factor past it belongs to a position too far from the center
    to be read with it (padding, or a masked future key), and must not become inf."""
    if query:
        scale = scale.clamp(max=max_factor)
        return cos * scale, sin * scale
    scale = scale.clamp(min=1 / max_factor)
    return cos / scale, sin / scale


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first R channels of x (B, H, T, D) in adjacent pairs (GPT-J layout), with
    tables (B or 1, 1, T, R/2).

    Each pair (even, odd) is the complex number even + i*odd multiplied by cos + i*sin: one
    complex product forward and one backward, in place of a dozen real ops and their copies.
    Computed in fp32 and cast back, so bf16 activations keep an exact rotation.
    """
    rotary_dim = 2 * cos.shape[-1]
    rot = x[..., :rotary_dim].float()
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex ops; the same products in real arithmetic fuse.
        even, odd = rot.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, R/2) each
        cos, sin = cos.float(), sin.float()
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)
    if rot.storage_offset() % 2 or any(stride % 2 for stride in rot.stride()[:-1]):
        rot = rot.contiguous()  # a complex view needs even strides; odd head sizes give odd ones
    pairs = torch.view_as_complex(rot.unflatten(-1, (-1, 2)))  # (B, H, T, R/2)
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:  # (`.float()` on float32 still costs a dispatch)
        cos, sin = cos.float(), sin.float()
    table = torch.complex(cos, sin)  # (B or 1, 1, T, R/2)
    rotated = torch.view_as_real(pairs * table).flatten(-2)  # (B, H, T, R)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)
