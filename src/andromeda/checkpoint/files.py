"""The checkpoint folder: its files, writing one whole, its manifest, and its config.json.

A checkpoint folder holds

    config.json          the model `Config`: enough to rebuild the model on its own; a quantized
                         checkpoint adds {"quantization": {"scheme", "group_size"}} beside its fields
    model.safetensors    the Transformer's state dict (a quantized one's: int8 / packed int4
                         weights with their scales, see `inference.quantize`)
    tokenizer files      whatever `save_tokenizer` writes (absent if no tokenizer was given)
    chat_template.jinja  the chat template `serve` and `chat` render messages with (optional;
                         `train --chat-template`, kept from --init-from's and through export-hf)
    train_config.json    the training hyperparameters (training checkpoints only)
    trainer_state.safetensors   step, clock, RNG states (training checkpoints only; train/state.py)
    adapter_*.json/.safetensors   a LoRA run's adapter, in place of model.safetensors (`lora`)
    optimizer/           the AdamW state, in torch.distributed.checkpoint's sharded format
                         (training checkpoints only; see `parallel.dcp`)
    manifest.json        every other file's size and SHA-256

A folder is written complete, then its manifest, permissions and fsyncs (`finish_checkpoint_folder`),
and only then renamed into place (`save_pretrained`, `runs.commit_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import Config, check_size
from ..folders import (
    CheckpointError,
    apply_umask,
    check_output,
    fsync,
    member,
    read_json_object,
    replace_folder,
    staging_beside,
    writing,
)
from ..inference.quantize import check_scheme, quantization_of
from ..interop.hf import CHAT_TEMPLATE_FILE
from ..model import Transformer
from ..tokenizers import Tokenizer, save_tokenizer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
QUANTIZATION_KEY = "quantization"  # config.json of a quantized checkpoint: {"scheme", "group_size"}
WEIGHTS_FILE = "model.safetensors"
TRAIN_CONFIG_FILE = "train_config.json"
TRAINER_STATE_FILE = "trainer_state.safetensors"
OPTIMIZER_DIR = "optimizer"
MANIFEST_FILE = "manifest.json"  # every other file's size and SHA-256
HASH_BLOCK = 8 * 2**20  # bytes read per hashing step


# --------------------------------------------------------------------------- writing


def write_checkpoint_files(
    folder: Path,
    config: Config,
    weights: Mapping[str, torch.Tensor] | None,
    tokenizer: Tokenizer | None = None,
    train_config: Mapping[str, Any] | None = None,
    quantization: tuple[str, int | None] | None = None,
    chat_template: str | None = None,
) -> None:
    """Write the model config, the `weights` (a Transformer state dict), the tokenizer and the
    training hyperparameters into the (new, empty) `folder`; `commit_checkpoint` fsyncs them.
    `weights` None writes no model.safetensors (a LoRA run's checkpoint, which holds its adapter
    and points to its base: `checkpoint.lora`). `quantization`: the (scheme, group_size) the
    weights are quantized with, recorded in the config; `chat_template`: a Jinja chat template's text."""
    with writing(folder / CONFIG_FILE):
        data = config.to_dict()
        if quantization is not None:
            data[QUANTIZATION_KEY] = {"scheme": quantization[0], "group_size": quantization[1]}
        (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    if weights is not None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in weights.items()}
        with writing(folder / WEIGHTS_FILE):
            save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        with writing(folder / "tokenizer files"):
            save_tokenizer(tokenizer, folder)
    if chat_template is not None:
        with writing(folder / CHAT_TEMPLATE_FILE):
            (folder / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    if train_config is not None:
        with writing(folder / TRAIN_CONFIG_FILE):
            (folder / TRAIN_CONFIG_FILE).write_text(json.dumps(dict(train_config), indent=2) + "\n")


def finish_checkpoint_folder(folder: Path) -> None:
    """Make a fully written folder ready to be renamed into place: the manifest of every file's
    size and SHA-256, permissions by the umask (safetensors and mkdtemp create private files),
    and everything fsynced."""
    write_manifest(folder)
    apply_umask(folder)
    _fsync_tree(folder)


# --------------------------------------------------------------------------- the manifest


def write_manifest(folder: Path) -> None:
    """Write `folder`'s manifest: the size and SHA-256 of every other file in it."""
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name != MANIFEST_FILE}
    digests = _sha256_files(list(files.values()))
    entries = {name: {"size": path.stat().st_size, "sha256": digests[path]} for name, path in files.items()}
    with writing(folder / MANIFEST_FILE):
        (folder / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": entries}, indent=1) + "\n")


def verify_checkpoint(folder: Path, names: Sequence[str] | None = None) -> None:
    """Check files of `folder` (`names`, or every file) against its manifest; raise a
    CheckpointError naming the first file whose size or SHA-256 differs, or that is missing.
    A folder written before manifests existed is accepted with a warning."""
    manifest_file = folder / MANIFEST_FILE
    entries = _manifest_entries(folder)
    if entries is None:
        logger.warning("%s has no %s (written by an older version): its files are not verified", folder,
                       MANIFEST_FILE)
        return
    wanted = [n for n in (entries if names is None else names) if names is None or n in entries]
    if names is not None:
        unlisted = [n for n in names if n not in entries and (folder / n).exists()]
        if unlisted:
            raise CheckpointError(f"{folder / unlisted[0]} is not in {manifest_file}: the checkpoint was "
                                  f"changed after it was written")
    paths = [folder / name for name in wanted]
    for name, path in zip(wanted, paths):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {name}, which its {MANIFEST_FILE} lists")
        if path.stat().st_size != entries[name]["size"]:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, its manifest says "
                                  f"{entries[name]['size']}: truncated or modified after it was written")
    digests = _sha256_files(paths)
    for name, path in zip(wanted, paths):
        if digests[path] != entries[name]["sha256"]:
            raise CheckpointError(f"{path} does not match its SHA-256 in {manifest_file}: corrupted or "
                                  f"modified after it was written (pass verify=False / --no-verify to load "
                                  f"it anyway)")


