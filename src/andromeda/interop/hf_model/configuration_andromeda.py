"""The configuration of an Andromeda model in Hugging Face `transformers` (tested with 5.24).

This file is copied verbatim into every folder `andromeda export-hf` writes, next to
`modeling_andromeda.py`, and imports nothing but `transformers`: the folder loads with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

and no Andromeda installation. Standard names carry the standard quantities (`hidden_size`,
`num_key_value_heads`, ...); the positional and normalisation features of the architecture keep
names of their own:

    use_abs_pos_emb      learned absolute positions, added scaled by hidden_size ** -0.5
    alibi                ALiBi biases (Press et al. 2021) on the first `alibi_num_heads` heads
                         (counted in x-transformers' head order; see modeling_andromeda.py)
    rotary_xpos          rotary embeddings with xPos scaling (Sun et al. 2022) on the first
                         `rotary_dim` channels of each head; `rotary_base` is the usual theta,
                         `xpos_scale_base` xPos' scale base
    qk_norm              L2-normalised queries and keys; with `qk_norm_dim_scale` a learned
                         per-head, per-channel scale and the usual head_dim ** -0.5 logit scale,
                         without it the fixed logit scale `qk_norm_fixed_scale`
"""

from __future__ import annotations

from transformers import PretrainedConfig


class AndromedaConfig(PretrainedConfig):
    model_type = "andromeda"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 50432,
        hidden_size: int = 2560,
        intermediate_size: int = 10240,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 24,
        num_key_value_heads: int = 2,
        head_dim: int = 128,
        max_position_embeddings: int = 8192,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        use_abs_pos_emb: bool = False,
        alibi: bool = True,
        alibi_num_heads: int = 12,
        rotary_xpos: bool = True,
        rotary_dim: int | None = None,
        rotary_base: float = 10000.0,
        xpos_scale_base: float = 512.0,
        qk_norm: bool = True,
        qk_norm_dim_scale: bool = True,
        qk_norm_fixed_scale: float = 10.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.use_abs_pos_emb = use_abs_pos_emb
        self.alibi = alibi
        self.alibi_num_heads = alibi_num_heads
        self.rotary_xpos = rotary_xpos
        self.rotary_dim = head_dim // 2 if rotary_dim is None else rotary_dim
        self.rotary_base = rotary_base
        self.xpos_scale_base = xpos_scale_base
        self.qk_norm = qk_norm
        self.qk_norm_dim_scale = qk_norm_dim_scale
        self.qk_norm_fixed_scale = qk_norm_fixed_scale
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._check()
        # Token ids and tying go through the base class, which owns them in some versions.
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )

    def _check(self) -> None:
        """Raise a ValueError naming the field for a configuration the model cannot be built from."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.alibi and not 0 < self.alibi_num_heads <= self.num_attention_heads:
            raise ValueError(
                f"alibi_num_heads must be in 1..num_attention_heads ({self.num_attention_heads}) "
                f"when alibi is on, got {self.alibi_num_heads}"
            )
        if self.rotary_xpos and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            raise ValueError(
                f"rotary_dim must be even and in 2..head_dim ({self.head_dim}), got {self.rotary_dim}"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (exact, erf-based), got {self.hidden_act!r}")


__all__ = ["AndromedaConfig"]
