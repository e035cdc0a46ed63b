"""Andromeda in Hugging Face `transformers` (tested with 5.24): a decoder-only language model with
grouped-query attention, QK-norm with a learned per-channel scale, rotary xPos and ALiBi.

This file is copied verbatim into every folder `andromeda export-hf` writes and imports only
torch and transformers. It computes Andromeda's model (logits equal to 1e-5 in fp32), written for
reading rather than speed: attention is explicit, with fp32 scores, in blocks of query rows.

Shape letters: B batch, T new (query) positions, S key positions (cached + new), H query heads,
K key/value heads, G = H // K query heads per key/value head, D head size, R rotary channels,
C hidden size, V vocabulary.

Heads. Query head h reads key/value head h // G (the `repeat_kv` convention of transformers).
ALiBi is defined on x-transformers' numbering, in which head n reads key/value head n % K and the
ALiBi heads are n < alibi_num_heads; query head h here is x-transformers head (h % G) * K + h // G,
and `alibi_slopes_by_head` permutes the slopes to match.

Positions. `position_ids` (B, T) are the new tokens' absolute positions; by default they count
from each row's first real token (attention_mask.cumsum(-1) - 1), so a left-padded row is computed
as it would be alone. Cached keys keep the positions their tokens had: a row's real tokens are
numbered consecutively, ending just before the row's first new token (what left padding and
`generate` produce). ALiBi reads |i - j| and rotary reads i - j from these positions; learned
absolute positions (use_abs_pos_emb) read i. Attention is causal by index, and keys whose
attention_mask is 0 are never attended to.

xPos center. xPos scales queries by zeta^((i - c) / xpos_scale_base) and keys by
zeta^(-(j - c) / xpos_scale_base). Any fixed c cancels in q.k, but cached keys keep the scale of
the c they were written with, so one c must serve a cache for its whole life. Every call here
uses c = max_position_embeddings // 2: the powers then stay within +-max_position_embeddings /
(2 * xpos_scale_base) over the trained context, the range a full-length training sequence used
(Andromeda centres an uncached sequence of T tokens at T // 2), and cached and uncached calls of
any length agree.

Cache. Any transformers `Cache` (a DynamicCache by default): each layer stores its keys after
QK-norm, rotation and the xPos scale, and its values, for the K key/value heads only: (B, K, S, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_andromeda import AndromedaConfig

# Query rows per block of attention scores: bounds the (B, H, rows, S) fp32 scores.
QUERY_CHUNK = 512
# transformers 5.x renamed the outputs' `past_key_values` to `cache`; fill the field this version has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# --------------------------------------------------------------------------- positions


def alibi_slopes(num_alibi_heads: int, heads: int) -> list[float]:
    """ALiBi slopes in x-transformers' head order (Press et al. 2021, arXiv:2108.12409): the
    geometric sequence 2^(-8/n), 2^(-16/n), ... for a power of two n, else the interleaved
    schedule; zero for heads n >= num_alibi_heads."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n = num_alibi_heads
    if math.log2(n).is_integer():
        slopes = power_of_two(n)
    else:
        lower = 2 ** math.floor(math.log2(n))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: n - lower]
    return slopes + [0.0] * (heads - n)


