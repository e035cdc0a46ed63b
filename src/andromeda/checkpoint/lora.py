"""LoRA adapters on disk: the folder `peft` writes, under the Hugging Face export's module names, and
merging one into a model's weights (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

An adapter folder holds what `peft.PeftModel.save_pretrained` writes, so `peft` loads it over the
exported model (`export-hf`) as it is:

    adapter_config.json          peft's LoraConfig (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.model.layers.i.<module>.lora_{A,B}.weight
    adapter_base.json            ours: the base it was trained on, {"path", "sha256"} (the SHA-256
                                 of the base's weights file), checked before the adapter is applied

A training checkpoint of a LoRA run holds these three files (in its manifest) in place of
model.safetensors. The adapted modules, ours -> exported (`interop.hf` renames the weights alike):

    qkv      blocks.i.attn.to_qkv     self_attn.q_proj, k_proj, v_proj (one lora_A, lora_B's rows split)
    out      blocks.i.attn.to_out     self_attn.o_proj
    ff_in    blocks.i.ff.proj_in      mlp.up_proj
    ff_out   blocks.i.ff.proj_out     mlp.down_proj

Our fused to_qkv gets one adapter: delta = B @ A with A (r, C) and B ((H + 2K) D, r). Split by
rows, q, k and v each get B's rows and the same A, which is exactly three LoRAs of rank r, so the
exported adapter computes what ours does. Merging (`merge_adapter`) adds scaling * B @ A to each
weight; it needs no `peft` and takes any adapter trained on the export, even one whose q, k and v
have different A's.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config
from ..folders import CheckpointError, check_folder, read_json_object, writing
from ..weights import SafetensorsFile
from .files import MANIFEST_FILE, WEIGHTS_FILE, manifest_sha256, sha256_file, verify_checkpoint
from .source import ModelSource, resolve_checkpoint

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_BASE_FILE = "adapter_base.json"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_BASE_FILE)

# --lora-targets name -> (our module in each block, the exported modules it becomes).
LORA_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv": ("attn.to_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "out": ("attn.to_out", ("self_attn.o_proj",)),
    "ff_in": ("ff.proj_in", ("mlp.up_proj",)),
    "ff_out": ("ff.proj_out", ("mlp.down_proj",)),
}
HF_PREFIX = "base_model.model.model.layers."  # peft's key prefix over AndromedaForCausalLM's layers
_HF_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_[AB])\.weight")
_OUR_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(lora_[AB])\.weight")
# LoraConfig settings whose effect merging by scaling * B @ A would not reproduce, with the value
# that makes each harmless.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "trainable_token_indices": None,
                "layer_replication": None, "target_parameters": None}


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter folder, opened: its settings and the base it records."""

    folder: Path
    rank: int
    alpha: float
    scaling: float  # lora_alpha / r (or / sqrt(r) with use_rslora)
    base_path: str | None  # adapter_base.json's record; None for an adapter trained elsewhere
    base_sha256: str | None

    @property
    def weights_file(self) -> Path:
        return self.folder / ADAPTER_WEIGHTS_FILE


def lora_module_name(target: str) -> str:
    """Our module name (its last part) of a --lora-targets name."""
    return LORA_MODULES[target][0].rpartition(".")[2]


# --------------------------------------------------------------------------- opening


def adapter_folder(path: str | Path) -> Path:
    """The folder holding the adapter files: `path` itself, or a LoRA run's (or checkpoint's)
    latest checkpoint."""
    path = Path(path)
    if path.is_dir() and (path / ADAPTER_CONFIG_FILE).is_file():
        return path
    folder = resolve_checkpoint(path)
    if not (folder / ADAPTER_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--lora {path}: {folder} holds no LoRA adapter (no {ADAPTER_CONFIG_FILE}); give the "
                                f"folder of a LoRA run (train --lora-rank) or a peft adapter folder")
    return folder


def open_adapter(path: str | Path, *, verify: bool = True) -> LoraAdapter:
    """The adapter in `path` (see `adapter_folder`), its files checked against the manifest of a
    checkpoint (with `verify`) and its settings against what merging supports."""
    folder = adapter_folder(path)
    check_folder(folder)  # no link out of it, no FIFO or device, among the files read
    if verify and (folder / MANIFEST_FILE).is_file():
        verify_checkpoint(folder, list(ADAPTER_FILES))
    if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"LoRA adapter {folder} has no {ADAPTER_WEIGHTS_FILE}")
    settings = read_json_object(folder / ADAPTER_CONFIG_FILE, "peft's LoraConfig, a JSON object")
    rank, alpha = _rank_and_alpha(settings, folder / ADAPTER_CONFIG_FILE)
    scaling = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    base = folder / ADAPTER_BASE_FILE
    record = read_json_object(base, "the adapter's base, {\"path\", \"sha256\"}") if base.is_file() else {}
    return LoraAdapter(folder, rank, alpha, scaling, record.get("path"), record.get("sha256"))


