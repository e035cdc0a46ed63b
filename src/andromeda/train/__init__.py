"""Training: `train(TrainConfig)` runs AdamW with warmup + cosine decay, evaluates on held-out
text, logs metrics, and writes resumable checkpoints.

    config.py   TrainConfig (every hyperparameter, with its help text) and the run's model Config
    optim.py    AdamW's parameter groups and the learning-rate schedule
    step.py     one optimizer step over micro-batches and processes
    state.py    the trainer state, and saving / restoring a training checkpoint
    metrics.py  metrics.jsonl and the loss plot
    loop.py     the run: set-up and the loop
"""

from .config import TrainConfig
from .loop import TrainResult, Trainer, train
from .step import NonFiniteLossError

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "train"]
