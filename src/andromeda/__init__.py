"""Andromeda: a long-context decoder-only language model (ALiBi + rotary xPos + GQA + QK-norm).

The names below are imported on first use (PEP 562), so `import andromeda.cli` starts without
loading PyTorch and the command line can answer Ctrl-C during start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .andromeda import Andromeda
    from .config import PRESETS, Config
    from .inference.packed import prepack
    from .inference.quantize import quantize
    from .model import KVCache, Transformer, build_transformer
    from .wrapper import AutoRegressiveWrapper, LMOutput

_EXPORTS = {
    "Andromeda": ".andromeda",
    "AutoRegressiveWrapper": ".wrapper",
    "Config": ".config",
    "KVCache": ".model",
    "LMOutput": ".wrapper",
    "PRESETS": ".config",
    "Transformer": ".model",
    "build_transformer": ".model",
    "prepack": ".inference.packed",
    "quantize": ".inference.quantize",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'andromeda' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
