"""Training: `train(TrainConfig)` runs AdamW with warmup + cosine decay, evaluates on held-out
text, logs metrics, and writes resumable checkpoints.

The pieces are small functions: build the model (`build_model`), spread it over the processes
(`distributed.build_parallel_model`: DDP or FSDP2, with optional activation checkpointing), build
the optimizer (`build_optimizer`), take steps (`train_step`), and save/restore
(`save_training_checkpoint`, `restore_training`). The data of step `s` is
`sample_batch(tokens, s, batch_size, seq_len, seed, rank, world_size)`: a function of the seed and
the step alone, so a resumed run sees exactly the batches the uninterrupted run would have, and the
loss curve does not depend on the number of processes.

Under torchrun every process runs `train`; they agree on the clock and on interrupts once per step
(`all_reduce_max`), so they stop, evaluate and save at the same steps. Rank 0 alone logs metrics and
draws the progress bar. A checkpoint written by N processes resumes on any number of processes.

Determinism: on CPU, a run interrupted at any step (Ctrl-C, `kill -9`) and resumed with
`resume=True` ends bit-for-bit where the uninterrupted run ends — the checkpoint holds the
weights, the AdamW moments, the step, the RNG states and the logging accumulators, and nothing
else carries state between steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import threading
import time
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .andromeda import Andromeda
from .attention import Attention
from .checkpoint import (
    OPTIMIZER_DIR,
    checkpoint_folder,
    commit_checkpoint,
    latest_checkpoint,
    load_config,
    load_checkpoint_tokenizer,
    load_pretrained,
    load_train_config,
    load_trainer_state,
    remove_incomplete,
    stage_checkpoint,
    staging_folder,
    step_checkpoints,
    write_checkpoint_files,
)
from .config import PRESETS, Config
from .data import TokenStore, iter_texts, resolve_data, sample_batch, shakespeare_corpus, cache_root
from .distributed import (
    PARALLEL_MODES,
    DistEnv,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    broadcast_object,
    build_parallel_model,
    check_parallel_setup,
    clip_grad_norm,
    distributed,
    full_model_state_dict,
    gathered,
    gradient_sync,
    is_sharded,
    load_optimizer,
    main_process_first,
    save_optimizer,
)
from .evaluation import evaluate
from .model import Transformer
from .tokenizers import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of this (faster matmuls)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before applying the update."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a training run; validated on construction, saved with each
    checkpoint (`train_config.json`) and round-tripped through JSON."""

    out: str  # the run folder: checkpoints/, latest, metrics.jsonl, loss.png
    preset: str = "demo"
    model_overrides: Mapping[str, Any] = field(default_factory=dict)  # Config fields over the preset
    data: tuple[str, ...] | None = None  # files/folders/globs; None = the Shakespeare train split
    eval_data: tuple[str, ...] | None = None  # None = Shakespeare held-out when `data` is None
    tokenizer: str = "byte"  # "byte", "bpe" (trained on `data`) or a tokenizer.json path
    bpe_vocab_size: int = 4096
    seed: int = 0
    batch_size: int = 16  # sequences per optimizer step, over all micro-steps (and processes)
    seq_len: int = 256
    grad_accum: int = 1  # micro-steps per optimizer step; each takes batch_size // grad_accum
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    qk_scale_lr_mult: float = 1.0  # learning-rate multiplier of the QK-norm scales (see param_groups)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    max_steps: int | None = None  # the schedule's length in steps
    time_budget: float | None = None  # seconds of training loop over all resumes: a stop, and the
    # schedule's length in time when max_steps is None (see `decay_progress`)
    save_every: int = 500
    keep: int = 2  # checkpoints kept
    eval_every: int = 250
    eval_batches: int = 8  # held-out batches per periodic evaluation; 0 disables it
    log_every: int = 10
    bf16: bool = False  # bf16 compute: autocast, or under FSDP bf16 gathered weights; weights and AdamW stay fp32
    activation_checkpointing: bool = False
    parallel: str = "none"  # "ddp" or "fsdp" across the processes torchrun starts; one process ignores it
    dist_timeout: float = 600.0  # seconds a collective may wait for the other processes before failing
    device: str = "auto"  # "auto" = cuda if available, else cpu
    resume: bool = False
    progress: bool = True  # tqdm progress bar
    cache_dir: str | None = None  # corpus and token cache root; None = $ANDROMEDA_CACHE or ~/.cache

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # JSON and argparse give lists; the config holds tuples
                object.__setattr__(self, f.name, value := tuple(value))
            if not _matches(value, hints[f.name]):
                raise TypeError(f"TrainConfig.{f.name} must be {f.type}, got {value!r} ({type(value).__name__})")
        for name in ("batch_size", "seq_len", "grad_accum", "bpe_vocab_size", "save_every", "keep",
                     "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "warmup_steps", "eval_batches", "weight_decay", "grad_clip", "min_lr", "qk_scale_lr_mult"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch size {self.batch_size} is not divisible by grad accumulation "
                f"{self.grad_accum}: each micro-step takes batch_size / grad_accum sequences"
            )
        if self.max_steps is None and self.time_budget is None:
            raise ValueError("give max_steps (--max-steps) or time_budget (--time-budget), or both: "
                             "the learning-rate schedule needs a length")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"TrainConfig.max_steps must be >= 1, got {self.max_steps}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"TrainConfig.parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        if not self.dist_timeout > 0:
            raise ValueError(f"TrainConfig.dist_timeout must be positive seconds, got {self.dist_timeout}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"TrainConfig.time_budget must be positive seconds, got {self.time_budget}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(Config)}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown} in model_overrides; known: {sorted(known)}")
        if self.data is not None and not self.data:
            raise ValueError("TrainConfig.data must name at least one file, folder or glob (or be None)")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a TrainConfig must be a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


