"""Training: `train(TrainConfig)` runs AdamW with warmup + cosine decay, evaluates on held-out
text, logs metrics, and writes resumable checkpoints.

    config.py   TrainConfig (every hyperparameter, with its help text) and the run's model Config
    optim.py    AdamW's parameter groups and the learning-rate schedule
    step.py     one optimizer step over micro-batches and processes
    state.py    the trainer state, and saving / restoring a training checkpoint
    data.py     the run's data (text or prompt/completion), its identity across resumes
    sft.py      prompt/completion examples: the loss on completions only
    lock.py     one process per run folder
    metrics.py  metrics.jsonl, the loss plot, TensorBoard and Weights & Biases
    loop.py     the run: set-up, the loop, stopping on signals
"""

from .config import TrainConfig
from .loop import PREEMPTED_EXIT_CODE, Preempted, TrainResult, Trainer, train
from .step import NonFiniteLossError

__all__ = ["NonFiniteLossError", "PREEMPTED_EXIT_CODE", "Preempted", "TrainConfig", "TrainResult", "Trainer", "train"]