def _rank_and_alpha(settings: Mapping[str, Any], file: Path) -> tuple[int, float]:
    if settings.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file} describes a {settings.get('peft_type')} adapter; only LoRA adapters are supported")
    for key, harmless in _UNSUPPORTED.items():
        value = settings.get(key, harmless)
        if value not in (None, {}, []) and value != harmless:
            raise ValueError(f"{file} sets {key}={value!r}, which Andromeda does not apply; supported adapters "
                             f"have {key}={harmless!r}")
    rank, alpha = settings.get("r"), settings.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{file}: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{file}: lora_alpha must be a positive number, got {alpha!r}")
    return rank, float(alpha)


def base_weights_sha256(source: ModelSource) -> str:
    """The SHA-256 of `source`'s weights file, which names the base an adapter was trained on:
    a checkpoint's manifest entry (checked when it loads), else hashed now."""
    recorded = manifest_sha256(source.folder, WEIGHTS_FILE)
    if recorded is not None:
        return recorded
    file = source.folder / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{source.folder} has no {WEIGHTS_FILE}: a LoRA adapter needs a base whose weights "
                                f"are one file (a checkpoint, or an export-hf folder)")
    return sha256_file(file)


def attach_lora(source: ModelSource, lora: str | Path | None, *, verify: bool = True) -> ModelSource:
    """`source` with the adapter `lora` to apply as it loads (`checkpoint.load_transformer`: merged
    into full-precision weights, beside quantized ones), after checking that the adapter was
    trained on this base and fits its shapes; `source` as it is without one. Errors name both
    folders."""
    if lora is None:
        return source
    adapter = open_adapter(lora, verify=verify)
    if adapter.base_sha256 is None:
        logger.warning("LoRA adapter %s records no base (%s): applying it to %s unchecked", adapter.folder,
                       ADAPTER_BASE_FILE, source.folder)
    else:
        found = base_weights_sha256(source)
        if found != adapter.base_sha256:
            raise ValueError(f"--lora {lora} was trained on {adapter.base_path} (weights SHA-256 "
                             f"{adapter.base_sha256[:12]}...), not on {source.path} (weights SHA-256 {found[:12]}...); "
                             f"give --checkpoint {adapter.base_path}")
    with SafetensorsFile(adapter.weights_file) as weights:
        _check_shapes(weights.shapes(), source.config, adapter)
    return replace(source, lora=adapter)


def _check_shapes(shapes: Mapping[str, tuple[int, ...]], config: Config, adapter: LoraAdapter) -> None:
    """Raise a ValueError naming the first adapter tensor that is no LoRA weight of a model of
    `config`, or whose shape is not (r, in) for lora_A, (out, r) for lora_B."""
    expected = _module_shapes(config)
    if not shapes:
        raise ValueError(f"{adapter.weights_file} holds no tensors")
    for name, shape in shapes.items():
        match = _HF_KEY.fullmatch(name)
        if match is None or (int(match.group(1)), match.group(2)) not in expected:
            raise ValueError(f"{adapter.weights_file}: {name!r} is no LoRA weight of this model (depth "
                             f"{config.depth}; adapted modules {', '.join(sorted(_hf_modules()))})")
        out_features, in_features = expected[int(match.group(1)), match.group(2)]
        want = (adapter.rank, in_features) if match.group(3) == "lora_A" else (out_features, adapter.rank)
        if tuple(shape) != want:
            raise ValueError(f"{adapter.weights_file}: {name} has shape {tuple(shape)}, this model needs {want} "
                             f"(rank {adapter.rank}): the adapter belongs to a model of another shape")


def _hf_modules() -> set[str]:
    return {hf for _, names in LORA_MODULES.values() for hf in names}