def _manifest_entries(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's {name: {"size", "sha256"}}, every name checked to lie inside `folder`;
    None if the folder has no manifest. CheckpointError for a malformed one."""
    manifest_file = member(folder, MANIFEST_FILE)
    if not manifest_file.is_file():
        return None
    try:
        entries = json.loads(manifest_file.read_text())["files"]
        if not isinstance(entries, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                for e in entries.values()):
            raise TypeError('expected {"files": {NAME: {"size": INT, "sha256": HEX}}}')
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{manifest_file} is not a valid manifest: {err}") from None
    for name in entries:
        member(folder, name, what=f"{MANIFEST_FILE} entry")
    return entries


def manifest_sha256(folder: Path, name: str) -> str | None:
    """The SHA-256 `folder`'s manifest records for the file `name`; None without a manifest or entry."""
    entry = (_manifest_entries(folder) or {}).get(name)
    return entry["sha256"] if entry is not None else None


def sha256_file(path: Path) -> str:
    return _sha256_files([path])[path]


def _sha256_files(paths: Sequence[Path]) -> dict[Path, str]:
    """SHA-256 of each file, several at once (hashlib releases the GIL on large blocks)."""
    def digest(path: Path) -> str:
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(HASH_BLOCK):
                sha.update(block)
        return sha.hexdigest()

    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1) or 1) as pool:
        return dict(zip(paths, pool.map(digest, paths)))


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            fsync(file)
    fsync(folder)


# --------------------------------------------------------------------------- saving a model


def save_pretrained(net: Transformer, directory: str | Path, tokenizer: Tokenizer | None = None, *,
                    flag: str = "directory", chat_template: str | None = None) -> Path:
    """Save weights, config and (optionally) tokenizer into `directory`; returns it.

    The folder is written beside its final name and renamed into place, so readers never see a
    partial one. `directory` must be new or empty, or a checkpoint of the same kind (quantized or
    not) that holds nothing but its manifest's files, which is then replaced as a whole; anything
    else (a run folder, an unrelated folder) is refused with a FileExistsError naming `flag`.
    A quantized model (`inference.quantize`) saves its quantized weights, and its config records
    the scheme. A `chat_template` (its text) is saved as chat_template.jinja.
    """
    directory = check_checkpoint_output(directory, quantized=quantization_of(net) is not None, flag=flag)
    staging = staging_beside(directory)
    try:
        write_checkpoint_files(staging, net.config, net.state_dict(), tokenizer, quantization=quantization_of(net),
                               chat_template=chat_template)
        finish_checkpoint_folder(staging)
        replace_folder(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved model to %s", directory)
    return directory


def check_checkpoint_output(directory: str | Path, *, quantized: bool, flag: str = "directory") -> Path:
    """`directory`, if `save_pretrained` may write a (`quantized` or full-precision) checkpoint
    there; FileExistsError naming it and `flag` otherwise (see `folders.check_output`)."""
    kind = "quantized checkpoint" if quantized else "full-precision checkpoint"
    return check_output(directory, kind=kind, flag=flag,
                        accepts=lambda folder: is_checkpoint_folder(folder, quantized=quantized))


def is_checkpoint_folder(folder: Path, *, quantized: bool) -> bool:
    """Whether `folder` is a checkpoint `save_pretrained` wrote (quantized or not, as asked): a
    valid config and a manifest that lists every file it holds."""
    try:
        entries = _manifest_entries(folder)
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
        if entries is None or files - {MANIFEST_FILE} != set(entries):
            return False
        return (read_checkpoint_config(folder)[1] is not None) == quantized
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- config.json


def read_checkpoint_config(folder: Path) -> tuple[Config, tuple[str, int | None] | None]:
    """(Config, quantization) of the checkpoint `folder`'s config.json (see `parse_checkpoint_config`)."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {CONFIG_FILE} (the model config)")
    return parse_checkpoint_config(read_config_json(file), file)


def read_config_json(file: Path) -> dict[str, Any]:
    """The JSON object in a config.json; CheckpointError naming the file otherwise."""
    try:
        return read_json_object(file, "the model config, a JSON object of Config fields")
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def parse_checkpoint_config(data: Mapping[str, Any], file: Path) -> tuple[Config, tuple[str, int | None] | None]:
    """(our Config, (scheme, group_size) or None) from the contents of a checkpoint's config.json
    `file`: Config fields, and a quantized checkpoint's "quantization". CheckpointError naming the
    file and the problem otherwise."""
    data = dict(data)
    try:
        quantization = data.pop(QUANTIZATION_KEY, None)
        if quantization is not None:
            if not isinstance(quantization, dict) or set(quantization) != {"scheme", "group_size"}:
                raise ValueError(f'"{QUANTIZATION_KEY}" must be {{"scheme": ..., "group_size": ...}}, '
                                 f"got {quantization!r}")
            quantization = (quantization["scheme"], quantization["group_size"])
            check_scheme(*quantization)
        config = Config.from_dict(data)
        check_size(config)
        return config, quantization
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{file} is not a valid model config: {err}") from None


def describe_quantization(quantization: tuple[str, int | None]) -> str:
    scheme, group_size = quantization
    return "int8-quantized" if scheme == "int8" else f"int4-quantized (group size {group_size})"
