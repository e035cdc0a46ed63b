"""What a resumed run needs besides the weights: the step, the clock, the logging accumulators and
every RNG; saving it with the weights and the optimizer as one checkpoint, and restoring it.

The trainer state is a safetensors file: the RNG states as tensors, everything else as JSON in
its metadata, so reading it never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import (
    OPTIMIZER_DIR,
    TRAINER_STATE_FILE,
    ModelSource,
    checkpoint_folder,
    commit_checkpoint,
    latest_checkpoint,
    load_checkpoint_tokenizer,
    load_train_config,
    open_model_source,
    refuse_quantized,
    resolve_checkpoint,
    stage_checkpoint,
    staging_folder,
    verify_checkpoint,
    write_checkpoint_files,
)
from ..folders import CheckpointError, writing
from ..model import Transformer
from ..parallel.dcp import save_optimizer
from ..parallel.environment import DistEnv, broadcast_object, wait
from ..parallel.parallelize import full_model_state_dict
from ..tokenizers import Tokenizer
from .config import RUN_DEFINING, TrainConfig, model_config
from .data import DATA_FILE, write_data_identity
from .lora import adapter_state, write_lora_checkpoint_files
from .step import NonFiniteLossError


@dataclass
class Progress:
    """What changes from step to step besides the weights and the optimizer."""

    step: int = 0
    elapsed_s: float = 0.0  # seconds of training loop so far, over all resumes
    warmup_end_s: float | None = None  # elapsed_s when warmup ended
    loss_sum: float = 0.0  # training losses since the last log line
    loss_count: int = 0
    schedule_steps: int | None = None  # the learning-rate schedule's length, fixed when the run starts
    schedule_s: float | None = None


@dataclass
class TrainerState:
    progress: Progress
    rng: dict[str, Any]


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy and torch RNG states of this process, and of its CUDA device if it has one
    (only that device's: another run may see a different number of GPUs)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def write_trainer_state(path: Path, progress: Progress, rng: Mapping[str, Any]) -> None:
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    tensors = {"rng.torch": rng["torch"], "rng.numpy_keys": keys}
    if "cuda" in rng:
        tensors["rng.cuda"] = rng["cuda"]
    metadata = {
        "progress": json.dumps(dataclasses.asdict(progress)),
        "rng.python": json.dumps(rng["python"]),
        "rng.numpy": json.dumps([kind, pos, has_gauss, cached]),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def read_trainer_state(path: str | Path | ModelSource) -> TrainerState:
    """The trainer state of a checkpoint (or of a run's latest); errors name the file."""
    folder = path.folder if isinstance(path, ModelSource) else resolve_checkpoint(path)
    file = folder / TRAINER_STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {TRAINER_STATE_FILE}: it holds a model only and "
                                f"cannot resume training")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        kind, pos, has_gauss, cached = json.loads(metadata["rng.numpy"])
        rng = {"python": json.loads(metadata["rng.python"]), "torch": tensors["rng.torch"],
               "numpy": [kind, tensors["rng.numpy_keys"], pos, has_gauss, cached]}
        if "rng.cuda" in tensors:
            rng["cuda"] = tensors["rng.cuda"]
        progress = Progress(**json.loads(metadata["progress"]))
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file} cannot be read (truncated or corrupt?): {err}") from None
    return TrainerState(progress, rng)


