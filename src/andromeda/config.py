"""The one model configuration: a typed dataclass that validates itself, round-trips through JSON,
and comes in named presets.

The first fifteen fields are the seed's `Andromeda(...)` keyword arguments with their defaults;
the rest are the constants of the architecture that the seed leaves implicit (they match
x-transformers' defaults, so weights move across unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Config:
    num_tokens: int = 50432
    max_seq_len: int = 8192
    dim: int = 2560
    depth: int = 32
    dim_head: int = 128
    heads: int = 24
    use_abs_pos_emb: bool = False
    alibi_pos_bias: bool = True
    alibi_num_heads: int = 12
    rotary_xpos: bool = True
    attn_flash: bool = True
    attn_kv_heads: int = 2
    qk_norm: bool = True
    attn_qk_norm: bool = True
    attn_qk_norm_dim_scale: bool = True
    # Implicit constants of the architecture.
    ff_mult: int = 4
    rotary_base: float = 10000.0
    xpos_scale_base: float = 512.0
    qk_norm_fixed_scale: float = 10.0  # logit scale of QK-norm without a learned dim scale
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_types(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool) and f.name != "alibi_num_heads" and value <= 0:
                raise ValueError(f"Config.{f.name} must be positive, got {value}")
        if self.heads % self.attn_kv_heads:
            raise ValueError(
                f"Config.heads ({self.heads}) must be divisible by Config.attn_kv_heads "
                f"({self.attn_kv_heads}): each key/value head serves an equal group of query heads"
            )
        if self.alibi_pos_bias and not 0 < self.alibi_num_heads <= self.heads:
            raise ValueError(
                f"Config.alibi_num_heads must be in 1..heads ({self.heads}) when alibi_pos_bias "
                f"is on, got {self.alibi_num_heads}"
            )
        if self.rotary_xpos and self.rotary_dim % 2:
            raise ValueError(
                f"Config.dim_head must be a multiple of 4 for rotary xPos (it rotates "
                f"dim_head // 2 channels in pairs), got dim_head={self.dim_head}"
            )
        if self.use_qk_norm and self.dim_head <= 2:
            raise ValueError(f"Config.dim_head must exceed 2 for QK-norm, got {self.dim_head}")

    # Derived quantities, named for what they are.
    @property
    def use_qk_norm(self) -> bool:
        """The seed passes both spellings; either one switches QK-norm on."""
        return self.qk_norm or self.attn_qk_norm

    @property
    def rotary_dim(self) -> int:
        return self.dim_head // 2

    @property
    def num_alibi_heads(self) -> int:
        return self.alibi_num_heads if self.alibi_pos_bias else 0

    @property
    def ff_dim(self) -> int:
        return self.dim * self.ff_mult

    @property
    def num_parameters(self) -> int:
        """The model's parameter count, from the config alone (nothing is built)."""
        inner = self.heads * self.dim_head
        attention = self.dim * (inner + 2 * self.attn_kv_heads * self.dim_head) + inner * self.dim
        scales = (self.heads + self.attn_kv_heads) * self.dim_head if self.use_qk_norm and self.attn_qk_norm_dim_scale else 0
        feed_forward = 2 * self.dim * self.ff_dim + self.ff_dim + self.dim
        block = 2 * self.dim + attention + scales + feed_forward
        tables = 2 * self.num_tokens * self.dim + (self.max_seq_len * self.dim if self.use_abs_pos_emb else 0)
        return self.depth * block + tables + self.dim

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        return from_known_fields(cls, data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> Config:
        """Parse a JSON string, or read a `config.json` file (or a folder holding one)."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no model config at {path} (expected a config.json)")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"model config is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Presets are plain data: nothing is built at import time. "default" is the seed; the sizes
# 1b..20b are those the original Andromeda project published.
_PUBLISHED = dict(dim_head=128, attn_kv_heads=2, rotary_xpos=True, qk_norm=True)
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": dict(num_tokens=258, max_seq_len=1024, dim=64, depth=2, dim_head=16, heads=4,
                 alibi_num_heads=2, attn_kv_heads=2),
    # Sized for `make demo`: 8 minutes on 2 CPU cores. A smaller model that takes more steps
    # beats a larger one there (README, "Train, evaluate, generate").
    "demo": dict(num_tokens=258, max_seq_len=1024, dim=192, depth=4, dim_head=32, heads=6,
                 alibi_num_heads=3, attn_kv_heads=2),
    "1b": dict(_PUBLISHED, num_tokens=25000, max_seq_len=4192, dim=2048, depth=16, heads=8,
               alibi_num_heads=4),
    "3b": dict(_PUBLISHED, dim=3072, depth=24, heads=12, alibi_num_heads=6),
    "7b": dict(_PUBLISHED, dim=4096, depth=32, heads=16, alibi_num_heads=8),
    "10b": dict(_PUBLISHED, dim=5120, depth=32, heads=20, alibi_num_heads=4),
    "15b": dict(_PUBLISHED, dim=6144, depth=40, heads=24, alibi_num_heads=4),
    "20b": dict(_PUBLISHED, dim=7168, depth=48, heads=28, alibi_num_heads=4),
}

# The seed's constructor arguments, in the seed's order: the face `Andromeda(...)` exposes.
SEED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Config))[:15]


# --------------------------------------------------------------------------- size limits
# A config read from a file (a checkpoint, a Hugging Face folder) is checked against these before
# any module is built: a crafted `num_hidden_layers: 10000000` would otherwise hang building
# layers while memory grows. Real giants raise them through the environment variables.
MAX_PARAMETERS = 10**12
MAX_LAYERS = 10_000
MAX_PARAMETERS_ENV = "ANDROMEDA_MAX_PARAMETERS"
MAX_LAYERS_ENV = "ANDROMEDA_MAX_LAYERS"


def check_size(config: Config, source: str | Path = "the config") -> None:
    """Raise a ValueError naming `source` if `config` has more layers or parameters than the limits
    (MAX_LAYERS, MAX_PARAMETERS, or the ANDROMEDA_MAX_LAYERS / ANDROMEDA_MAX_PARAMETERS variables)."""
    max_layers = _limit(MAX_LAYERS_ENV, MAX_LAYERS)
    max_parameters = _limit(MAX_PARAMETERS_ENV, MAX_PARAMETERS)
    if config.depth > max_layers:
        raise ValueError(f"{source}: {config.depth:,} layers exceed the limit of {max_layers:,}; for a real model "
                         f"that large, set {MAX_LAYERS_ENV}")
    if config.num_parameters > max_parameters:
        raise ValueError(f"{source}: {config.num_parameters:.3g} parameters exceed the limit of {max_parameters:.3g}; "
                         f"for a real model that large, set {MAX_PARAMETERS_ENV}")


def _limit(variable: str, default: int) -> int:
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        raise ValueError(f"{variable} must be a positive number, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"{variable} must be a positive number, got {text!r}")
    return value


# --------------------------------------------------------------------------- validation
# Shared by every configuration dataclass (this Config, training's TrainConfig).


def check_types(obj: Any) -> None:
    """Raise a TypeError naming the field for any value of a dataclass that is not of its
    annotated type, and a ValueError for a non-finite float (NaN passes every range check).

    Lists become tuples where the annotation is a tuple (JSON and argparse give lists)."""
    name = type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list):
            object.__setattr__(obj, f.name, value := tuple(value))
        if not _matches(value, hints[f.name]):
            raise TypeError(f"{name}.{f.name} must be of type {_describe(hints[f.name])}, got {value!r} "
                            f"({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}.{f.name} must be a finite number, got {value}")


def from_known_fields(cls: type, data: Mapping[str, Any]) -> Any:
    """`cls(**data)`, after naming any key that is not one of its fields."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return cls(**data)


def _matches(value: Any, hint: Any) -> bool:
    """isinstance for the annotations the config dataclasses use: int, float, bool, str, unions
    with None, tuple[str, ...] and Mapping[str, Any]. bool is not an int here: a size given as
    True is a mistake, not a 1."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if origin is not None:  # Mapping[str, Any]
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is tuple:
        return "a list of str"
    if origin is not None:
        return "a mapping of str to values"
    return hint.__name__