# Changing any of these mid-run would make the resumed run a different run. The rest (device,
# parallel, the number of processes, ...) may change: the loss curve does not depend on them.
RUN_DEFINING = ("preset", "model_overrides", "data", "eval_data", "tokenizer", "bpe_vocab_size", "seed",
                "batch_size", "seq_len", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "qk_scale_lr_mult",
                "beta1", "beta2", "grad_clip", "max_steps")


def _matches(value: Any, hint: Any) -> bool:
    """isinstance for the few annotations TrainConfig uses (unions, tuple[str, ...], Mapping)."""
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


# --------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available; use --device cpu")
    return device


def data_files(config: TrainConfig) -> tuple[list[Path], list[Path]]:
    """The training files and the held-out files (possibly none) of a run."""
    if config.data is None:
        corpus = shakespeare_corpus(config.cache_dir)
        train_files = resolve_data([corpus / "train"])
        eval_files = resolve_data([corpus / "heldout"]) if config.eval_data is None else []
    else:
        train_files = resolve_data(config.data)
        eval_files = []
    if config.eval_data is not None:
        eval_files = resolve_data(config.eval_data)
    return train_files, eval_files


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_config(config: TrainConfig, tokenizer: Tokenizer) -> Config:
    """The preset with the overrides, sized for the tokenizer and checked against seq_len."""
    model = Config.from_preset(config.preset, **config.model_overrides)
    if "num_tokens" in config.model_overrides:
        if model.num_tokens < tokenizer.vocab_size:
            raise ValueError(f"num_tokens={model.num_tokens} is smaller than the tokenizer's vocab_size "
                             f"{tokenizer.vocab_size}")
    elif model.num_tokens != tokenizer.vocab_size:
        num_tokens = padded_vocab(tokenizer.vocab_size)
        logger.info("tokenizer %s has %d tokens; setting num_tokens %d -> %d (a multiple of %d)",
                    tokenizer.name, tokenizer.vocab_size, model.num_tokens, num_tokens, VOCAB_MULTIPLE)
        model = model.replace(num_tokens=num_tokens)
    if config.seq_len > model.max_seq_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds the model's max_seq_len {model.max_seq_len} "
                         f"(preset {config.preset!r}); use --seq-len <= {model.max_seq_len}")
    return model


