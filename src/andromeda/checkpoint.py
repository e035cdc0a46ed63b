"""Checkpoints: a folder of safetensors weights, the model config, the tokenizer and trainer state.

A checkpoint folder holds

    config.json          the model `Config`: enough to rebuild the model on its own; a quantized
                         checkpoint adds {"quantization": {"scheme", "group_size"}} beside its fields
    model.safetensors    the Transformer's state dict (a quantized one's: int8 / packed int4
                         weights with their scales, see `inference.quantize`)
    tokenizer files      whatever `save_tokenizer` writes (absent if no tokenizer was given)
    train_config.json    the training hyperparameters (training checkpoints only)
    trainer_state.safetensors   step, clock, RNG states (training checkpoints only; train/state.py)
    optimizer/           the AdamW state, in torch.distributed.checkpoint's sharded format
                         (training checkpoints only; see `parallel.dcp`)

A training run keeps its checkpoints in `RUN/checkpoints/step_000100/` and names the newest in
`RUN/latest`. Every checkpoint is written into `RUN/checkpoints/.tmp-*`, fsynced, and only then
renamed to its final name, so a crash or `kill -9` at any moment leaves each earlier checkpoint
whole: a `step_*` folder exists only once it is complete.

Runs over several processes write the same folder: the model is consolidated at save time (rank 0
gathers the full state dict and writes `model.safetensors`), so loading for evaluation, generation
or `from_pretrained` is the same single-file read whatever trained it, while the optimizer state —
two thirds of the bytes — is written by every process in parallel, each its own shards, and is
resharded on load for any number of processes. The processes write into one staging folder
(`stage_checkpoint`) and rank 0 renames it once all are done (`commit_checkpoint`).

Loading validates everything (files present, header intact, every name and shape matching the
config) before a model is built, so a bad checkpoint raises an error naming the file and the
problem and never yields a half-loaded model.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Config, check_size
from .folders import (
    TMP_PREFIX,
    CheckpointError,
    UnsafeFileError,
    check_folder,
    check_output,
    fsync,
    member,
    read_json_object,
    replace_folder,
    staging_beside,
)
from .inference.quantize import (
    DEFAULT_GROUP_SIZE,
    check_scheme,
    load_quantized_transformer,
    quantization_of,
    quantize,
)
from .pause import pause_point
from .model import Transformer
from .tokenizers import HF_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, Tokenizer, load_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
QUANTIZATION_KEY = "quantization"  # config.json of a quantized checkpoint: {"scheme", "group_size"}
WEIGHTS_FILE = "model.safetensors"
TRAIN_CONFIG_FILE = "train_config.json"
TRAINER_STATE_FILE = "trainer_state.safetensors"
OPTIMIZER_DIR = "optimizer"
MANIFEST_FILE = "manifest.json"  # every other file's size and SHA-256
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = TMP_PREFIX
HASH_BLOCK = 8 * 2**20  # bytes read per hashing step


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a full disk (or quota) while writing `path` into an error that says so and names it."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path) from None
        raise
    except SafetensorError as err:  # safetensors' writer reports I/O errors as its own
        if "os error 28" in str(err) or "No space left" in str(err):
            raise disk_full(path) from None
        raise


def disk_full(path: Path, detail: str = "") -> OSError:
    """An ENOSPC error whose message names the file being written."""
    error = OSError(f"no space left on device while writing {path}{detail}")
    error.errno = errno.ENOSPC
    return error


def write_checkpoint_files(
    folder: Path,
    config: Config,
    weights: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    train_config: Mapping[str, Any] | None = None,
    quantization: tuple[str, int | None] | None = None,
) -> None:
    """Write the model config, the `weights` (a Transformer state dict), the tokenizer and the
    training hyperparameters into the (new, empty) `folder`; `commit_checkpoint` fsyncs them.
    `quantization`: the (scheme, group_size) the weights are quantized with, recorded in the config."""
    with writing(folder / CONFIG_FILE):
        data = config.to_dict()
        if quantization is not None:
            data[QUANTIZATION_KEY] = {"scheme": quantization[0], "group_size": quantization[1]}
        (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    tensors = {name: t.detach().contiguous().cpu() for name, t in weights.items()}
    with writing(folder / WEIGHTS_FILE):
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        with writing(folder / "tokenizer files"):
            save_tokenizer(tokenizer, folder)
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


def write_manifest(folder: Path) -> None:
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


def apply_umask(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            fsync(file)
    fsync(folder)


def save_pretrained(net: Transformer, directory: str | Path, tokenizer: Tokenizer | None = None, *,
                    flag: str = "directory") -> Path:
    """Save weights, config and (optionally) tokenizer into `directory`; returns it.

    The folder is written beside its final name and renamed into place, so readers never see a
    partial one. `directory` must be new or empty, or a checkpoint of the same kind (quantized or
    not) that holds nothing but its manifest's files, which is then replaced as a whole; anything
    else (a run folder, an unrelated folder) is refused with a FileExistsError naming `flag`.
    A quantized model (`inference.quantize`) saves its quantized weights, and its config records
    the scheme.
    """
    directory = check_checkpoint_output(directory, quantized=quantization_of(net) is not None, flag=flag)
    staging = staging_beside(directory)
    try:
        write_checkpoint_files(staging, net.config, net.state_dict(), tokenizer, quantization=quantization_of(net))
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
        return (_read_config(folder)[1] is not None) == quantized
    except (OSError, ValueError):
        return False


def _check_keep(keep: int) -> None:
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint just written), got {keep}")


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint of `step` in the run `run_dir`."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:06d}"


def staging_folder(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place: one name that
    every process of a distributed run derives alike."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{_TMP_PREFIX}step_{step:06d}"


def stage_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Create the empty staging folder of `step` (replacing a leftover of an interrupted write)."""
    staging = staging_folder(run_dir, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit_checkpoint(run_dir: str | Path, step: int, keep: int) -> Path:
    """Fsync the complete staging folder of `step`, rename it to `step_{step:06d}`, point
    `RUN/latest` at it and delete all but the newest `keep` checkpoints; returns the folder."""
    _check_keep(keep)
    root = Path(run_dir) / CHECKPOINTS_DIR
    staging, final = staging_folder(run_dir, step), checkpoint_folder(run_dir, step)
    finish_checkpoint_folder(staging)
    pause_point(f"before-rename:{final.name}")
    replace_folder(staging, final)
    _write_latest(Path(run_dir), final)
    for old in step_checkpoints(run_dir)[:-keep]:
        # Renamed out of the step_* namespace first: a crash mid-delete leaves a .tmp-* folder,
        # never a step folder with files missing.
        trash = root / f"{_TMP_PREFIX}delete-{old.name}"
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def _write_latest(run_dir: Path, checkpoint: Path) -> None:
    """Point `RUN/latest` at `checkpoint`: written to a temporary file, then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}latest-", dir=run_dir)
    with os.fdopen(fd, "w") as out:
        out.write(f"{CHECKPOINTS_DIR}/{checkpoint.name}\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, run_dir / LATEST_FILE)
    fsync(run_dir)


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete the `.tmp-*` leftovers of writes that a crash interrupted; returns what was removed.

    Only call this while no other process writes to the run.
    """
    run_dir = Path(run_dir)
    leftovers = sorted((run_dir / CHECKPOINTS_DIR).glob(f"{_TMP_PREFIX}*")) if run_dir.is_dir() else []
    leftovers += sorted(run_dir.glob(f"{_TMP_PREFIX}latest-*")) if run_dir.is_dir() else []
    for path in leftovers:
        logger.warning("removing %s, left by an interrupted checkpoint write", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


# --------------------------------------------------------------------------- finding


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder `RUN/latest` names, else the highest `step_*` folder, else None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        named = pointer.read_text().strip()
        target = run_dir / named
        # Only this run's own step folders: a crafted `latest` ("../other/...", an absolute
        # path) must not make a resume continue another run's settings here.
        if re.fullmatch(rf"{CHECKPOINTS_DIR}/step_\d+", named) and target.is_dir():
            return target
        logger.warning("%s names %r, which is not one of this run's checkpoints; using the newest step folder",
                       pointer, named)
    checkpoints = step_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


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


# --------------------------------------------------------------------------- reading


def load_config(path: str | Path) -> Config:
    """The model Config of a checkpoint (or of a run's latest checkpoint)."""
    return _read_config(resolve_checkpoint(path))[0]


def load_quantization(path: str | Path) -> tuple[str, int | None] | None:
    """(scheme, group_size) of a quantized checkpoint; None for a full-precision one."""
    return _read_config(resolve_checkpoint(path))[1]


def _read_config(folder: Path) -> tuple[Config, tuple[str, int | None] | None]:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {CONFIG_FILE} (the model config)")
    try:
        data = read_json_object(file, "the model config, a JSON object of Config fields")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
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


def refuse_quantized(path: str | Path, purpose: str) -> None:
    """Raise a ValueError if the checkpoint at `path` is quantized: its weights are rounded for
    inference and hold no master copy to train (`purpose` names what was asked)."""
    quantization = load_quantization(path)
    if quantization is not None:
        raise ValueError(f"{path} holds {describe_quantization(quantization)} weights, made for inference: they "
                         f"cannot be used for {purpose}; use the full-precision checkpoint they were quantized from")


def describe_quantization(quantization: tuple[str, int | None]) -> str:
    scheme, group_size = quantization
    return "int8-quantized" if scheme == "int8" else f"int4-quantized (group size {group_size})"


def _validate_weights(file: Path, config: Config) -> None:
    """Check that `file` is a whole safetensors file holding exactly the config's tensors."""
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file.parent} has no {WEIGHTS_FILE} (the weights)")
    try:
        with safe_open(str(file), framework="pt") as handle:
            found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except SafetensorError as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}
    problems = shape_problems(found, expected, {name: "the file" for name in found})
    if problems:
        raise CheckpointError(f"{file} does not match {file.parent / CONFIG_FILE}: {problems}")


