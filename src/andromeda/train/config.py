"""`TrainConfig`: every hyperparameter of a training run, validated on construction, saved with
each checkpoint (`train_config.json`), round-tripped through JSON. Each field's help text is its
metadata: the command line's `andromeda train --help` and the docs read it from there.

A run can also be written down as a file of TrainConfig fields (`read_config_file`: TOML, or YAML
with PyYAML installed) that `andromeda train --config` runs and `andromeda plan --config` prices.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Torch-free imports only: `andromeda train --help` builds its flags from TrainConfig before
# PyTorch loads (the functions below that need more import it when they run).
from ..choices import DEFAULT_TIMEOUT_S, PARALLEL_MODES, SCHEMES
from ..config import PRESETS, Config, check_types, from_known_fields

if TYPE_CHECKING:
    from ..tokenizers import Tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

logger = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of this (faster matmuls)
DEFAULT_PRESET = "demo"
OBJECTIVES = ("lm", "completion", "chat")
TRACKERS = ("none", "tensorboard", "wandb")
# The Linear layers of each block --lora-targets names (checkpoint.lora.LORA_MODULES maps them).
LORA_TARGETS = ("qkv", "out", "ff_in", "ff_out")


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field carrying its command-line help (and, in `kwargs`, its metavar, the choices
    the command line lists, or cli=False for a field with no flag)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class TrainConfig:
    out: str = option(help="run folder: checkpoints/, latest, metrics.jsonl, loss.png")
    preset: str | None = option(None, f"model preset: {', '.join(PRESETS)} (default demo; with --init-from, the "
                                      f"checkpoint's model)")
    model_overrides: Mapping[str, Any] = option({}, "model Config fields over the preset", cli=False)
    init_from: str | None = option(None, "start from a trained checkpoint's weights, model config and tokenizer, "
                                         "with a fresh optimizer and schedule (fine-tuning, continued pretraining)")
    lora_rank: int | None = option(None, "train LoRA adapters of this rank (peft) over the frozen --init-from "
                                         "weights instead of the weights themselves; checkpoints hold the adapters "
                                         "and point to the base")
    lora_alpha: float | None = option(None, "LoRA scaling numerator: updates are scaled by alpha / rank (default "
                                            "2 x --lora-rank)")
    lora_dropout: float = option(0.0, "dropout on the LoRA inputs")
    lora_targets: tuple[str, ...] = option(LORA_TARGETS, f"the Linear layers of each block LoRA adapts, among "
                                                         f"{', '.join(LORA_TARGETS)} (separated by spaces or commas)",
                                           metavar="TARGET")
    quantize: str | None = option(None, "QLoRA: quantize the frozen base as it loads, int8 or int4 (with "
                                        "--lora-rank; a quantized --init-from needs no flag)", choices=SCHEMES)
    objective: str = option("lm", "lm: next-token loss on all text; completion: .jsonl records with prompt and "
                                  "completion fields, loss on the completion tokens only; chat: .jsonl records "
                                  "with a messages list (role, content), rendered with the chat template, loss on "
                                  "the assistant's turns only", choices=OBJECTIVES)
    chat_template: str | None = option(None, "Jinja chat template file, stored in the run's checkpoints "
                                             "(chat_template.jinja; serve and chat use it) and rendering --objective "
                                             "chat data (default: --init-from's template, if it has one)")
    data: tuple[str, ...] | None = option(
        None, "training files, folders or globs (default: Shakespeare's train split)")
    eval_data: tuple[str, ...] | None = option(
        None, "held-out files for periodic evaluation (default: Shakespeare's held-out plays when --data "
              "is not given)")
    text_field: str = option("text", "the string field holding each document in .jsonl, .parquet and datasets files")
    num_proc: int | None = option(None, "processes that tokenise the data (default: every CPU)")
    tokenizer: str = option("byte", "byte, bpe (trained on --data, saved with the run) or a tokenizer.json path")
    bpe_vocab_size: int = option(4096, "vocabulary size of a trained BPE")
    seed: int = option(0, "seed of the initialisation and of the data order")
    batch_size: int = option(16, "sequences per optimizer step, over all accumulation micro-steps and processes")
    seq_len: int = option(256, "tokens per training sequence (at most the model's max_seq_len)")
    grad_accum: int = option(1, "gradient-accumulation micro-steps per optimizer step (must divide --batch-size)")
    lr: float = option(2e-3, "peak learning rate")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(100, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (linear weights only)")
    qk_scale_lr_mult: float = option(1.0, "learning-rate multiplier of the QK-norm scales (the attention temperature)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "max global gradient norm (0: no clipping)")
    max_steps: int | None = option(None, "optimizer steps: the stop, and the learning-rate schedule's length")
    time_budget: float | None = option(
        None, "seconds of training loop over all resumes: a stop; without --max-steps also the schedule's "
              "length, counted in seconds, so the run ends at --min-lr however fast the machine is")
    save_every: int = option(500, "checkpoint every N steps (and at the end)")
    keep: int = option(2, "checkpoints to keep")
    eval_every: int = option(250, "held-out evaluation every N steps")
    eval_batches: int = option(8, "held-out batches per evaluation (0: none)")
    log_every: int = option(10, "log a metrics line every N steps")
    bf16: bool | None = option(None, "bfloat16 autocast over fp32 weights and AdamW (with --parallel fsdp the blocks "
                                     "also gather their weights in bf16); default: on for CUDA, off on CPU; "
                                     "--no-bf16 turns it off")
    compile: bool = option(False, "torch.compile of each block, applied from outside the model (on CPU about "
                                  "level with eager, whose bf16 step runs C kernels)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward to save memory")
    keep_freed_memory: bool = option(
        False, "CPU: this process keeps freed memory for the next step (glibc's malloc), so a step's large "
               "buffers are not page-faulted in again: 1.05-1.08x faster steps at the 2.5 B's width on one "
               "thread, for a resident size above the live peak (1.10-1.15x measured; more where allocation "
               "sizes do not repeat; free pages go back where it grows past its steady size)")
    parallel: str = option("none", "how the processes torchrun starts share the work: ddp (replicas) or fsdp "
                                   "(sharded weights, gradients and optimizer state); ignored by one process",
                            choices=PARALLEL_MODES)
    dist_timeout: float = option(DEFAULT_TIMEOUT_S, "seconds a process waits for the others in a collective before "
                                                    "failing")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    resume: bool = option(False, "continue the run in --out from its latest checkpoint (settings not given are "
                                 "the run's; a larger --max-steps or --time-budget extends it)")
    allow_data_change: bool = option(False, "with --resume, continue even if the data files differ from those "
                                            "the run started with")
    report_to: tuple[str, ...] = option(("none",), "experiment trackers: none, tensorboard, wandb (several "
                                                   "allowed; wandb runs offline unless WANDB_MODE says otherwise)",
                                        metavar="TRACKER", choices=TRACKERS)
    progress: bool = option(True, "progress bar", cli=False)
    cache_dir: str | None = option(None, "corpus and token cache folder (default $ANDROMEDA_CACHE or "
                                         "~/.cache/andromeda)")

    def __post_init__(self) -> None:
        check_types(self)
        if self.preset is None and self.init_from is None:
            object.__setattr__(self, "preset", DEFAULT_PRESET)
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"TrainConfig.num_proc must be >= 1 (or None for every CPU), got {self.num_proc}")
        for name in ("batch_size", "seq_len", "grad_accum", "bpe_vocab_size", "save_every", "keep",
                     "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "warmup_steps", "eval_batches", "weight_decay", "grad_clip", "min_lr", "qk_scale_lr_mult"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
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
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        unknown_trackers = sorted(set(self.report_to) - set(TRACKERS))
        if unknown_trackers or not self.report_to:
            raise ValueError(f"TrainConfig.report_to must name trackers among {', '.join(TRACKERS)}, got "
                             f"{list(self.report_to)}")
        known = {f.name for f in fields(Config)}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown} in model_overrides; known: {sorted(known)}")
        if self.data is not None and not self.data:
            raise ValueError("TrainConfig.data must name at least one file, folder or glob (or be None)")
        self._check_lora()

    def _check_lora(self) -> None:
        targets = tuple(t.strip() for item in self.lora_targets for t in item.split(",") if t.strip())
        object.__setattr__(self, "lora_targets", targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"TrainConfig.lora_targets (--lora-targets) must name distinct layers among "
                             f"{', '.join(LORA_TARGETS)}, got {', '.join(targets) or 'none'}")
        if self.quantize is not None and self.quantize not in SCHEMES:
            raise ValueError(f"TrainConfig.quantize must be one of {', '.join(SCHEMES)}, got {self.quantize!r}")
        if self.lora_rank is None:
            if self.lora_alpha is not None or self.lora_dropout or self.quantize is not None:
                raise ValueError("--lora-alpha, --lora-dropout and --quantize shape LoRA adapters and their frozen "
                                 "base: give --lora-rank too (the weights of a full fine-tune cannot be quantized)")
            return
        if self.lora_rank < 1:
            raise ValueError(f"TrainConfig.lora_rank (--lora-rank) must be >= 1, got {self.lora_rank}; leave it "
                             f"out to train every weight")
        if self.init_from is None:
            raise ValueError("--lora-rank adapts a trained model: give its checkpoint with --init-from")
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", 2.0 * self.lora_rank)
        if not self.lora_alpha > 0:
            raise ValueError(f"TrainConfig.lora_alpha (--lora-alpha) must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"TrainConfig.lora_dropout (--lora-dropout) must be in [0, 1), got {self.lora_dropout}")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return from_known_fields(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


# Changing any of these mid-run would make the resumed run a different run. The rest (device,
# parallel, the number of processes, ...) may change: the loss curve does not depend on them.
# The stop (max_steps, time_budget) may change too: a resumed run can be extended; its learning-rate
# schedule keeps the length the run started with (train/state.py, Progress.schedule_steps).
RUN_DEFINING = ("preset", "model_overrides", "init_from", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                "quantize", "objective", "chat_template", "data", "eval_data", "text_field",
                "tokenizer", "bpe_vocab_size", "seed",
                "batch_size", "seq_len", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "qk_scale_lr_mult",
                "beta1", "beta2", "grad_clip")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


CONFIG_FILE_SUFFIXES = (".toml", ".yaml", ".yml")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The TrainConfig fields a TOML file (or a YAML one, with PyYAML installed) sets: a table of
    fields spelled as in Python (batch_size) or as on the command line (batch-size), the model's
    Config fields in a `model_overrides` table, a single path allowed where a list is expected.
    Relative paths in it are relative to the working directory, as on the command line.

    Raises a ValueError naming the file and the key for a key that is no TrainConfig field (or,
    under model_overrides, no Config field), and naming the file when it does not parse."""
    path = Path(path)
    if path.suffix.lower() not in CONFIG_FILE_SUFFIXES:
        raise ValueError(f"config file {path} must end in {', '.join(CONFIG_FILE_SUFFIXES)} (TOML or YAML)")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = _parse_config_file(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {path} must hold a table of TrainConfig fields, got a {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown key {key!r} in config file {path}{hint}; the keys are TrainConfig fields: "
                             f"{', '.join(sorted(known))}")
        if name in values:
            raise ValueError(f"config file {path} sets {name} twice (as {name} and as {name.replace('_', '-')})")
        values[name] = value
    _check_model_overrides(values.get("model_overrides", {}), path)
    for name in _tuple_fields():  # data = "corpus.txt" means data = ["corpus.txt"]
        if isinstance(values.get(name), str):
            values[name] = (values[name],)
    return values


def _parse_config_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    try:
        import yaml
    except ImportError:
        raise ImportError(f"reading the YAML file {path} needs PyYAML (pip install pyyaml); or write it as "
                          f"TOML (.toml)") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None


def _check_model_overrides(overrides: Any, path: Path) -> None:
    if not isinstance(overrides, Mapping):
        raise ValueError(f"model_overrides in config file {path} must be a table of model Config fields, "
                         f"got {overrides!r}")
    known = {f.name for f in fields(Config)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown key 'model_overrides.{key}' in config file {path}; model Config fields "
                             f"are: {', '.join(sorted(known))}")


def _tuple_fields() -> list[str]:
    """TrainConfig fields that hold a list of strings (data, eval_data, report_to)."""
    hints = typing.get_type_hints(TrainConfig)
    return [name for name, hint in hints.items()
            if any(typing.get_origin(arg) is tuple for arg in (*typing.get_args(hint), hint))]


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_config(config: TrainConfig, tokenizer: Tokenizer, base: Config | None = None) -> Config:
    """The preset with the overrides, sized for the tokenizer and checked against seq_len. With a
    `base` (the checkpoint of --init-from), its config with the overrides, which may change
    nothing that has a weight's shape."""
    if base is not None:
        return _init_from_config(config, base)
    return sized_model_config(config, tokenizer.vocab_size, tokenizer.name)


def planned_model_config(config: TrainConfig) -> Config:
    """The model Config a run of `config` will build, found without its data: the tokenizer is
    built only when that is free (byte, a tokenizer.json), and a BPE not yet trained counts
    `bpe_vocab_size` tokens, the most it will have."""
    from ..checkpoint import load_config
    from ..tokenizers import build_tokenizer

    if config.init_from is not None:
        return _init_from_config(config, load_config(config.init_from))
    if config.tokenizer == "bpe":
        return sized_model_config(config, config.bpe_vocab_size, f"bpe (at most {config.bpe_vocab_size} tokens)")
    tokenizer = build_tokenizer(config.tokenizer)
    return sized_model_config(config, tokenizer.vocab_size, tokenizer.name)


def sized_model_config(config: TrainConfig, vocab_size: int, tokenizer_name: str) -> Config:
    """The preset with the overrides, num_tokens fitted to a tokenizer of `vocab_size` tokens,
    checked against seq_len."""
    model = Config.from_preset(config.preset or DEFAULT_PRESET, **config.model_overrides)
    if "num_tokens" in config.model_overrides:
        if model.num_tokens < vocab_size:
            raise ValueError(f"num_tokens={model.num_tokens} is smaller than the tokenizer's vocab_size "
                             f"{vocab_size}")
    elif model.num_tokens != vocab_size:
        num_tokens = padded_vocab(vocab_size)
        logger.info("tokenizer %s has %d tokens; setting num_tokens %d -> %d (a multiple of %d)",
                    tokenizer_name, vocab_size, model.num_tokens, num_tokens, VOCAB_MULTIPLE)
        model = model.replace(num_tokens=num_tokens)
    if config.seq_len > model.max_seq_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds the model's max_seq_len {model.max_seq_len} "
                         f"(preset {config.preset!r}); use --seq-len <= {model.max_seq_len}")
    return model