def build_model(config: Config, device: torch.device) -> Andromeda:
    """The model in fp32 (master weights); bf16 compute comes from autocast."""
    return Andromeda.from_config(config, device=device)


def param_groups(net: nn.Module, weight_decay: float, qk_scale_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Three AdamW groups: linear weights (decayed), QK-norm scales, everything else.

    Only the weight matrices of linear layers are decayed. Norm gains, biases, embeddings and the
    QK-norm scales are not (decoupled weight decay, Loshchilov & Hutter 2019,
    https://arxiv.org/abs/1711.05101; the exclusions follow GPT-2/nanoGPT): shrinking a gain or
    a lookup row towards zero is not a useful prior.

    The QK-norm scales set the attention temperature. They start where the logits are cosine
    similarities in [-1, 1] and must grow about threefold for sharp attention, while Adam moves
    each by about lr per step, which takes thousands of steps; `qk_scale_lr_mult` lets a short run
    get there. Each group's "lr_mult" multiplies the scheduled rate (`train_step`).
    """
    decay, scales, other = [], [], []
    for module in net.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and name == "weight":
                decay.append(param)
            elif isinstance(module, Attention) and name in ("q_scale", "k_scale"):
                scales.append(param)
            else:
                other.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
        {"params": scales, "weight_decay": 0.0, "lr_mult": qk_scale_lr_mult},
        {"params": other, "weight_decay": 0.0, "lr_mult": 1.0},
    ]


def build_optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # Empty groups (no QK-norm scales without QK-norm) are left out: a checkpoint's optimizer
    # state names its groups by their parameters, so an empty group would load without its
    # hyperparameters (torch.distributed.checkpoint.state_dict.set_optimizer_state_dict).
    groups = [group for group in param_groups(net, config.weight_decay, config.qk_scale_lr_mult) if group["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def decay_progress(step: int, config: TrainConfig, elapsed_s: float, warmup_end_s: float | None) -> float:
    """How far the cosine decay has come, in [0, 1].

    With max_steps, the schedule is counted in steps: 0 at the end of warmup, 1 at the last update
    (`max_steps - 1`). With only a time budget it is counted in seconds: 0 when warmup ended
    (`warmup_end_s`), 1 when the budget is spent. A step count fixed in advance would have to
    guess the speed, and on a shared machine a guess is easily off by 2x; time-based progress
    ends at the minimum rate whatever the speed turns out to be. (Resumed runs carry their
    elapsed time, so the schedule continues where it stopped.)
    """
    if config.max_steps is not None:
        decay_steps = config.max_steps - 1 - config.warmup_steps
        return 1.0 if decay_steps <= 0 else min(1.0, max(0.0, (step - config.warmup_steps) / decay_steps))
    if warmup_end_s is None:
        return 0.0
    decay_s = config.time_budget - warmup_end_s
    return 1.0 if decay_s <= 0 else min(1.0, max(0.0, (elapsed_s - warmup_end_s) / decay_s))


def lr_at(step: int, config: TrainConfig, progress: float) -> float:
    """The learning rate of the update from `step` to `step + 1` (steps count from 0).

    Linear warmup over `warmup_steps` updates, then cosine decay from `lr` to `min_lr` as the
    decay `progress` (`decay_progress`) goes from 0 to 1 (Loshchilov & Hutter 2017,
    https://arxiv.org/abs/1608.03983, without restarts).
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- stepping


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: Tensor,
    optimizer: torch.optim.Optimizer,
    lr: float,
    config: TrainConfig,
    step: int,
    env: DistEnv = DistEnv(),
    autocast: bool | None = None,
) -> tuple[float, float]:
    """One optimizer update on this process's `batch` (B / W, T + 1), split into `grad_accum`
    micro-batches; `model` is what `parallelize` returned, called for the loss.

    Every micro-batch of every process holds the same number of target tokens, so the mean of
    their mean losses — each process averages its own, `all_reduce_mean` averages the processes,
    as DDP/FSDP average their gradients — is the mean over the global batch. `autocast` (default
    `config.bf16`) is off under FSDP, whose mixed-precision policy computes in bf16 instead.

    Returns (mean loss, gradient norm before clipping), the same on every process. Raises
    NonFiniteLossError before the update when either is NaN/inf, so the weights never take a
    non-finite step.
    """
    autocast = config.bf16 if autocast is None else autocast
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float32, device=batch.device)
    micro_batches = batch.chunk(config.grad_accum)  # (B / W / A, T + 1) each
    for index, micro in enumerate(micro_batches):
        # DDP all-reduces the gradients once, after the last micro-step.
        with gradient_sync(model, enabled=index == len(micro_batches) - 1):
            with autocast_context(batch.device, autocast):
                loss = model(micro)
            (loss / config.grad_accum).backward()
        total += loss.detach().float()
    mean_loss = float(all_reduce_mean(total, env)) / config.grad_accum
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"non-finite training loss ({mean_loss}) at step {step + 1}")
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = clip_grad_norm(params, max_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at step {step + 1} "
                                 f"(loss {mean_loss:.4f})")
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    optimizer.step()
    return mean_loss, grad_norm


