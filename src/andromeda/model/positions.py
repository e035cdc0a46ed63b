"""Relative positions: ALiBi biases and rotary xPos.

Shape letters: B batch, H query heads, T query positions, S key positions, R rotary channels.

Both read absolute positions given per row, (B, T), so rows of one batch may sit at different
offsets (a left-padded prompt, or sequences admitted to a server's batch at different times).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

# xPos (Sun et al. 2022, section 3.2): per rotary pair p of R channels, zeta_p = (2p + gamma R) /
# ((1 + gamma) R) with gamma = 0.4, so zeta runs from 0.4/1.4 (fastest decay) up to nearly 1.
XPOS_GAMMA = 0.4


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
    positions: Tensor, rotary_dim: int, base: float, scale_base: float | None, center: Tensor | int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Rotation tables for queries and keys at `positions` (B, T): ((cos, sin), (cos, sin)), each
    (B, 1, T, R/2) fp32 (the 1 broadcasts over heads), with the xPos scale folded in.

    Rotary embeddings (Su et al. 2021) turn q.k into a function of i - j; xPos (Sun et al. 2022,
    https://arxiv.org/abs/2212.10554) additionally scales queries by zeta^((i - center) / base)
    and keys by zeta^-((j - center) / base), so their product decays with distance. Any center
    cancels in q.k (per row: `center` is a scalar or (B, 1)); it only keeps the powers small, so
    keys cached under one center stay valid only for queries using the same one.
    `scale_base=None` turns xPos off.
    """
    pairs = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = base ** (-pairs / rotary_dim)  # (R/2,)
    pos = positions.to(torch.float32)[:, None, :, None]  # (B, 1, T, 1)
    angles = pos * inv_freq  # (B, 1, T, R/2)
    cos, sin = angles.cos(), angles.sin()
    if scale_base is None:
        return (cos, sin), (cos, sin)
    zeta = (pairs + XPOS_GAMMA * rotary_dim) / ((1 + XPOS_GAMMA) * rotary_dim)  # (R/2,)
    if isinstance(center, Tensor):
        center = center.to(torch.float32).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    scale = zeta ** ((pos - center) / scale_base)  # (B, 1, T, R/2)
    return (cos * scale, sin * scale), (cos / scale, sin / scale)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first R channels of x (B, H, T, D) in adjacent pairs (GPT-J layout), with
    tables (B or 1, 1, T, R/2).

    Each pair (even, odd) is the complex number even + i*odd multiplied by cos + i*sin: one
    complex product forward and one backward, in place of a dozen real ops and their copies.
    Computed in fp32 and cast back, so bf16 activations keep an exact rotation.
    """
    rotary_dim = 2 * cos.shape[-1]
    rot = x[..., :rotary_dim].float()
    if rot.storage_offset() % 2 or any(stride % 2 for stride in rot.stride()[:-1]):
        rot = rot.contiguous()  # a complex view needs even strides; odd head sizes give odd ones
    pairs = torch.view_as_complex(rot.unflatten(-1, (-1, 2)))  # (B, H, T, R/2)
    table = torch.complex(cos.float(), sin.float())  # (B or 1, 1, T, R/2)
    rotated = torch.view_as_real(pairs * table).flatten(-2)  # (B, H, T, R)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)