def alibi_slopes_by_head(config: AndromedaConfig) -> list[float]:
    """The slope of each query head h of this model (x-transformers head (h % G) * K + h // G)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    groups = heads // kv_heads
    slopes = alibi_slopes(config.alibi_num_heads, heads)
    return [slopes[(h % groups) * kv_heads + h // groups] for h in range(heads)]


def rotary_tables(positions: Tensor, config: AndromedaConfig, center: int):
    """Rotation tables at `positions` (B, T): ((cos, sin) for queries, (cos, sin) for keys), each
    (B, T, R/2) fp32, with xPos' scale folded in (Sun et al. 2022, arXiv:2212.10554)."""
    rotary_dim = config.rotary_dim
    pairs = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = config.rotary_base ** (-pairs / rotary_dim)  # (R/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, R/2)
    cos, sin = angles.cos(), angles.sin()
    zeta = (pairs + 0.4 * rotary_dim) / (1.4 * rotary_dim)  # (R/2,)
    power = (positions.to(torch.float32) - center) / config.xpos_scale_base  # (B, T)
    scale = zeta ** power[..., None]  # (B, T, R/2)
    return (cos * scale, sin * scale), (cos / scale, sin / scale)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first R channels of x (B, heads, T, D) in adjacent pairs (GPT-J layout), in fp32."""
    rotary_dim = 2 * cos.shape[-1]
    pairs = x[..., :rotary_dim].float().unflatten(-1, (-1, 2))  # (B, heads, T, R/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, R/2)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


@dataclass
class AttentionInputs:
    """What every layer's attention needs about positions and masking, built once per forward."""

    q_pos: Tensor  # (B, T) absolute positions of the new tokens
    k_pos: Tensor  # (B, S) absolute positions of all keys, cached and new
    allowed: Tensor  # (B, T, S) bool: which keys each query attends to
    rotary: tuple | None  # ((cos, sin) for queries, (cos, sin) for keys), each (B, T, R/2)
    slopes: Tensor | None  # (H,) fp32 ALiBi slopes by query head, None without ALiBi
    _biases: dict = field(default_factory=dict)

    def bias(self, rows: slice, num_keys: int) -> Tensor:
        """ALiBi plus the mask as one additive fp32 bias: (B, H or 1, rows, num_keys).

        `num_keys` may exceed S when a preallocated (static) cache returns unwritten slots;
        those are masked out.
        """
        key = (rows.start, num_keys)
        if key in self._biases:
            return self._biases[key]
        allowed, k_pos = self.allowed[:, rows], self.k_pos
        extra = num_keys - allowed.shape[-1]
        if extra > 0:
            allowed, k_pos = F.pad(allowed, (0, extra), value=False), F.pad(k_pos, (0, extra))
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)[:, None]
        if self.slopes is not None:
            distance = (self.q_pos[:, rows, None] - k_pos[:, None, :]).abs().float()  # (B, rows, S)
            bias = bias - self.slopes[None, :, None, None] * distance[:, None]  # (B, H, rows, S)
        bias = bias.masked_fill(~allowed[:, None], float("-inf"))
        if self.q_pos.shape[1] <= QUERY_CHUNK:  # one block: every layer reuses it
            self._biases[key] = bias
        return bias


# --------------------------------------------------------------------------- layers


class AndromedaAttention(nn.Module):
    def __init__(self, config: AndromedaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        C, H, K, D = config.hidden_size, self.heads, self.kv_heads, self.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, K * D, bias=False)
        self.v_proj = nn.Linear(C, K * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm and config.qk_norm_dim_scale:
            # Learned per-head, per-channel scales of the normalised queries and keys.
            self.q_scale = nn.Parameter(torch.full((H, D), D**0.25))
            self.k_scale = nn.Parameter(torch.full((K, D), D**0.25))
            self.scaling = D**-0.5
        else:
            self.q_scale = self.k_scale = None
            self.scaling = config.qk_norm_fixed_scale if config.qk_norm else D**-0.5

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: Cache | None) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.heads, self.kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            if self.q_scale is not None:
                q, k = q * self.q_scale[:, None], k * self.k_scale[:, None]
        if inputs.rotary is not None:
            (q_cos, q_sin), (k_cos, k_sin) = inputs.rotary
            q, k = apply_rotary(q, q_cos, q_sin), apply_rotary(k, k_cos, k_sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, K, S, D)
        out = attend(q, k, v, inputs, self.scaling)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


