"""Other implementations and formats: x-transformers weights, Hugging Face `transformers`,
lm-evaluation-harness."""

from .x_transformers import build_x_transformers, from_x_transformers

__all__ = ["build_x_transformers", "from_x_transformers"]
