"""Andromeda: a long-context decoder-only language model (ALiBi + rotary xPos + GQA + QK-norm)."""

from .andromeda import Andromeda, build_transformer
from .config import PRESETS, Config
from .model import Transformer
from .wrapper import AutoRegressiveWrapper, LMOutput

__all__ = ["Andromeda", "AutoRegressiveWrapper", "Config", "LMOutput", "PRESETS", "Transformer",
           "build_transformer"]
__version__ = "0.1.0"
