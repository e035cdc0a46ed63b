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
themselves; everything else gets an explicit additive bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from .cache import CacheStep
from .positions import alibi_bias, apply_rotary

# Query rows per block on the explicit-bias paths: bounds the (B, H, rows, S) scores to a few
# hundred MB at 8192 keys.
QUERY_CHUNK = 512
# The ALiBi key channel j - c is split as a multiple of this plus a remainder below it, so both
# parts are integers bf16 represents exactly (8 significant bits).
ALIBI_SPLIT = 256
# CUDA's fused attention kernels take head sizes that are multiples of this.
CUDA_HEAD_MULTIPLE = 8


@lru_cache(maxsize=None)
def query_head_order(heads: int, kv_heads: int) -> tuple[int, ...]:
    """order[slot] = the x-transformers head number stored in internal slot `slot`.

    Slot kv * G + r holds head r * K + kv, so slots [kv*G, (kv+1)*G) all read kv head `kv`.
    """
    groups = heads // kv_heads
    return tuple(r * kv_heads + kv for kv in range(kv_heads) for r in range(groups))


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
    # Additive biases by (first query row, dtype): built by the first layer, reused by the rest.
    biases: dict[tuple[int, torch.dtype], Tensor] = field(default_factory=dict)

    @property
    def plain_causal(self) -> bool:
        """Query t reads exactly keys 0..t of its row, all real: what fused causal kernels do."""
        fresh = self.cache is None or (self.cache.start == 0 and self.cache.read == self.cache.new)
        return fresh and self.k_valid is None


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
        qkv = self.to_qkv(x).view(B, T, H + 2 * K, D).transpose(1, 2)  # (B, H + 2K, T, D)
        q, k, v = qkv.split((H, K, K), dim=1)  # (B, H, T, D), (B, K, T, D), (B, K, T, D)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            if self.q_scale is not None:
                q, k = q * self.q_scale, k * self.k_scale
        if inputs.rotary is not None:
            (q_cos, q_sin), (k_cos, k_sin) = inputs.rotary
            q, k = apply_rotary(q, q_cos, q_sin), apply_rotary(k, k_cos, k_sin)
        if inputs.cache is not None:
            k, v = inputs.cache.write(self.layer, k, v)  # (B, K, S, D)
        out = attend(q, k, v, inputs, scale=self.logit_scale, flash=self.flash)  # (B, H, T, D)
        return self.to_out(out.transpose(1, 2).reshape(B, T, H * D))


def attend(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, *, scale: float, flash: bool) -> Tensor:
    """softmax(q.k * scale + ALiBi + mask) v, never materialising (B, H, T, S) at once."""
    T = q.shape[2]
    if T == 1 and flash:
        return _attend_one_query(q, k, v, inputs, scale)
    if flash and inputs.plain_causal:
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


def _attend_one_query(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, scale: float) -> Tensor:
    """A decoding step: the G query heads that read one key/value head become G query rows of
    that head, so the fused kernel runs K heads of G rows instead of H heads of one row (a shape
    CPU kernels handle far more slowly; benchmarks/bench_decode.py), and keys are never repeated.
    """
    B, H, _, D = q.shape
    K, S = k.shape[1], k.shape[2]
    bias = _bias(inputs, slice(0, 1), q.dtype)  # (B or 1, H or 1, 1, S)
    bias = bias.view(bias.shape[0], K, H // K, S) if bias.shape[1] > 1 else bias.view(-1, 1, 1, S)
    out = F.scaled_dot_product_attention(q.view(B, K, H // K, D), k, v, attn_mask=bias, scale=scale)
    return out.view(B, H, 1, D)  # (B, K, G, D) -> (B, H, 1, D)


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
    q_pos, k_pos = inputs.q_pos[:, rows], inputs.k_pos  # (B or 1, rows), (B or 1, S)
    allowed = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]  # (B or 1, 1, rows, S)
    if inputs.k_valid is not None:
        allowed = allowed & inputs.k_valid[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    if inputs.slopes is not None:
        bias = bias + alibi_bias(inputs.slopes, q_pos, k_pos).to(dtype)  # (B or 1, H, rows, S)
    # The dtype's lowest finite value, not -inf: a query that may read nothing (a padding
    # position) then averages its row instead of turning into NaN, which would reach real tokens
    # through the padding's keys. Next to any allowed key it weighs exactly 0.
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


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


def alibi_channels(dim_head: int, device_type: str) -> int:
    """Channels appended to each head by `_alibi_as_channels`: the 2 it uses, zero-padded on
    CUDA to a multiple of CUDA_HEAD_MULTIPLE, the head sizes its fused kernels take. CPU kernels
    take any size, and there every extra channel is extra attention work."""
    if device_type == "cpu":
        return 2
    return -dim_head % CUDA_HEAD_MULTIPLE or CUDA_HEAD_MULTIPLE


def _alibi_as_channels(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, scale: float) -> Tensor:
    """Causal attention with ALiBi through the fused causal kernel, with no bias tensor at all.

    Softmax ignores a constant per query row, so -slope*(i - j) may be replaced by slope*(j - c)
    for any c. That is a dot product: append slope to each query and (j - c) to each key. The
    integer j - c is split into a multiple of ALIBI_SPLIT and a remainder below it so both are
    exact in bf16 too; c is the middle position to keep the products small. Heads without ALiBi
    have slope 0. The extra channels are also padded onto v (then dropped), so q, k and v keep
    one head size, which the fused kernels need; on CUDA they are padded to a multiple of 8.
    """
    B, H, T, D = q.shape
    K = k.shape[1]
    rel = (inputs.k_pos - T // 2).to(torch.float32)  # (B or 1, S)
    high = torch.round(rel / ALIBI_SPLIT) * ALIBI_SPLIT
    extra = alibi_channels(D, q.device.type)
    k_extra = torch.zeros(*rel.shape, extra, dtype=torch.float32, device=q.device)  # (B or 1, S, extra)
    k_extra[..., 0], k_extra[..., 1] = high, rel - high
    q_extra = torch.zeros(H, extra, dtype=torch.float32, device=q.device)
    q_extra[:, 0] = q_extra[:, 1] = inputs.slopes.float()
    q = torch.cat((q * scale, q_extra.to(q.dtype)[None, :, None, :].expand(B, H, T, extra)), dim=-1)
    k = torch.cat((k, k_extra.to(k.dtype)[:, None].expand(B, K, T, extra)), dim=-1)
    v = F.pad(v, (0, extra))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
    return out[..., :D]