def save_training_checkpoint(run_dir: Path, net: Transformer, optimizer: torch.optim.Optimizer,
                             progress: Progress, config: TrainConfig, tokenizer: Tokenizer,
                             env: DistEnv = DistEnv(), data: Mapping[str, Any] | None = None, *,
                             pause: Callable[[str], None] | None = None,
                             lora_base: ModelSource | None = None, chat_template: str | None = None) -> Path:
    """Save everything a resumed run needs; refuses a model with non-finite weights. The one
    checkpoint writer of training runs.

    Every process calls it. Rank 0 gathers the whole model and writes it as one model.safetensors
    (so evaluation, generation and `from_pretrained` load any run alike); every process writes its
    own shards of the optimizer state (`parallel.dcp.save_optimizer`); once all are written, rank 0
    renames the staging folder into place. `data` is the run's data identity (train/data.py);
    `pause` a test hook `commit_checkpoint` calls before the rename. A LoRA run (`lora_base`, its
    frozen base) writes its adapter and a pointer to the base instead of model.safetensors.
    `chat_template`, the run's chat template, is kept as chat_template.jinja.

    A full disk stops the save with "no space left on device while writing FILE"; the partial
    checkpoint is removed and every earlier one is untouched.
    """
    if lora_base is not None:  # the base never changes: only the adapter is saved
        weights = adapter_state(net) if env.is_main else {}
    else:
        weights = full_model_state_dict(net, env)  # rank 0: the whole model on the CPU; others: {}
    bad = broadcast_object([name for name, t in weights.items() if not torch.isfinite(t).all()], env)
    if bad:
        raise NonFiniteLossError(f"parameters {bad[:3]} hold NaN/inf at step {progress.step}; not saving")
    if env.is_main:
        stage_checkpoint(run_dir, progress.step)
    wait(env)
    staging = staging_folder(run_dir, progress.step)
    try:
        with writing(staging / OPTIMIZER_DIR):
            save_optimizer(staging / OPTIMIZER_DIR, net, optimizer)
        if env.is_main:
            write_checkpoint_files(staging, net.config, None if lora_base is not None else weights, tokenizer,
                                   config.to_dict(), chat_template=chat_template)
            if lora_base is not None:
                write_lora_checkpoint_files(staging, net, config, lora_base)
            with writing(staging / TRAINER_STATE_FILE):
                write_trainer_state(staging / TRAINER_STATE_FILE, progress, rng_state(env.device))
            if data is not None:
                with writing(staging / DATA_FILE):
                    write_data_identity(staging, data)
            commit_checkpoint(run_dir, progress.step, config.keep, pause=pause)
    except OSError as err:
        if env.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # give the space back; earlier checkpoints stay
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            last = latest_checkpoint(run_dir)
            kept = f"earlier checkpoints are intact (latest: {last})" if last else "no earlier checkpoint exists"
            raise OSError(f"{err}; the checkpoint of step {progress.step} was not saved and the run stopped; "
                          f"{kept}. Free some space and continue with --resume") from None
        raise
    # No process runs ahead (or exits) before the checkpoint is in place. Rank 0 may take long
    # (the whole model written and hashed), so this wait has no practical time limit.
    wait(env)
    return checkpoint_folder(run_dir, progress.step)


def check_resumable(saved: TrainConfig, config: TrainConfig, checkpoint: Path) -> None:
    """Raise a ValueError listing each run-defining setting that differs from the saved run."""
    saved_dict, now = saved.to_dict(), config.to_dict()
    changed = [f"{name}: {saved_dict[name]!r} in the run, {now[name]!r} now"
               for name in RUN_DEFINING if saved_dict[name] != now[name]]
    if changed:
        raise ValueError(f"cannot resume {checkpoint} with different settings (" + "; ".join(changed)
                         + "); drop them to continue the run as it was, or start a new --out")


def restore_training(checkpoint: Path, config: TrainConfig) -> tuple[ModelSource, Tokenizer, TrainerState]:
    """The opened `checkpoint` (its config parsed), its tokenizer and trainer state, after
    checking it belongs to `config`. The weights and the optimizer state are loaded once the model
    is parallelized."""
    verify_checkpoint(checkpoint)  # every file, optimizer shards included, against the manifest
    source = open_model_source(checkpoint, verify=False)
    refuse_quantized(source, "--resume")
    saved = load_train_config(source)
    if saved is None:
        raise ValueError(f"{checkpoint} holds no train_config.json: it is not a training checkpoint")
    check_resumable(TrainConfig.from_dict(saved), config, checkpoint)
    tokenizer = load_checkpoint_tokenizer(source, verify=False)
    # A fine-tune's model is its base's config with the run's overrides: checked against the
    # checkpoint's own config (the base may have moved since; its weights are not needed).
    found = source.config
    expected = model_config(config, tokenizer, found if config.init_from is not None else None)
    if expected != found:
        diff = {k: (v, expected.to_dict()[k]) for k, v in found.to_dict().items() if expected.to_dict()[k] != v}
        raise ValueError(f"cannot resume {checkpoint}: its model config differs from this run's "
                         f"(field: (saved, now)) {diff}")
    if not (checkpoint / OPTIMIZER_DIR).is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no {OPTIMIZER_DIR}/ (the optimizer state): it "
                                f"holds a model only and cannot resume training")
    return source, tokenizer, read_trainer_state(source)