def attend(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, scale: float) -> Tensor:
    """softmax(q.k * scale + ALiBi + mask) v with fp32 scores, a block of query rows at a time;
    the G query heads of each key/value head share its keys (never repeated)."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    q = q.view(B, K, H // K, T, D)  # (B, K, G, T, D)
    outputs = []
    for start in range(0, T, QUERY_CHUNK):
        rows = slice(start, start + QUERY_CHUNK)
        scores = torch.einsum("bkgtd,bksd->bkgts", q[:, :, :, rows], k).float() * scale
        bias = inputs.bias(rows, S)  # (B, H or 1, rows, S)
        scores = scores + bias.view(B, K if bias.shape[1] > 1 else 1, -1, *bias.shape[2:])
        weights = scores.softmax(dim=-1).to(v.dtype)  # (B, K, G, rows, S)
        outputs.append(torch.einsum("bkgts,bksd->bkgtd", weights, v))
    out = torch.cat(outputs, dim=3) if len(outputs) > 1 else outputs[0]
    return out.reshape(B, H, T, D)


class AndromedaMLP(nn.Module):
    """Linear -> GELU (exact) -> Linear, with biases."""

    def __init__(self, config: AndromedaConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class AndromedaBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: AndromedaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)
        self.self_attn = AndromedaAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)
        self.mlp = AndromedaMLP(config)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: Cache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------- models


class AndromedaPreTrainedModel(PreTrainedModel):
    config_class = AndromedaConfig
    base_model_prefix = "model"
    _no_split_modules = ["AndromedaBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # linear and embedding weights N(0, 0.02), norms 1, biases 0
        if isinstance(module, AndromedaAttention) and module.q_scale is not None:
            for scale in (module.q_scale, module.k_scale):
                if not getattr(scale, "_is_hf_initialized", False):
                    with torch.no_grad():
                        scale.fill_(module.head_dim**0.25)


def _new_cache(config: AndromedaConfig) -> Cache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # versions whose DynamicCache takes no config
        return DynamicCache()


class AndromedaModel(AndromedaPreTrainedModel):
    """Token ids (B, T) -> final-normed hidden states (B, T, C)."""

    def __init__(self, config: AndromedaConfig) -> None:
        super().__init__(config)
        C = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, C)
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, C) if config.use_abs_pos_emb else None
        )
        self.layers = nn.ModuleList(AndromedaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(C, eps=config.layer_norm_eps, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = _one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = _new_cache(self.config)
        past = int(cache.get_seq_length()) if cache is not None else 0
        inputs = self._attention_inputs(attention_mask, position_ids, past, B, T, x.device)
        if self.embed_positions is not None:
            x = x + self._absolute_positions(inputs.q_pos) * self.config.hidden_size**-0.5
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, inputs, cache)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states[-1] = x
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            **{_CACHE_FIELD: cache if use_cache else None},
        )

    def _attention_inputs(
        self, attention_mask: Tensor | None, position_ids: Tensor | None, past: int, B: int, T: int,
        device: torch.device,
    ) -> AttentionInputs:
        S = past + T
        key_real = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape != (B, S):
                raise ValueError(
                    f"attention_mask must be (batch, cached + new) = ({B}, {past} + {T}), a 1 for "
                    f"each real token and a 0 for padding; got shape {tuple(attention_mask.shape)}"
                )
            key_real = attention_mask.to(device=device, dtype=torch.bool)  # (B, S)
        if position_ids is None:
            if key_real is not None:  # counted from each row's first real token
                position_ids = (key_real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, S, device=device)[None]
        position_ids = position_ids.to(device=device, dtype=torch.long).expand(B, T)  # (B, T)
        if past:
            # Real cached tokens numbered consecutively up to the first new token's position.
            if key_real is not None:
                later = key_real[:, :past].long().flip(-1).cumsum(-1).flip(-1)  # (B, past)
            else:
                later = torch.arange(past, 0, -1, device=device)[None]
            k_pos = torch.cat((position_ids[:, :1] - later, position_ids), dim=1)  # (B, S)
        else:
            k_pos = position_ids
        q_index = torch.arange(past, S, device=device)  # (T,)
        k_index = torch.arange(S, device=device)  # (S,)
        causal = k_index[None, :] <= q_index[:, None]  # (T, S)
        allowed = causal[None].expand(B, T, S)
        if key_real is not None:
            # A padding query sees only padding; letting it see itself keeps its softmax finite.
            allowed = allowed & key_real[:, None, :] | (k_index[None, :] == q_index[:, None])[None]
        rotary = None
        if self.config.rotary_xpos:
            rotary = rotary_tables(position_ids, self.config, self.config.max_position_embeddings // 2)
        slopes = None
        if self.config.alibi:
            slopes = torch.tensor(alibi_slopes_by_head(self.config), dtype=torch.float32, device=device)
        return AttentionInputs(position_ids, k_pos, allowed, rotary, slopes)

    def _absolute_positions(self, positions: Tensor) -> Tensor:
        limit = self.config.max_position_embeddings
        if int(positions.max()) >= limit:
            raise ValueError(
                f"position {int(positions.max())} is beyond the learned absolute positions "
                f"(max_position_embeddings={limit})"
            )
        return self.embed_positions(positions.clamp(min=0))  # padding may carry position -1


class AndromedaForCausalLM(AndromedaPreTrainedModel, GenerationMixin):
    def __init__(self, config: AndromedaConfig) -> None:
        super().__init__(config)
        self.model = AndromedaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def create_masks_for_generate(self, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
        """`generate` with a static cache would expand the (B, S) padding mask to 4-D; this model
        builds its masks from the 2-D one (and masks a static cache's unwritten slots itself)."""
        return attention_mask

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, V), or of the last `logits_to_keep` positions (0 keeps all; a tensor
        selects positions). `labels` (B, T) give the mean next-token loss (-100 ignored).
        `cache` (alias `past_key_values`): a transformers Cache, extended in place."""
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(shifted, labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        use_tuple = return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True))
        return output.to_tuple() if use_tuple else output


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache, under either of its names (`past_key_values` before transformers 5.x)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(
            f"the cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}"
        )
    return cache


__all__ = ["AndromedaForCausalLM", "AndromedaModel", "AndromedaPreTrainedModel"]
