"""Andromeda: a long-context decoder-only language model (ALiBi + rotary xPos + GQA + QK-norm)."""

from .andromeda import Andromeda
from .config import PRESETS, Config
from .model import KVCache, Transformer, build_transformer
from .wrapper import AutoRegressiveWrapper, LMOutput

__all__ = ["Andromeda", "AutoRegressiveWrapper", "Config", "KVCache", "LMOutput", "PRESETS", "Transformer",
           "build_transformer"]
__version__ = "0.1.0"