def _module_shapes(config: Config) -> dict[tuple[int, str], tuple[int, int]]:
    """(layer, exported module) -> (out_features, in_features)."""
    C, F, H, K, D = config.dim, config.ff_dim, config.heads, config.attn_kv_heads, config.dim_head
    per_block = {"self_attn.q_proj": (H * D, C), "self_attn.k_proj": (K * D, C), "self_attn.v_proj": (K * D, C),
                 "self_attn.o_proj": (C, H * D), "mlp.up_proj": (F, C), "mlp.down_proj": (C, F)}
    return {(layer, name): shape for layer in range(config.depth) for name, shape in per_block.items()}


# --------------------------------------------------------------------------- merging


def read_adapter(adapter: LoraAdapter) -> dict[str, Tensor]:
    """The adapter's tensors under their exported (peft) names."""
    with SafetensorsFile(adapter.weights_file) as weights:
        return {name: weights.read(name) for name in weights.entries}


@torch.no_grad()
def merge_adapter(state: dict[str, Tensor], adapter: LoraAdapter, config: Config) -> None:
    """Add each adapted weight's scaling * B @ A (in fp32, rounded once to the weight's dtype) to
    the Transformer state dict `state`, in place."""
    for module, (a, b) in _module_updates(read_adapter(adapter), adapter, config).items():
        key = f"{module}.weight"
        weight = state[key]
        delta = adapter.scaling * (b @ a)  # (out, in)
        state[key] = (weight.float() + delta.to(weight.device)).to(weight.dtype)


