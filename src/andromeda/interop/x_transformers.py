"""Weights from x-transformers 2.31: `TransformerWrapper(Decoder(...))` -> our Transformer.

x-transformers keeps queries, keys and values in three matrices and numbers query heads so that
head h reads key/value head h % K; we fuse the three and store queries grouped by key/value head
(attention.query_head_order). Its Decoder alternates attention and feed-forward entries in one
list: entry 2i is block i's attention, 2i + 1 its feed-forward. Its norms store gamma - 1
(`norm_add_unit_offset=True`, the default): we store the gain itself.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import Tensor, nn

from ..model.attention import query_head_order
from ..config import Config

log = logging.getLogger(__name__)

# x-transformers buffers that our model derives from the config instead of storing.
_DERIVED = ("attn_layers.rotary_pos_emb.inv_freq", "attn_layers.rotary_pos_emb.scale")


def from_x_transformers(
    state_dict: Mapping[str, Tensor], config: Config, *, norm_unit_offset: bool = True
) -> dict[str, Tensor]:
    """Convert a state dict, checking every key and shape first; raises ValueError on mismatch.

    `norm_unit_offset` must match the Decoder's `norm_add_unit_offset` (True by default there).
    """
    offset = 1.0 if norm_unit_offset else 0.0
    inv_freq = state_dict.get(_DERIVED[0])
    if (inv_freq is not None) != config.rotary_xpos or (
        inv_freq is not None and inv_freq.numel() != config.rotary_dim // 2
    ):
        found = "none" if inv_freq is None else f"{2 * inv_freq.numel()} channels"
        raise ValueError(f"x-transformers rotary embedding ({found}) does not match "
                         f"rotary_xpos={config.rotary_xpos} with {config.rotary_dim} rotary channels")
    sd = {k: v for k, v in state_dict.items() if k not in _DERIVED}
    taken: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in sd:
            raise ValueError(f"x-transformers state dict lacks {key!r}: was it built with the same "
                             f"hyperparameters (depth={config.depth}, dim={config.dim})?")
        value = sd[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {shape} for {config}")
        taken.add(key)
        return value

    C, H, K, D = config.dim, config.heads, config.attn_kv_heads, config.dim_head
    order = list(query_head_order(H, K))
    out: dict[str, Tensor] = {"token_emb.weight": take("token_emb.emb.weight", (config.num_tokens, C))}
    if config.use_abs_pos_emb:
        if "pos_emb.emb.weight" in sd:
            out["pos_emb.weight"] = take("pos_emb.emb.weight", (config.max_seq_len, C))
        else:
            # x-transformers silently drops absolute positions when rotary is on; zeros
            # reproduce that model exactly.
            log.warning("x-transformers state dict has no absolute position embedding (it "
                        "disables them with rotary); loading zeros, which is equivalent")
            out["pos_emb.weight"] = torch.zeros(config.max_seq_len, C)
    for i in range(config.depth):
        a, f, ours = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}", f"blocks.{i}"
        q = take(f"{a}.1.to_q.weight", (H * D, C)).view(H, D, C)[order].reshape(H * D, C)
        k = take(f"{a}.1.to_k.weight", (K * D, C))
        v = take(f"{a}.1.to_v.weight", (K * D, C))
        out[f"{ours}.attn.to_qkv.weight"] = torch.cat((q, k, v))
        to_out = take(f"{a}.1.to_out.weight", (C, H * D)).view(C, H, D)[:, order].reshape(C, H * D)
        out[f"{ours}.attn.to_out.weight"] = to_out
        if config.use_qk_norm and config.attn_qk_norm_dim_scale:
            out[f"{ours}.attn.q_scale"] = take(f"{a}.1.qk_norm_q_scale", (H, 1, D))[order]
            out[f"{ours}.attn.k_scale"] = take(f"{a}.1.qk_norm_k_scale", (K, 1, D))
        out[f"{ours}.attn_norm.weight"] = take(f"{a}.0.0.gamma", (C,)) + offset
        out[f"{ours}.ff_norm.weight"] = take(f"{f}.0.0.gamma", (C,)) + offset
        out[f"{ours}.ff.proj_in.weight"] = take(f"{f}.1.ff.0.0.weight", (config.ff_dim, C))
        out[f"{ours}.ff.proj_in.bias"] = take(f"{f}.1.ff.0.0.bias", (config.ff_dim,))
        out[f"{ours}.ff.proj_out.weight"] = take(f"{f}.1.ff.2.weight", (C, config.ff_dim))
        out[f"{ours}.ff.proj_out.bias"] = take(f"{f}.1.ff.2.bias", (C,))
    out["final_norm.weight"] = take("attn_layers.final_norm.gamma", (C,)) + offset
    out["to_logits.weight"] = take("to_logits.weight", (config.num_tokens, C))
    left = sorted(set(sd) - taken)
    if left:
        raise ValueError(f"x-transformers state dict has entries this config has no place for: "
                         f"{left[:5]}{' ...' if len(left) > 5 else ''}")
    return {k: v.detach().clone() for k, v in out.items()}


def build_x_transformers(config: Config) -> nn.Module:
    """x-transformers' `TransformerWrapper(Decoder(...))` with `config`'s hyperparameters in its
    spelling and its own initialisation: the model `from_x_transformers` converts from. Needs
    x-transformers (the test extra), which Andromeda itself never imports.
    """
    try:
        import x_transformers
    except ImportError as err:
        raise ImportError("build_x_transformers needs x-transformers: pip install -e '.[test]'") from err
    layers = dict(dim=config.dim, depth=config.depth, heads=config.heads,
                  attn_dim_head=config.dim_head, alibi_pos_bias=config.alibi_pos_bias,
                  rotary_xpos=config.rotary_xpos, attn_flash=config.attn_flash,
                  attn_kv_heads=config.attn_kv_heads, attn_qk_norm=config.use_qk_norm,
                  attn_qk_norm_dim_scale=config.attn_qk_norm_dim_scale)
    if config.alibi_pos_bias:
        layers["alibi_num_heads"] = config.alibi_num_heads
    return x_transformers.TransformerWrapper(
        num_tokens=config.num_tokens, max_seq_len=config.max_seq_len,
        use_abs_pos_emb=config.use_abs_pos_emb, attn_layers=x_transformers.Decoder(**layers))
