"""Opening a model folder: the one place where a path is resolved and its config parsed.

    source = open_model_source("runs/demo")   # a run folder: its latest complete checkpoint
    source.kind, source.folder, source.config, source.quantization

A model folder is one of

    a training run folder (`train --out`)                  resolved to its latest checkpoint
    a checkpoint (`save_pretrained`, a training step)      kind CHECKPOINT
    a quantized checkpoint (`andromeda quantize`)          kind QUANTIZED
    a Hugging Face export (`export-hf`)                    kind HF_EXPORT, read through `interop.hf`

Each command opens its folder once, here, and hands the `ModelSource` on: the loader
(`checkpoint.loader`), the tokenizer, the server and --init-from read the folder's files without
resolving it or parsing its config again. Opening walks the folder once for links that lead out
of it and special files (`folders.check_folder`) and, with `verify`, checks config.json against
the checkpoint's manifest before parsing it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..folders import CheckpointError, check_folder, read_json_object
from ..interop.hf import config_from_hf
from .files import (
    CONFIG_FILE,
    MANIFEST_FILE,
    TRAIN_CONFIG_FILE,
    WEIGHTS_FILE,
    describe_quantization,
    parse_checkpoint_config,
    read_config_json,
    verify_checkpoint,
)
from .runs import CHECKPOINTS_DIR, LATEST_FILE, latest_checkpoint

if TYPE_CHECKING:
    from .lora import LoraAdapter

CHECKPOINT = "checkpoint"
QUANTIZED = "quantized checkpoint"
HF_EXPORT = "Hugging Face export"


@dataclass(frozen=True)
class ModelSource:
    """A model folder, opened once: where its files are, what kind of folder it is, and its config."""

    path: Path  # as given: a run folder, a checkpoint, a quantized checkpoint or a Hugging Face export
    folder: Path  # the folder holding the files (a run folder's latest checkpoint)
    kind: str  # CHECKPOINT, QUANTIZED or HF_EXPORT
    config: Config
    quantization: tuple[str, int | None] | None = None  # (scheme, group_size) of a QUANTIZED one
    lora: LoraAdapter | None = None  # an adapter merged as the weights load (`lora.attach_lora`)

    def describe(self) -> str:
        """What the folder holds, for messages: "a checkpoint", "int8-quantized", ..."""
        return describe_quantization(self.quantization) if self.quantization is not None else f"a {self.kind}"


def open_model_source(path: str | Path | ModelSource, *, verify: bool = True) -> ModelSource:
    """The `ModelSource` of `path` (a `ModelSource` is returned as it is).

    Errors name the folder and the problem: FileNotFoundError for a missing folder or config.json;
    CheckpointError for a config that is not valid, or (with `verify`) that does not match the
    checkpoint's manifest; ValueError for a Hugging Face folder of another architecture."""
    if isinstance(path, ModelSource):
        return path
    folder = resolve_checkpoint(path)
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {CONFIG_FILE} (the model config)")
    if verify and (folder / MANIFEST_FILE).is_file():
        verify_checkpoint(folder, [CONFIG_FILE])  # a config changed after saving is named before it is read
    data = read_config_json(file)
    if "model_type" in data:  # a transformers config.json names its model type; ours never does
        return ModelSource(Path(path), folder, HF_EXPORT, config_from_hf(data, file))
    config, quantization = parse_checkpoint_config(data, file)
    return ModelSource(Path(path), folder, CHECKPOINT if quantization is None else QUANTIZED, config, quantization)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as is; a run folder (a training `--out`) as its latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} is a file; expected a checkpoint folder (holding {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}) or a training run folder (holding {CHECKPOINTS_DIR}/)"
        )
    if (path / CONFIG_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
        check_folder(path)
        return path
    if (path / CHECKPOINTS_DIR).is_dir() or (path / LATEST_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"run folder {path} has no complete checkpoint in {path / CHECKPOINTS_DIR}")
        check_folder(latest)
        return latest
    raise FileNotFoundError(
        f"{path} is neither a checkpoint folder (no {CONFIG_FILE} or {WEIGHTS_FILE}) nor a training "
        f"run folder (no {CHECKPOINTS_DIR}/ or {LATEST_FILE})"
    )


def load_config(path: str | Path | ModelSource) -> Config:
    """The model Config of any model folder (see `open_model_source`)."""
    return open_model_source(path, verify=False).config


def load_quantization(path: str | Path | ModelSource) -> tuple[str, int | None] | None:
    """(scheme, group_size) of a quantized checkpoint; None for any other folder."""
    return open_model_source(path, verify=False).quantization


def refuse_quantized(source: str | Path | ModelSource, purpose: str) -> None:
    """Raise a ValueError if `source` is a quantized checkpoint: its weights are rounded for
    inference and hold no master copy to train (`purpose` names what was asked)."""
    source = open_model_source(source, verify=False)
    if source.quantization is not None:
        raise ValueError(f"{source.path} holds {source.describe()} weights, made for inference: they cannot be used "
                         f"for {purpose}; use the full-precision checkpoint they were quantized from")


def load_train_config(source: str | Path | ModelSource) -> dict[str, Any] | None:
    """The training hyperparameters saved with a checkpoint, as a dict; None if it has none
    (a checkpoint not written by training, a Hugging Face export)."""
    folder = source.folder if isinstance(source, ModelSource) else resolve_checkpoint(source)
    file = folder / TRAIN_CONFIG_FILE
    if not file.is_file():
        return None
    try:
        return read_json_object(file, "the training hyperparameters, a JSON object of TrainConfig fields")
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def open_draft_source(path: str | Path, target: ModelSource, *, verify: bool = True,
                      flag: str = "--draft-checkpoint", target_flag: str = "--checkpoint") -> ModelSource:
    """The `ModelSource` of a speculative-decoding draft for `target`: refused unless it is full
    precision and shares the target's vocabulary and tokenizer file (compared by SHA-256), with
    errors that name both folders by their flags."""
    try:
        draft = open_model_source(path, verify=verify)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{flag}: {error}") from None
    if draft.quantization is not None:
        raise ValueError(f"{flag} {path} holds {draft.describe()} weights; a quantized draft is not supported "
                         f"(--quantize applies to {target_flag} only): give the full-precision checkpoint it was "
                         f"quantized from")
    ours, theirs = target.config.num_tokens, draft.config.num_tokens
    if ours != theirs:
        raise ValueError(f"{flag} {path} has a vocabulary of {theirs} ids, {target_flag} {target.path} one of {ours}: "
                         f"a draft must share the model's tokenizer")
    mine, other = tokenizer_digest(target.folder), tokenizer_digest(draft.folder)
    if mine != other:
        raise ValueError(f"{flag} {path} has another tokenizer than {target_flag} {target.path} "
                         f"({_describe_digest(other)} vs {_describe_digest(mine)}): a draft must share the model's "
                         f"tokenizer")
    return draft


def tokenizer_digest(folder: Path) -> tuple[str, str] | None:
    """(file name, SHA-256) of the file that defines a model folder's tokenizer: tokenizer.json
    (Hugging Face), else tokenizer_config.json (the byte tokenizer); None if it has neither."""
    from ..tokenizers import HF_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE

    for name in (HF_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        if (folder / name).is_file():
            return name, hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return None


def _describe_digest(digest: tuple[str, str] | None) -> str:
    return "no tokenizer" if digest is None else f"{digest[0]} sha256 {digest[1][:12]}"