def get_batch(tokens: np.ndarray, step: int, config: TrainConfig, device: torch.device,
              rank: int = 0, world_size: int = 1) -> Tensor:
    """This process's share of step `step`'s global batch: (batch_size / world_size, seq_len + 1)."""
    batch = sample_batch(tokens, step, config.batch_size, config.seq_len, config.seed, rank, world_size)
    return batch.to(device, non_blocking=True)


# --------------------------------------------------------------------------- state


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as plain data `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """What changes from step to step besides the weights and the optimizer."""

    step: int = 0
    elapsed_s: float = 0.0  # seconds of training loop so far, over all resumes
    warmup_end_s: float | None = None  # elapsed_s when warmup ended
    loss_sum: float = 0.0  # training losses since the last log line
    loss_count: int = 0


def save_training_checkpoint(run_dir: Path, net: Transformer, optimizer: torch.optim.Optimizer,
                             progress: Progress, config: TrainConfig, tokenizer: Tokenizer,
                             env: DistEnv = DistEnv()) -> Path:
    """Save everything a resumed run needs; refuses a model with non-finite weights.

    Every process calls it. Rank 0 gathers the whole model and writes it as one model.safetensors
    (so evaluation, generation and `from_pretrained` load any run alike); every process writes its
    own shards of the optimizer state (`distributed.save_optimizer`); once all are written, rank 0
    renames the staging folder into place.
    """
    weights = full_model_state_dict(net, env)  # rank 0: the whole model on the CPU; others: {}
    bad = broadcast_object([name for name, t in weights.items() if not torch.isfinite(t).all()], env)
    if bad:
        raise NonFiniteLossError(f"parameters {bad[:3]} hold NaN/inf at step {progress.step}; not saving")
    if env.is_main:
        stage_checkpoint(run_dir, progress.step)
    barrier(env)
    staging = staging_folder(run_dir, progress.step)
    save_optimizer(staging / OPTIMIZER_DIR, net, optimizer)
    if env.is_main:
        state = {"progress": dataclasses.asdict(progress), "rng": rng_state(), "train_config": config.to_dict()}
        write_checkpoint_files(staging, net.config, weights, tokenizer, config.to_dict(), state)
        commit_checkpoint(run_dir, progress.step, config.keep)
    barrier(env)  # no process runs ahead (or exits) before the checkpoint is in place
    return checkpoint_folder(run_dir, progress.step)


def check_resumable(saved: TrainConfig, config: TrainConfig, checkpoint: Path) -> None:
    """Raise a ValueError listing each run-defining setting that differs from the saved run."""
    saved_dict, now = saved.to_dict(), config.to_dict()
    changed = [f"{name}: {saved_dict[name]!r} in the run, {now[name]!r} now"
               for name in RUN_DEFINING if saved_dict[name] != now[name]]
    if changed:
        raise ValueError(f"cannot resume {checkpoint} with different settings (" + "; ".join(changed)
                         + "); drop them to continue the run as it was, or start a new --out")


def restore_training(checkpoint: Path, config: TrainConfig) -> tuple[Config, Tokenizer, dict[str, Any]]:
    """Model config, tokenizer and trainer state of `checkpoint`, after checking it belongs to
    `config`. The weights and the optimizer state are loaded once the model is parallelized."""
    saved = load_train_config(checkpoint)
    if saved is None:
        raise ValueError(f"{checkpoint} holds no train_config.json: it is not a training checkpoint")
    check_resumable(TrainConfig.from_dict(saved), config, checkpoint)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    expected, found = model_config(config, tokenizer), load_config(checkpoint)
    if expected != found:
        diff = {k: (v, expected.to_dict()[k]) for k, v in found.to_dict().items() if expected.to_dict()[k] != v}
        raise ValueError(f"cannot resume {checkpoint}: its model config differs from this run's "
                         f"(field: (saved, now)) {diff}")
    if not (checkpoint / OPTIMIZER_DIR).is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no {OPTIMIZER_DIR}/ (the optimizer state): it "
                                f"holds a model only and cannot resume training")
    return found, tokenizer, load_trainer_state(checkpoint)


# --------------------------------------------------------------------------- logging


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, {"type": "train" | "eval", "step": ..., ...}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entry: Mapping[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(dict(entry)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        return entries

    def truncate_after(self, step: int) -> None:
        """Drop entries past `step` (logged after the checkpoint a resumed run starts from)."""
        kept = [e for e in self.read() if e.get("step", 0) <= step]
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text("".join(json.dumps(e) + "\n" for e in kept))
        staging.replace(self.path)  # a crash now leaves either the old or the new file


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    step: int
    train_loss: float | None  # mean over the last logged interval
    eval: dict[str, float | int] | None  # the final held-out evaluation
    checkpoint: Path
    elapsed_s: float
    stopped_by: str  # "max_steps" or "time_budget"
    run_dir: Path


@contextlib.contextmanager
def _graceful_interrupt() -> Iterator[list[bool]]:
    """Turn the first Ctrl-C into a flag checked between steps, so the run can save a consistent
    checkpoint; a second Ctrl-C interrupts at once. Only possible in the main thread."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True
        logger.warning("interrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _load_stores(config: TrainConfig, tokenizer: Tokenizer, train_files: list[Path], eval_files: list[Path]
                 ) -> tuple[TokenStore, TokenStore | None]:
    token_cache = Path(config.cache_dir) / "tokens" if config.cache_dir else cache_root() / "tokens"
    train_store = TokenStore(train_files, tokenizer, cache_dir=token_cache)
    if len(train_store) < config.seq_len + 1:
        raise ValueError(f"the training data has {len(train_store)} tokens, fewer than seq_len + 1 = "
                         f"{config.seq_len + 1}; use a shorter --seq-len or more data")
    eval_store = TokenStore(eval_files, tokenizer, cache_dir=token_cache) if eval_files else None
    logger.info("training data: %r", train_store)
    if eval_store is not None:
        logger.info("held-out data: %r", eval_store)
    elif config.eval_batches:
        logger.info("no held-out data (give eval_data / --eval-data): periodic evaluation is off")
    return train_store, eval_store


def train(config: TrainConfig) -> TrainResult:
    """Run (or, with `config.resume`, continue) the training run `config` describes.

    Stops at `max_steps` or when `time_budget` seconds of training loop have passed (counting
    earlier runs of a resumed run), whichever is first; then evaluates, saves a final checkpoint and
    plots `loss.png`. A first Ctrl-C saves a checkpoint and re-raises KeyboardInterrupt. A
    non-finite loss raises NonFiniteLossError, keeping the last good checkpoint.

    Under torchrun every process calls it (`config.parallel` says how they share the work) and all
    of them return the same result, except `eval`, which under DDP only rank 0 computes.
    """
    with distributed(resolve_device(config.device), config.dist_timeout) as env:
        return _train(config, env)


def _train(config: TrainConfig, env: DistEnv) -> TrainResult:
    check_parallel_setup(config.parallel, config.batch_size, config.grad_accum, env)
    run_dir = Path(config.out)
    metrics = MetricsLog(run_dir / METRICS_FILE)
    checkpoint, state = None, None
    if config.resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"nothing to resume: {run_dir} has no checkpoint in "
                                    f"{run_dir / 'checkpoints'}; start without --resume")
        config_of_model, tokenizer, state = restore_training(checkpoint, config)
    else:
        existing = step_checkpoints(run_dir)
        if existing:
            raise FileExistsError(f"{run_dir} already holds a run ({existing[-1].name}); pass --resume to "
                                  f"continue it, or choose another --out")
    barrier(env)  # every process has read the run folder before rank 0 cleans it
    if env.is_main:
        remove_incomplete(run_dir)
    with main_process_first(env):  # rank 0 fetches the corpus; the others find it cached
        train_files, eval_files = data_files(config)
    if state is None:
        # Rank 0 alone builds the tokenizer (a BPE is trained once) and hands it to the others.
        tokenizer = build_tokenizer(config.tokenizer, train_texts=lambda: iter_texts(train_files),
                                    vocab_size=config.bpe_vocab_size) if env.is_main else None
        tokenizer = broadcast_object(tokenizer, env)
        config_of_model = model_config(config, tokenizer)
    with main_process_first(env):  # rank 0 tokenises into the cache; the others read it
        train_store, eval_store = _load_stores(config, tokenizer, train_files, eval_files)

    def make_model() -> Andromeda:
        if checkpoint is not None:
            return load_pretrained(checkpoint, device=env.device, dtype=torch.float32)
        torch.manual_seed(config.seed)
        return build_model(config_of_model, env.device)

    # Under FSDP, bf16 is the dtype the gathered weights compute in; otherwise it is autocast.
    sharded = config.parallel == "fsdp" and env.distributed
    model, train_module = build_parallel_model(
        make_model, config_of_model, config.parallel, env,
        param_dtype=torch.bfloat16 if config.bf16 and sharded else None,
        activation_checkpointing=config.activation_checkpointing)
    net = model.Andromeda
    net.train()
    optimizer = build_optimizer(net, config)
    if state is not None:
        load_optimizer(checkpoint / OPTIMIZER_DIR, net, optimizer)
        set_rng_state(state["rng"])
        progress = Progress(**state["progress"])
        if env.is_main:
            metrics.truncate_after(progress.step)
        logger.info("resuming %s at step %d", run_dir, progress.step)
    else:
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            metrics.path.write_text("")
        progress = Progress()
    c = net.config
    logger.info("model: %s parameters (dim %d, depth %d, %d heads of %d, %d kv heads, %d ALiBi heads, vocab %d)",
                f"{model.num_parameters():,}", c.dim, c.depth, c.heads, c.dim_head, c.attn_kv_heads,
                c.num_alibi_heads, c.num_tokens)
    if env.distributed:
        logger.info("%s over %d processes: %d sequences per process per step, in %d micro-steps",
                    config.parallel, env.world_size, config.batch_size // env.world_size, config.grad_accum)
    if config.max_steps is not None and config.warmup_steps >= config.max_steps:
        logger.warning("warmup_steps (%d) >= max_steps (%d): the learning rate never decays",
                       config.warmup_steps, config.max_steps)
    run = _Run(config, env, run_dir, model, train_module, tokenizer, optimizer, progress, metrics, train_store,
               eval_store, autocast=config.bf16 and not sharded)
    context = logging_redirect_tqdm() if run.show_progress else contextlib.nullcontext()
    with context:
        return run.loop(fresh=state is None)


class _Run:
    """The training loop's bookkeeping: timing, logging, evaluation and saving around train_step.

    All processes run the same loop and must make the same decisions at the same steps, so the
    clock and the interrupt flag are agreed on once per step (`sync`): the maximum over processes.
    """

    def __init__(self, config: TrainConfig, env: DistEnv, run_dir: Path, model: Andromeda, train_module: nn.Module,
                 tokenizer: Tokenizer, optimizer: torch.optim.Optimizer, progress: Progress, metrics: MetricsLog,
                 train_store: TokenStore, eval_store: TokenStore | None, autocast: bool) -> None:
        self.config, self.env, self.run_dir, self.model, self.tokenizer = config, env, run_dir, model, tokenizer
        self.net, self.train_module, self.autocast = model.Andromeda, train_module, autocast
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer, self.progress, self.metrics = optimizer, progress, metrics
        self.train_store, self.eval_store = train_store, eval_store
        self.show_progress = config.progress and env.is_main
        self.last_eval: dict[str, float | int] | None = None
        self.last_train_loss: float | None = None
        self.grad_norm = float("nan")
        self.saved_step: int | None = None
        self.now = progress.elapsed_s  # seconds of training loop, as agreed at the last sync
        self.stop_requested = False

    def sync(self, interrupted: bool) -> None:
        """Agree on the elapsed time and on whether any process was interrupted."""
        self.now, flag = all_reduce_max([time.monotonic() - self.start, float(interrupted)], self.env)
        self.stop_requested = flag > 0

    def evaluate(self) -> dict[str, float | int] | None:
        if self.eval_store is None or self.config.eval_batches == 0:
            return None
        if not (self.env.is_main or is_sharded(self.net)):
            return None  # a replica: rank 0's evaluation is the same; FSDP needs every process
        with gathered(self.net):
            result = evaluate(self.net, self.eval_store.tokens, self.config.seq_len, self.config.batch_size,
                              self.eval_store.num_bytes,
                              max_windows=self.config.eval_batches * self.config.batch_size,
                              autocast_dtype=torch.bfloat16 if self.config.bf16 else None)
        if self.env.is_main:
            self.metrics.append({"type": "eval", "step": self.progress.step, **result})
            logger.info("step %d: held-out loss %.4f, %.4f bits/byte", self.progress.step, result["loss"],
                        result["bits_per_byte"])
        self.last_eval = result
        return result

    def save(self) -> Path:
        self.progress.elapsed_s = self.now
        path = save_training_checkpoint(self.run_dir, self.net, self.optimizer, self.progress, self.config,
                                        self.tokenizer, self.env)
        self.saved_step = self.progress.step
        return path

    def done(self) -> bool:
        config, progress = self.config, self.progress
        if config.max_steps is not None and progress.step >= config.max_steps:
            return True
        return config.time_budget is not None and self.now >= config.time_budget

    def loop(self, fresh: bool) -> TrainResult:
        config, progress = self.config, self.progress
        # The time budget covers everything from here, earlier runs of a resumed run included.
        self.start = time.monotonic() - progress.elapsed_s
        if fresh:
            self.evaluate()
        self.log_start, self.log_steps = time.monotonic(), 0
        bar = tqdm(total=config.max_steps, initial=progress.step, unit="step", disable=not self.show_progress,
                   dynamic_ncols=True)
        try:
            with _graceful_interrupt() as interrupted:
                self.sync(interrupted[0])
                while not self.done():
                    lr = self.step()
                    self.sync(interrupted[0])
                    bar.update(1)
                    if progress.step % config.log_every == 0:
                        self.log(lr, bar)
                    finished = self.done()
                    if progress.step % config.eval_every == 0 and not finished:
                        self.evaluate()
                    if progress.step % config.save_every == 0 and not finished:
                        self.save()
                    if self.stop_requested:
                        if self.saved_step != progress.step:
                            self.save()
                        raise KeyboardInterrupt(f"interrupted at step {progress.step}; saved a checkpoint "
                                                f"in {self.run_dir} (continue with --resume)")
        finally:
            if config.max_steps is None:  # the estimated total becomes the steps actually taken
                bar.total = bar.n
                bar.refresh()
            bar.close()
        stopped_by = "max_steps" if config.max_steps is not None and progress.step >= config.max_steps else "time_budget"
        final_eval = self.evaluate()
        checkpoint = self.save()
        if self.env.is_main:
            plot_losses(self.metrics.read(), self.run_dir / LOSS_PLOT_FILE)
        logger.info("finished at step %d after %.0fs (%s); checkpoint %s", progress.step, self.now,
                    stopped_by, checkpoint)
        return TrainResult(step=progress.step, train_loss=self.last_train_loss, eval=final_eval,
                           checkpoint=checkpoint, elapsed_s=self.now, stopped_by=stopped_by,
                           run_dir=self.run_dir)

    def step(self) -> float:
        """One update; returns its learning rate."""
        progress, config, env = self.progress, self.config, self.env
        batch = get_batch(self.train_store.tokens, progress.step, config, env.device, env.rank, env.world_size)
        if progress.step == config.warmup_steps and progress.warmup_end_s is None:
            progress.warmup_end_s = self.now
        lr = lr_at(progress.step, config, decay_progress(progress.step, config, self.now, progress.warmup_end_s))
        try:
            loss, self.grad_norm = train_step(self.train_module, self.params, batch, self.optimizer, lr, config,
                                              progress.step, env, self.autocast)
        except NonFiniteLossError as err:
            last = latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            raise NonFiniteLossError(f"{err}: training stopped; {kept}. Try a lower --lr, a smaller "
                                     f"--grad-clip, or training without --bf16") from None
        progress.step += 1
        progress.loss_sum += loss
        progress.loss_count += 1
        self.log_steps += 1
        return lr

    def log(self, lr: float, bar: tqdm) -> None:
        progress, config = self.progress, self.config
        now = time.monotonic()
        self.last_train_loss = progress.loss_sum / progress.loss_count
        step_s = (now - self.log_start) / max(self.log_steps, 1)
        rate = config.batch_size * config.seq_len / max(step_s, 1e-9)
        if self.env.is_main:
            self.metrics.append({"type": "train", "step": progress.step, "loss": self.last_train_loss, "lr": lr,
                                 "grad_norm": self.grad_norm, "tokens_per_s": rate, "elapsed_s": self.now})
        if config.max_steps is None:  # a time budget: the bar's total (and so its ETA) is an estimate
            bar.total = progress.step + max(1, int((config.time_budget - self.now) / step_s))
        bar.set_postfix(loss=f"{self.last_train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.refresh()
        progress.loss_sum, progress.loss_count = 0.0, 0
        self.log_start, self.log_steps = now, 0


def plot_losses(entries: list[dict[str, Any]], path: Path) -> None:
    """Training and held-out loss against step, written as a PNG (matplotlib's Agg canvas, so no
    display or global backend is involved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for kind, label, style in (("train", "train", "-"), ("eval", "held-out", "o-")):
        points = [(e["step"], e["loss"]) for e in entries if e.get("type") == kind]
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