def shape_problems(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                   where: Mapping[str, str]) -> str:
    """What differs between the tensors a file holds and those a config expects, as one phrase
    (missing, unexpected, shape mismatches, five of each at most); "" when nothing does.
    `where[name]` says which file holds a found tensor."""
    def some(names: list[str]) -> str:
        return f"{names[:5]}{' ...' if len(names) > 5 else ''}"

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{n}: {found[n]} in {where[n]}, {expected[n]} from {CONFIG_FILE}"
             for n in sorted(set(found) & set(expected)) if found[n] != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors {some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {some(unexpected)}")
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
    return "; ".join(problems)


def load_transformer(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
    verify: bool = True, quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
) -> Transformer:
    """Rebuild the model saved at `path` (a checkpoint folder, a run folder's latest, or a
    Hugging Face folder written by `interop.hf.export_hf`).

    With `verify`, the config and weights are first checked against the checkpoint's manifest
    (sizes and SHA-256: a corrupted or altered file is named, not loaded); the weights are then
    validated against the config, the model is built on the meta device and the loaded tensors
    are assigned in place, so no memory is spent on a throwaway initialisation. `dtype` casts
    floating-point weights; by default they keep the saved dtype.

    A quantized checkpoint (`andromeda quantize`) loads as the quantized model, in its saved
    dtype. `quantize` ("int8" or "int4", with `group_size`) quantizes a full-precision one as it
    loads (after the `dtype` cast); asked of a checkpoint quantized otherwise, it is an error.
    """
    from .interop.hf import is_hf_folder, load_hf  # a Hugging Face export loads too

    if quantize is not None:
        check_scheme(quantize, group_size)
    if is_hf_folder(path):
        net = load_hf(path, device=device, dtype=dtype)
        return _quantized(net, quantize, group_size)
    folder = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(folder, [CONFIG_FILE, WEIGHTS_FILE])
    config, quantization = _read_config(folder)
    file = folder / WEIGHTS_FILE
    if quantization is not None:
        return _load_quantized(folder, config, quantization, device, dtype, quantize, group_size)
    _validate_weights(file, config)
    target = torch.device(device) if device is not None else torch.get_default_device()
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(file), framework="pt", device=str(target)) as handle:
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    with torch.device("meta"):
        net = Transformer(config)
    net.load_state_dict(state, strict=True, assign=True)
    net.eval()
    logger.info("loaded %s (%s parameters)", folder, f"{net.num_parameters():,}")
    return _quantized(net, quantize, group_size)


