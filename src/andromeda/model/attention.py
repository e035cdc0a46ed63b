"""Causal self-attention with grouped-query heads, QK-norm, rotary xPos and ALiBi.

Shape letters: B batch, T new (query) positions, S key positions (cached + new), H query heads,
K key/value heads, G = H // K query heads per key/value head, D head size, C model width.

Head order. Heads are numbered as in x-transformers: ALiBi sits on heads 0..A-1 and head h reads
key/value head h % K. Internally the query projection stores heads grouped by the key/value head
they read (see `query_head_order`), which is the layout PyTorch's grouped-query SDPA
kernels expect; the ALiBi slopes are permuted to match, so the two numberings describe one model.

Masking. A query at position i reads the keys at positions j <= i of its own row that hold real
tokens (not padding, not a cache slot's unused or stale entries). Positions increase along each
row, so without a cache this is the usual causal mask by index, which the fused kernels apply
themselves; everything else gets an explicit additive bias. A sliding-window cache (window W,
S sink tokens) further limits a query to the keys at positions j < S and i - j < W - S.

Long sequences. Past `positions.xpos_reach` positions from the center, one xPos center per
sequence would overflow; then queries go in blocks, each with its own center
(`_attend_in_xpos_blocks`), and the forward pass hands attention unrotated queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from .cache import CacheStep, DecodeSDPA
from .fused import Transposer, projection
from .positions import alibi_bias, apply_rotary, xpos_fold, xpos_scale

# Query rows per block on the explicit-bias paths: bounds the (B, H, rows, S) scores to a few
# hundred MB at 8192 keys.
QUERY_CHUNK = 512
# The ALiBi key channel j - c is split as a multiple of this plus a remainder below it, so both
# parts are integers bf16 represents exactly (8 significant bits).
ALIBI_SPLIT = 256
# QK-norm's floor under a head's length (F.normalize's default).
NORM_EPS = 1e-12
# CUDA's fused attention kernels take head sizes that are multiples of this.
CUDA_HEAD_MULTIPLE = 8
# Query rows per block on the xPos-block path shrink as keys grow, so a block's (rows, S) mask
# holds at most QUERY_CHUNK * this many entries per batch row.
BLOCK_KEYS = 32768


def xpos_block_rows(keys: int) -> int:
    """Query rows per block of `_attend_in_xpos_blocks` when a block reads up to `keys` keys."""
    return max(1, min(QUERY_CHUNK, QUERY_CHUNK * BLOCK_KEYS // max(keys, 1)))


@lru_cache(maxsize=None)
def query_head_order(heads: int, kv_heads: int) -> tuple[int, ...]:
    """order[slot] = the x-transformers head number stored in internal slot `slot`.

    Slot kv * G + r holds head r * K + kv, so slots [kv*G, (kv+1)*G) all read kv head `kv`.
    """
    groups = heads // kv_heads
    return tuple(r * kv_heads + kv for kv in range(kv_heads) for r in range(groups))


class CausalAttention(Protocol):
    """A fused causal attention for bf16 on the CPU, forward and backward (the training loop's
    `train.attention_kernel`): q (B, H, T, D), k and v (B, K, T, D) bf16, query head h reading
    key/value head h // (H / K); query i reads keys j <= i with weights
    softmax_j(scale q_i . k_j - slopes[h] |positions_i - positions_j|) (positions (B or 1, T),
    slopes (H,) or None for no ALiBi) -> (B, H, T, D) bf16."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slopes: Tensor | None,
                 scale: float) -> Tensor: ...


class AttentionPrologue(Protocol):
    """QK-norm, its learned scales and rotary xPos for bf16 on the CPU in one pass each way (the
    training loop's `train.attention_kernel`): qkv (B, T, H + 2K, D) bf16, the scales (H, 1, D) and
    (K, 1, D) float32, `AttentionInputs.rotary`'s tables -> q (B, H, T, D), k and v (B, K, T, D)
    bf16: what `Attention.forward` computes with `l2_normalize(x, eps)`, the scales and
    `apply_rotary`, rounded to bf16 as the fused causal attention takes them."""

    def __call__(self, qkv: Tensor, q_scale: Tensor, k_scale: Tensor,
                 rotary: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]], eps: float
                 ) -> tuple[Tensor, Tensor, Tensor]: ...


