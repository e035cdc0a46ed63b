"""Training: `train(TrainConfig)` runs AdamW with warmup + cosine decay, evaluates on held-out
text, logs metrics, and writes resumable checkpoints.

    config.py   TrainConfig (every hyperparameter, with its help text) and the run's model Config
    optim.py    AdamW's parameter groups and the learning-rate schedule
    step.py     one optimizer step over micro-batches and processes
    state.py    the trainer state, and saving / restoring a training checkpoint
    data.py     the run's data (text or prompt/completion), its identity across resumes
    sft.py      prompt/completion examples: the loss on completions only
    chat.py     chat data: conversations rendered with the chat template, the loss on the assistant's turns
    lock.py     one process per run folder
    metrics.py  metrics.jsonl, the loss plot, TensorBoard and Weights & Biases
    loop.py     the run: set-up, the loop, stopping on signals

The names below are imported on first use (PEP 562), as in `andromeda/__init__.py`: TrainConfig
(config.py) imports no PyTorch, so `andromeda train --help` lists its fields before PyTorch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TrainConfig
    from .loop import PREEMPTED_EXIT_CODE, Preempted, TrainResult, Trainer, train
    from .step import NonFiniteLossError

_EXPORTS = {
    "NonFiniteLossError": ".step",
    "PREEMPTED_EXIT_CODE": ".loop",
    "Preempted": ".loop",
    "TrainConfig": ".config",
    "TrainResult": ".loop",
    "Trainer": ".loop",
    "train": ".loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'andromeda.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