def _quantized(net: Transformer, scheme: str | None, group_size: int) -> Transformer:
    if scheme is None:
        return net
    quantize(net, scheme, group_size)
    logger.info("weights quantized as they loaded: %s", describe_quantization((scheme, group_size)))
    return net


def _load_quantized(folder: Path, config: Config, quantization: tuple[str, int], device, dtype,
                    requested: str | None, group_size: int) -> Transformer:
    """A quantized checkpoint's model, after checking the request fits it."""
    if requested is not None and (requested, group_size if requested == "int4" else None) != quantization:
        raise ValueError(f"{folder} is already {describe_quantization(quantization)}; drop --quantize, or "
                         f"quantize the full-precision checkpoint it was made from")
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {WEIGHTS_FILE} (the weights)")
    try:
        with safe_open(str(file), framework="pt") as handle:
            saved = handle.get_slice("token_emb.weight").get_dtype() if "token_emb.weight" in handle.keys() else None
    except SafetensorError as err:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if dtype is not None and saved is not None and _SAFETENSORS_DTYPES.get(saved) != dtype:
        raise ValueError(f"{folder} is {describe_quantization(quantization)} with {saved} scales and activations; "
                         f"it loads in that dtype only (asked for {dtype})")
    try:
        net = load_quantized_transformer(config, file, *quantization)
    except ValueError as err:
        raise CheckpointError(f"{file} does not match {folder / CONFIG_FILE}: {err}") from None
    if device is not None:
        net = net.to(device)
    logger.info("loaded %s (%s)", folder, describe_quantization(quantization))
    return net


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def load_checkpoint_tokenizer(path: str | Path, *, verify: bool = True) -> Tokenizer:
    """The tokenizer stored with a checkpoint (or a run's latest), checked against the
    manifest with `verify`."""
    from .interop.hf import is_hf_folder, load_hf_tokenizer

    if is_hf_folder(path):
        tokenizer = load_hf_tokenizer(path)
        if tokenizer is None:
            raise FileNotFoundError(f"Hugging Face folder {path} has no tokenizer.json")
        return tokenizer
    folder = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(folder, [HF_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE])
    if not ((folder / HF_TOKENIZER_FILE).is_file() or (folder / TOKENIZER_CONFIG_FILE).is_file()):
        raise FileNotFoundError(
            f"checkpoint {folder} has no tokenizer ({HF_TOKENIZER_FILE} or {TOKENIZER_CONFIG_FILE}); "
            f"save it with save_pretrained(model, dir, tokenizer=...)"
        )
    return load_tokenizer(folder)


def load_train_config(path: str | Path) -> dict[str, Any] | None:
    """The training hyperparameters saved with a checkpoint, as a dict; None if it has none."""
    file = resolve_checkpoint(path) / TRAIN_CONFIG_FILE
    if not file.is_file():
        return None
    try:
        return read_json_object(file, "the training hyperparameters, a JSON object of TrainConfig fields")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