@dataclass
class AttentionInputs:
    """Everything attention needs about positions and masking, computed once per forward for all
    layers. Without a cache the keys are the new tokens themselves (S = T); with one, `cache` says
    where the new keys go, and the keys read are the slot's first S entries."""

    q_pos: Tensor  # (B or 1, T) absolute positions of the new tokens
    k_pos: Tensor  # (B or 1, S) absolute positions of the keys read
    rotary: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None  # query, key (cos, sin)
    slopes: Tensor | None  # (H,) ALiBi slopes in internal head order, None without ALiBi
    k_valid: Tensor | None  # (B, S) True for keys holding real tokens; None when all do
    cache: CacheStep | None
    # Without a cache and too long for one xPos center: query blocks with a center each, and
    # `rotary` holds pure rotations, applied per block (see `_attend_in_xpos_blocks`).
    xpos: XposBlocks | None = None
    window: tuple[int, int] | None = None  # (W, S) of a sliding-window cache
    # Additive biases by (first query row, dtype): built by the first layer, reused by the rest.
    biases: dict[tuple[int, torch.dtype], Tensor] = field(default_factory=dict)
    # The model owner's fused causal attention for bf16 on the CPU, or None (SDPA).
    causal_attention: CausalAttention | None = None
    # The model owner's fused QK-norm and rotary xPos for it, or None (PyTorch's ops).
    attention_prologue: AttentionPrologue | None = None
    # The model owner's kernel for the projections' transposed gradients, or None (`fused.transposed`).
    transpose: Transposer | None = None

    @property
    def plain_causal(self) -> bool:
        """Query t reads exactly keys 0..t of its row, all real: what fused causal kernels do."""
        fresh = self.cache is None or (self.cache.start == 0 and self.cache.read == self.cache.new)
        return fresh and self.k_valid is None and self.xpos is None


@dataclass(frozen=True)
class XposBlocks:
    """Query blocks of a long uncached forward, each to be scaled around its own xPos center."""

    blocks: list[tuple[int, int]]  # [start, end) query rows; positions in each span <= 2 * reach
    rotary_dim: int
    scale_base: float
    max_factor: float