def _module_updates(tensors: Mapping[str, Tensor], adapter: LoraAdapter, config: Config
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """Our module name -> (A (R, in), B (out, R)) with B @ A its whole update (before scaling).
    q, k and v sharing one A (as Andromeda trains them) keep rank r; otherwise their A's stack and
    their B's sit block-diagonally (rank 3r), which is exact too."""
    H, K, D = config.heads, config.attn_kv_heads, config.dim_head
    ours = {hf: (module, index) for module, names in LORA_MODULES.values() for index, hf in enumerate(names)}
    parts: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    for name, a in tensors.items():
        match = _HF_KEY.fullmatch(name)
        if match.group(3) != "lora_A":
            continue
        layer, module = match.groups()[:2]
        b = tensors.get(f"{HF_PREFIX}{layer}.{module}.lora_B.weight")
        if b is None:
            raise CheckpointError(f"{adapter.weights_file} has {name} without its lora_B")
        our_module, index = ours[module]
        parts.setdefault(f"blocks.{layer}.{our_module}", {})[index] = (a.float(), b.float())
    updates = {}
    for module, found in parts.items():
        if not module.endswith("to_qkv"):
            updates[module] = found[0]
            continue
        rows = (H * D, K * D, K * D)
        pieces = [found.get(i) for i in range(3)]
        a0 = pieces[0][0] if pieces[0] is not None else None
        if all(p is not None for p in pieces) and all(torch.equal(a0, p[0]) for p in pieces):
            updates[module] = (a0, torch.cat([p[1] for p in pieces]))
            continue
        a = torch.cat([p[0] for p in pieces if p is not None])
        b = torch.zeros(sum(rows), a.shape[0])
        row = col = 0
        for piece, count in zip(pieces, rows):
            if piece is not None:
                b[row : row + count, col : col + piece[0].shape[0]] = piece[1]
                col += piece[0].shape[0]
            row += count
        updates[module] = (a, b)
    return updates


class LoraOverQuantized(nn.Module):
    """A frozen quantized Linear plus a LoRA update, unmerged: base(x) + scaling * (x A^T) B^T,
    the low-rank product in fp32 (how a QLoRA adapter runs over its quantized base)."""

    def __init__(self, base: nn.Module, a: Tensor, b: Tensor, scaling: float) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        self.register_buffer("lora_A", a)  # (R, in)
        self.register_buffer("lora_B", b)  # (out, R)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        update = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T  # (..., out)
        return y + (update * self.scaling).to(y.dtype)


@torch.no_grad()
def apply_adapter_unmerged(net: nn.Module, adapter: LoraAdapter, device: torch.device | str | None = None) -> None:
    """Wrap each adapted (quantized) Linear of `net` in a `LoraOverQuantized`, in place."""
    for module, (a, b) in _module_updates(read_adapter(adapter), adapter, net.config).items():
        parent_name, _, child = module.rpartition(".")
        parent = net.get_submodule(parent_name)
        base = getattr(parent, child)
        where = device if device is not None else next(iter(base.buffers())).device
        setattr(parent, child, LoraOverQuantized(base, a.to(where), b.to(where), adapter.scaling))


# --------------------------------------------------------------------------- our names <-> exported


def to_hf_adapter_state(state: Mapping[str, Tensor], config: Config) -> dict[str, Tensor]:
    """peft's state dict of our Transformer (blocks.i.attn.to_qkv.lora_A.weight, ...) under the
    exported model's names, to_qkv split into q, k and v (each tensor its own storage)."""
    H, K, D = config.heads, config.attn_kv_heads, config.dim_head
    to_hf = {module: names for module, names in LORA_MODULES.values()}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = _OUR_KEY.fullmatch(name)
        if match is None or match.group(2) not in to_hf:
            raise KeyError(f"{name!r} is no LoRA weight Andromeda exports")
        layer, module, part = match.groups()
        names = to_hf[module]
        if len(names) == 1:
            pieces = [tensor]
        elif part == "lora_A":  # one A serves q, k and v
            pieces = [tensor] * 3
        else:
            pieces = list(tensor.split((H * D, K * D, K * D)))
        for hf, piece in zip(names, pieces):
            out[f"{HF_PREFIX}{layer}.{hf}.{part}.weight"] = piece.detach().cpu().clone().contiguous()
    return out


def from_hf_adapter_state(tensors: Mapping[str, Tensor], file: Path) -> dict[str, Tensor]:
    """The inverse of `to_hf_adapter_state`: q, k and v joined into to_qkv. ValueError if their
    lora_A differ (an adapter trained on the export): such an adapter merges, but cannot continue
    training as our one fused adapter."""
    from_hf = {hf: (module, index, len(names)) for module, names in LORA_MODULES.values()
               for index, hf in enumerate(names)}
    grouped: dict[str, list[Tensor | None]] = {}
    for name, tensor in tensors.items():
        match = _HF_KEY.fullmatch(name)
        if match is None or match.group(2) not in from_hf:
            raise ValueError(f"{file}: {name!r} is no LoRA weight of an Andromeda model")
        layer, hf, part = match.groups()
        module, index, count = from_hf[hf]
        grouped.setdefault(f"blocks.{layer}.{module}.{part}.weight", [None] * count)[index] = tensor
    state: dict[str, Tensor] = {}
    for name, parts in grouped.items():
        if any(p is None for p in parts):
            raise ValueError(f"{file}: the adapter of {name} lacks some of q_proj, k_proj, v_proj")
        if len(parts) == 1:
            state[name] = parts[0]
        elif name.endswith("lora_A.weight"):
            if not all(torch.equal(parts[0], p) for p in parts[1:]):
                raise ValueError(f"{file}: q_proj, k_proj and v_proj have different lora_A in {name}; Andromeda "
                                 f"trains one adapter over its fused to_qkv: merge this adapter (merge-lora) instead")
            state[name] = parts[0]
        else:
            state[name] = torch.cat(parts)
    return state


def write_adapter(folder: Path, state: Mapping[str, Tensor], config: Config, settings: Mapping[str, Any],
                  base: ModelSource) -> None:
    """Write peft's files for our adapter `state` (peft's state dict of our Transformer) into
    `folder`: the tensors under the exported names, `settings` (a LoraConfig's dict, target
    modules under their exported names) as adapter_config.json, and the base's record."""
    from safetensors.torch import save_file

    with writing(folder / ADAPTER_WEIGHTS_FILE):
        save_file(to_hf_adapter_state(state, config), str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    with writing(folder / ADAPTER_CONFIG_FILE):
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(dict(settings), indent=2, sort_keys=True) + "\n")
    record = {"path": str(base.folder.resolve()), "sha256": base_weights_sha256(base), "kind": base.kind}
    with writing(folder / ADAPTER_BASE_FILE):
        (folder / ADAPTER_BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def hf_target_modules(targets: tuple[str, ...]) -> list[str]:
    """The exported module names (last part) a LoRA on `targets` adapts: adapter_config.json's
    target_modules, as peft matches them on the exported model."""
    return sorted(hf.rpartition(".")[2] for target in targets for hf in LORA_MODULES[target][1])


def describe_adapter_base(folder: Path) -> str:
    """For messages: the base a LoRA checkpoint records."""
    file = folder / ADAPTER_BASE_FILE
    try:
        return json.loads(file.read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its base checkpoint"


def is_adapter_only(folder: Path) -> bool:
    """A LoRA run's checkpoint: adapter files and no weights of its own."""
    return (folder / ADAPTER_CONFIG_FILE).is_file() and not (folder / WEIGHTS_FILE).is_file()