def _init_from_config(config: TrainConfig, base: Config) -> Config:
    changes = dict(PRESETS[config.preset]) if config.preset is not None else {}
    changes.update(config.model_overrides)
    wanted = base.replace(**changes)
    shaped = {name for name, value in changes.items() if getattr(base, name) != value and _changes_shapes(base, name, value)}
    if shaped:
        fields_ = ", ".join(f"{name}={changes[name]!r} (the checkpoint has {getattr(base, name)!r})" for name in sorted(shaped))
        raise ValueError(f"--init-from {config.init_from}: {fields_} would change the shape of the checkpoint's "
                         f"weights; drop the --preset or --override, or train from scratch")
    if config.seq_len > wanted.max_seq_len and wanted.use_abs_pos_emb:
        raise ValueError(f"seq_len {config.seq_len} exceeds the checkpoint's learned positions "
                         f"(max_seq_len={wanted.max_seq_len})")
    return wanted


def _changes_shapes(base: Config, name: str, value: Any) -> bool:
    """Whether setting `name` to `value` changes any weight's name or shape."""
    from ..model import build_transformer

    def shapes(config: Config) -> dict[str, tuple[int, ...]]:
        return {k: tuple(t.shape) for k, t in build_transformer(config, device="meta").state_dict().items()}

    return shapes(base) != shapes(base.replace(**{name: value}))