class Attention(nn.Module):
    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.dim_head = config.heads, config.attn_kv_heads, config.dim_head
        self.flash = config.attn_flash
        # One fused projection for queries, keys and values: (C) -> ((H + 2K) * D).
        self.to_qkv = nn.Linear(config.dim, (self.heads + 2 * self.kv_heads) * self.dim_head, bias=False)
        self.to_out = nn.Linear(self.heads * self.dim_head, config.dim, bias=False)
        self.qk_norm = config.use_qk_norm
        if self.qk_norm and config.attn_qk_norm_dim_scale:
            # Learned per-head, per-channel scales (Henry et al. 2020; x-transformers' init).
            self.q_scale = nn.Parameter(torch.empty(self.heads, 1, self.dim_head))
            self.k_scale = nn.Parameter(torch.empty(self.kv_heads, 1, self.dim_head))
            self.logit_scale = self.dim_head**-0.5
        else:
            self.q_scale = self.k_scale = None
            self.logit_scale = config.qk_norm_fixed_scale if self.qk_norm else self.dim_head**-0.5

    def reset_parameters(self) -> None:
        if self.q_scale is not None:
            nn.init.constant_(self.q_scale, self.dim_head**0.25)
            nn.init.constant_(self.k_scale, self.dim_head**0.25)

    def forward(self, x: Tensor, inputs: AttentionInputs) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.heads, self.kv_heads, self.dim_head
        qkv = projection(x, self.to_qkv, inputs.transpose).view(B, T, H + 2 * K, D)
        if self._fused_prologue(qkv, inputs):  # the same heads, in bf16 for the fused attention
            q, k, v = inputs.attention_prologue(qkv, self.q_scale, self.k_scale, inputs.rotary, NORM_EPS)
        else:
            q, k, v = qkv.transpose(1, 2).split((H, K, K), dim=1)  # (B, H, T, D), (B, K, T, D), (B, K, T, D)
            if self.qk_norm:
                q, k = l2_normalize(q, NORM_EPS), l2_normalize(k, NORM_EPS)
                if self.q_scale is not None:
                    q, k = q * self.q_scale, k * self.k_scale
            if inputs.rotary is not None and inputs.xpos is None:
                (q_cos, q_sin), (k_cos, k_sin) = inputs.rotary
                q, k = apply_rotary(q, q_cos, q_sin), apply_rotary(k, k_cos, k_sin)
        step = inputs.cache
        if step is not None and step.decode_attention is not None:  # the cache's own kernel (cache.py)
            step.store(self.layer, k, v)
            out = step.decode_attention(step, self.layer, q, inputs.slopes, self.logit_scale)  # (B, H, 1, D)
        else:
            if step is not None:
                k, v = step.write(self.layer, k, v)  # (B, K, S, D)
            out = attend(q, k, v, inputs, scale=self.logit_scale, flash=self.flash)  # (B, H, T, D)
        return projection(out.transpose(1, 2).reshape(B, T, H * D), self.to_out, inputs.transpose)

    def _fused_prologue(self, qkv: Tensor, inputs: AttentionInputs) -> bool:
        """Whether `inputs.attention_prologue` computes this layer's heads: where the fused causal
        attention will read them (bf16 CPU autocast, more than one query, no cache), with QK-norm's
        float32 scales and one xPos center."""
        return (inputs.attention_prologue is not None and inputs.causal_attention is not None and self.flash
                and inputs.cache is None and inputs.plain_causal and inputs.rotary is not None and qkv.shape[1] > 1
                and self.q_scale is not None and self.q_scale.dtype == torch.float32
                and qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu"
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def l2_normalize(x: Tensor, eps: float = NORM_EPS) -> Tensor:
    """x / max(||x||, eps) along the last dimension, in x's dtype: F.normalize, bit for bit in fp32
    and bf16, except that CUDA autocast runs F.normalize's norm in fp32 and so returns fp32 for
    bf16 input, doubling the traffic of QK-norm, rotary and attention's inputs. Here only the
    (..., 1) norms are fp32; the division stays in x's dtype."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return x / norm.clamp_min(eps).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, *, scale: float, flash: bool) -> Tensor:
    """softmax(q.k * scale + ALiBi + mask) v, never materialising (B, H, T, S) at once."""
    T = q.shape[2]
    if inputs.xpos is not None:
        return _attend_in_xpos_blocks(q, k, v, inputs, scale, flash)
    if T == 1 and flash:
        return _attend_one_query(q, k, v, inputs, scale)
    if flash and inputs.plain_causal:
        if inputs.causal_attention is not None and _bf16_on_cpu(q) and T == k.shape[2]:
            q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))  # as autocast gives SDPA its inputs
            return inputs.causal_attention(q, k, v, inputs.k_pos, inputs.slopes, scale)
        if inputs.slopes is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return _alibi_as_channels(q, k, v, inputs, scale)
    outputs = []
    for start in range(0, T, QUERY_CHUNK):
        rows = slice(start, start + QUERY_CHUNK)
        bias = _bias(inputs, rows, q.dtype)  # (B or 1, H or 1, rows, S)
        if flash:
            out = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=bias, scale=scale, enable_gqa=True)
        else:
            out = _reference_attention(q[:, :, rows], k, v, bias, scale)
        outputs.append(out)
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def _bf16_on_cpu(q: Tensor) -> bool:
    """Whether attention on q runs in bf16 on the CPU: bf16 q, or CPU autocast to bf16 (which casts
    SDPA's inputs: under it QK-norm's learned scales leave q and k in float32)."""
    if q.device.type != "cpu":
        return False
    return q.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and
                                         torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _attend_one_query(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, scale: float) -> Tensor:
    """A decoding step: one query row per head, with ALiBi and the mask as one additive bias (and
    the cache's fused attention, where it owns one)."""
    fused = inputs.cache.decode_sdpa if inputs.cache is not None else None
    return _sdpa(q, k, v, _bias(inputs, slice(0, 1), q.dtype), scale, fused)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, fused: DecodeSDPA | None = None) -> Tensor:
    """Fused attention of q (B, H, T, D) over k, v (B, K, S, D), each key/value head read by
    H // K query heads; mask (B or 1, H or 1, T, S) is added to the scores.

    With one query row (a decoding step), the G = H // K query heads that read one key/value head
    become G query rows of that head: the fused kernel runs K heads of G rows instead of H heads of
    one row, a shape the CPU kernel runs 2.7-4x faster (bf16, 24 heads over 2, 256 to 8192 keys),
    and keys are never repeated. `fused` (the cache's `DecodeSDPA`) then runs instead of PyTorch's.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if T > 1 or (H == K and fused is None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    if mask.shape[1] > 1:  # (B or 1, H, 1, S) -> (B or 1, K, G, S)
        mask = mask.reshape(mask.shape[0], K, H // K, S)
    attention = fused if fused is not None else _grouped_sdpa
    out = attention(q.reshape(B, K, H // K, D), k, v, mask, scale)
    return out.reshape(B, H, 1, out.shape[-1])  # (B, K, G, Dv) -> (B, H, 1, Dv)


def _grouped_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _bias(inputs: AttentionInputs, rows: slice, dtype: torch.dtype) -> Tensor:
    """ALiBi plus the mask as one additive bias: (B or 1, H or 1, rows, S).

    Every layer of a forward pass sees the same positions and padding, so each block of rows is
    built once and shared. (Only while it is the sole block: long prefills don't keep them all.)
    """
    key = (rows.start or 0, dtype)
    if key not in inputs.biases:
        bias = _build_bias(inputs, rows, dtype)
        if inputs.q_pos.shape[-1] > QUERY_CHUNK:
            return bias
        inputs.biases[key] = bias
    return inputs.biases[key]


def _build_bias(inputs: AttentionInputs, rows: slice, dtype: torch.dtype) -> Tensor:
    return additive_bias(inputs.q_pos[:, rows], inputs.k_pos, inputs.k_valid, inputs.slopes, inputs.window, dtype)


def additive_bias(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor | None, slopes: Tensor | None,
                  window: tuple[int, int] | None, dtype: torch.dtype) -> Tensor:
    """ALiBi plus the mask for queries at q_pos (B or 1, T) and keys at k_pos (B or 1, S):
    (B or 1, H or 1, T, S)."""
    allowed = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]  # (B or 1, 1, T, S)
    if window is not None:  # sinks, and the last W - S positions
        size, sinks = window
        recent = (q_pos[:, :, None] - k_pos[:, None, :] < size - sinks) | (k_pos[:, None, :] < sinks)
        allowed = allowed & recent[:, None]
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    if slopes is not None:
        bias = bias + alibi_bias(slopes, q_pos, k_pos).to(dtype)  # (B or 1, H, T, S)
    # The dtype's lowest finite value, not -inf: a query that may read nothing (a padding
    # position) then averages its row instead of turning into NaN, which would reach real tokens
    # through the padding's keys. Next to any allowed key it weighs exactly 0.
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def _attend_in_xpos_blocks(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, scale: float,
                           flash: bool) -> Tensor:
    """Causal attention for a sequence too long for one xPos center; q, k are not yet rotated.

    Each block of queries gets the center midway between its first and last position, so its
    queries' factors stay within `max_factor`; it reads the keys of rows [0, end), rotated and
    scaled around that same center: those near it keep their exact factors, those far behind
    shrink towards 0, as their true products zeta^((i - j) / base) do. Equal to the
    one-center computation wherever that one is finite (tests/test_long_context.py). On the fused
    path ALiBi rides along as key channels (exact to 2^24 positions) and the mask is one
    (rows, end) tensor shared by all heads.
    """
    blocks = inputs.xpos
    D = q.shape[-1]
    cos, sin = inputs.rotary[0]  # (B or 1, 1, T, R/2) pure rotations
    outputs = []
    for start, end in blocks.blocks:
        rows, keys = slice(start, end), slice(0, end)
        q_pos, k_pos = inputs.q_pos[:, rows], inputs.k_pos[:, keys]  # (B or 1, rows), (B or 1, end)
        center = (q_pos[:, :1] + q_pos[:, -1:]) // 2  # (B or 1, 1)
        q_scale = xpos_scale(q_pos, blocks.rotary_dim, blocks.scale_base, center)
        k_scale = xpos_scale(k_pos, blocks.rotary_dim, blocks.scale_base, center)
        q_tables = xpos_fold(cos[:, :, rows], sin[:, :, rows], q_scale, blocks.max_factor, query=True)
        k_tables = xpos_fold(cos[:, :, keys], sin[:, :, keys], k_scale, blocks.max_factor, query=False)
        q_block = apply_rotary(q[:, :, rows], *q_tables)  # (B, H, rows, D)
        k_block = apply_rotary(k[:, :, keys], *k_tables)  # (B, K, end, D)
        k_valid = None if inputs.k_valid is None else inputs.k_valid[:, keys]
        if not flash:
            bias = additive_bias(q_pos, k_pos, k_valid, inputs.slopes, inputs.window, q.dtype)
            outputs.append(_reference_attention(q_block, k_block, v[:, :, keys], bias, scale))
            continue
        if k_valid is None and inputs.window is None:
            mask = _causal_block_mask(inputs, end - start, q.dtype)[..., -end:]  # (1, 1, rows, end)
        else:
            mask = additive_bias(q_pos, k_pos, k_valid, None, inputs.window, q.dtype)  # (B or 1, 1, rows, end)
        v_block, block_scale = v[:, :, keys], scale
        if inputs.slopes is not None:
            q_block, k_block, v_block = _append_alibi_channels(q_block, k_block, v_block, inputs.slopes, k_pos,
                                                               center, scale, parts=3)
            block_scale = 1.0
        out = _sdpa(q_block, k_block, v_block, mask, block_scale)
        outputs.append(out[..., :D])
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def _causal_block_mask(inputs: AttentionInputs, rows: int, dtype: torch.dtype) -> Tensor:
    """(1, 1, rows, T): 0, except the lowest finite value above the diagonal of the last rows
    columns. Its last `end` columns are the causal mask of the block of queries [end - rows,
    end) over keys [0, end): one tensor, built once per forward pass, serves every block of
    that size in every layer."""
    key = (-rows, dtype)  # negative: apart from `_bias`'s keys (first row >= 0)
    if key not in inputs.biases:
        T = inputs.q_pos.shape[-1]
        mask = torch.zeros(1, 1, rows, T, dtype=dtype, device=inputs.q_pos.device)
        above = torch.ones(rows, rows, dtype=torch.bool, device=mask.device).triu(1)
        mask[0, 0, :, T - rows :].masked_fill_(above, torch.finfo(dtype).min)
        inputs.biases[key] = mask
    return inputs.biases[key]


def _reference_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """The explicit computation, written for reading; grouped so keys are never repeated."""
    B, H, T, D = q.shape
    K = k.shape[1]
    q = q.view(B, K, H // K, T, D)  # (B, K, G, T, D)
    scores = torch.einsum("bkgtd,bksd->bkgts", q, k).float() * scale  # (B, K, G, T, S)
    scores = scores + bias.float().view(bias.shape[0], K if bias.shape[1] > 1 else 1, -1, T, bias.shape[-1])
    weights = scores.softmax(dim=-1).to(v.dtype)
    out = torch.einsum("bkgts,bksd->bkgtd", weights, v)  # (B, K, G, T, D)
    return out.reshape(B, H, T, D)


def alibi_channels(dim_head: int, device_type: str, parts: int = 2) -> int:
    """Channels appended to each head by `_alibi_as_channels`: the `parts` it uses, zero-padded
    on CUDA to a multiple of CUDA_HEAD_MULTIPLE, the head sizes its fused kernels take. CPU
    kernels take any size, and there every extra channel is extra attention work."""
    if device_type == "cpu":
        return parts
    extra = -dim_head % CUDA_HEAD_MULTIPLE or CUDA_HEAD_MULTIPLE
    return extra if extra >= parts else extra + CUDA_HEAD_MULTIPLE


def _alibi_as_channels(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, scale: float) -> Tensor:
    """Causal attention with ALiBi through the fused causal kernel, with no bias tensor at all.

    Softmax ignores a constant per query row, so -slope*(i - j) may be replaced by slope*(j - c)
    for any c. That is a dot product: append slope to each query and (j - c) to each key. The
    integer j - c is split into a multiple of ALIBI_SPLIT and a remainder below it so both are
    exact in bf16 too; c is the middle position to keep the products small. Heads without ALiBi
    have slope 0. The extra channels are also padded onto v (then dropped), so q, k and v keep
    one head size, which the fused kernels need; on CUDA they are padded to a multiple of 8.
    """
    D = q.shape[-1]
    q, k, v = _append_alibi_channels(q, k, v, inputs.slopes, inputs.k_pos, q.shape[2] // 2, scale, parts=2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
    return out[..., :D]


def _append_alibi_channels(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, k_pos: Tensor, center: Tensor | int,
                           scale: float, parts: int) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, H, T, D) times `scale` and k (B, K, S, D) at k_pos (B or 1, S), with the ALiBi
    channels appended: slope on the queries, j - center on the keys, split into `parts` pieces
    (multiples of ALIBI_SPLIT^(parts-1), ..., ALIBI_SPLIT, and a remainder), each exact in bf16;
    2 pieces cover |j - center| up to 65,536, 3 up to 2^24. v is zero-padded to match; attend
    with scale 1 and drop the extra output channels."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    rel = (k_pos - center).to(torch.float32)  # (B or 1, S)
    pieces = []
    for level in range(parts - 1, 0, -1):
        unit = ALIBI_SPLIT**level
        high = torch.round(rel / unit) * unit
        pieces.append(high)
        rel = rel - high
    pieces.append(rel)
    extra = alibi_channels(D, q.device.type, parts)
    k_extra = torch.zeros(*rel.shape, extra, dtype=torch.float32, device=q.device)  # (B or 1, S, extra)
    for index, piece in enumerate(pieces):
        k_extra[..., index] = piece
    q_extra = torch.zeros(H, extra, dtype=torch.float32, device=q.device)
    q_extra[:, :parts] = slopes.float()[:, None]
    q = torch.cat((q * scale, q_extra.to(q.dtype)[None, :, None, :].expand(B, H, T, extra)), dim=-1)
    k = torch.cat((k, k_extra.to(k.dtype)[:, None].expand(B, K, S, extra)), dim=-1)
    return q, k, F.pad(v, (0, extra))
