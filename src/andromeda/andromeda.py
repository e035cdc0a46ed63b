"""The seed's `Andromeda` class: a thin face over `Config`, `Transformer` and the wrapper.

    model = Andromeda()                       # the ~2.48 B-parameter default
    loss = model(torch.randint(0, 50432, (1, 8192)))
    logits = model.Andromeda(tokens)          # the Transformer: (B, T, num_tokens)
    new = model.decoder.generate(prompt, 64)  # the AutoRegressiveWrapper
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import checkpoint
from .config import SEED_FIELDS, Config
from .inference.quantize import DEFAULT_GROUP_SIZE
from .interop.hf import export_hf
from .interop.x_transformers import from_x_transformers
from .model import Transformer, build_transformer
from .wrapper import AutoRegressiveWrapper, LMOutput


class Andromeda(nn.Module):
    def __init__(
        self,
        num_tokens: int = 50432,
        max_seq_len: int = 8192,
        dim: int = 2560,
        depth: int = 32,
        dim_head: int = 128,
        heads: int = 24,
        use_abs_pos_emb: bool = False,
        alibi_pos_bias: bool = True,
        alibi_num_heads: int = 12,
        rotary_xpos: bool = True,
        attn_flash: bool = True,
        attn_kv_heads: int = 2,
        qk_norm: bool = True,
        attn_qk_norm: bool = True,
        attn_qk_norm_dim_scale: bool = True,
    ) -> None:
        super().__init__()
        config = Config(
            num_tokens=num_tokens, max_seq_len=max_seq_len, dim=dim, depth=depth,
            dim_head=dim_head, heads=heads, use_abs_pos_emb=use_abs_pos_emb,
            alibi_pos_bias=alibi_pos_bias, alibi_num_heads=alibi_num_heads,
            rotary_xpos=rotary_xpos, attn_flash=attn_flash, attn_kv_heads=attn_kv_heads,
            qk_norm=qk_norm, attn_qk_norm=attn_qk_norm,
            attn_qk_norm_dim_scale=attn_qk_norm_dim_scale,
        )
        self._build(config, build_transformer(config))

    def _build(self, config: Config, net: Transformer) -> None:
        self.config = config
        self.Andromeda = net  # the seed's name for the Transformer
        self.decoder = AutoRegressiveWrapper(net)

    @classmethod
    def from_transformer(cls, net: Transformer) -> Andromeda:
        """The face over an existing Transformer (shared, not copied)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._build(net.config, net)
        return model

    @classmethod
    def from_config(
        cls,
        config: Config | str,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> Andromeda:
        """Build from a Config, or a preset name, optionally on a device and in a dtype."""
        if isinstance(config, str):
            config = Config.from_preset(config, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        return cls.from_transformer(build_transformer(config, device=device, dtype=dtype))

    def forward(self, text_tokens: Tensor, **kwargs: Any) -> Tensor | LMOutput:
        """The decoder's output: the mean next-token cross-entropy of `text_tokens` (B, T)
        (targets are the input shifted by one), or `LMOutput(loss, logits)` with
        `return_logits=True`."""
        return self.decoder(text_tokens, **kwargs)

    def generate(self, prompts, seq_len: int, **kwargs: Any) -> Tensor:
        return self.decoder.generate(prompts, seq_len, **kwargs)

    def num_parameters(self) -> int:
        return self.Andromeda.num_parameters()

    def load_x_transformers(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load an x-transformers 2.31 `TransformerWrapper(Decoder(...))` state dict built with
        the same hyperparameters. Validated whole before anything is copied."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_x_transformers expects an x-transformers state dict (a mapping of names to "
                            f"tensors, e.g. model.state_dict()), got {type(state_dict).__name__}")
        converted = from_x_transformers(state_dict, self.config)
        self.Andromeda.load_state_dict(converted, strict=True)

    def save_pretrained_hf(self, directory: str | Path, tokenizer=None, *, dtype: torch.dtype | None = None) -> Path:
        """Export a Hugging Face `transformers` folder (self-contained modeling code, safetensors,
        tokenizer): `AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`."""
        return export_hf(self.Andromeda, tokenizer, directory, dtype=dtype)

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> Path:
        """Write a checkpoint folder: config.json, model.safetensors and the tokenizer."""
        return checkpoint.save_pretrained(self.Andromeda, directory, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, verify: bool = True, quantize: str | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> Andromeda:
        """Load a checkpoint folder (a training run's latest checkpoint, a quantized checkpoint,
        or a Hugging Face folder written by `save_pretrained_hf`); `verify` checks a checkpoint's
        files against its manifest first; `quantize` ("int8" or "int4") quantizes the weights as
        they load (see `andromeda.quantize`)."""
        return cls.from_transformer(checkpoint.load_transformer(directory, device=device, dtype=dtype,
                                                                verify=verify, quantize=quantize,
                                                                group_size=group_size))

    def extra_repr(self) -> str:
        return f"{self.num_parameters():,} parameters"


# Each seed argument reads back as an attribute of the same name: model.num_tokens, ...
for _name in SEED_FIELDS:
    setattr(Andromeda, _name, property(lambda self, _n=_name: getattr(self.config, _n)))
