"""Options several commands share: how to load a model for inference (dtype, quantization, a LoRA
adapter).

Torch-free at import (the choices come from `andromeda.choices`): `--help` lists them before
PyTorch loads; the functions import what they need when they run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..choices import DEFAULT_GROUP_SIZE, DTYPE_NAMES, INT4_GROUP_SIZES, SCHEMES
from ..config import Config

if TYPE_CHECKING:
    import torch

    from ..checkpoint import ModelSource
    from ..model import Transformer

AUTO_GROUP_SIZES = sorted((size for size in INT4_GROUP_SIZES if size <= DEFAULT_GROUP_SIZE), reverse=True)


def add_inference_arguments(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """--dtype, --quantize, --group-size (None unless given: see `group_size_for`) and --lora."""
    if dtype:
        parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                            help="cast the weights (default: as saved; bf16 on CUDA and when quantizing)")
    parser.add_argument("--quantize", choices=SCHEMES,
                        help="quantize the weights as they load: int8 (per-row scales) or int4 (per-group scales "
                             "and zeros), weight-only; a checkpoint written by `andromeda quantize` needs no flag")
    sizes = ", ".join(map(str, INT4_GROUP_SIZES))
    parser.add_argument("--group-size", type=int, metavar="N",
                        help=f"int4 inputs per scale and zero: {sizes} (default: an int4 checkpoint's own, else the "
                             f"largest of {', '.join(map(str, AUTO_GROUP_SIZES))} that divides every layer's input "
                             f"width)")
    parser.add_argument("--lora", metavar="DIR",
                        help="merge this LoRA adapter into the weights as they load: a LoRA run's folder or "
                             "checkpoint (train --lora-rank) or a peft adapter folder, trained on --checkpoint")


def group_size_for(source: str | Path | ModelSource, quantize: str | None, group_size: int | None) -> int:
    """The int4 group size to load `source` with: `group_size` if given; else, for --quantize int4,
    an int4 checkpoint's own, or the largest of AUTO_GROUP_SIZES that divides every Linear's input
    width (the demo model's 192 takes 64); if none does, the default, which loading refuses naming
    the layer. Other schemes ignore it (the default)."""
    if group_size is not None:
        return group_size
    if quantize != "int4":
        return DEFAULT_GROUP_SIZE
    from ..checkpoint import load_config, load_quantization

    saved = load_quantization(source)
    if saved is not None and saved[0] == "int4":
        return saved[1]
    widths = _input_widths(load_config(source))
    return next((size for size in AUTO_GROUP_SIZES if all(width % size == 0 for width in widths)), DEFAULT_GROUP_SIZE)


def _input_widths(config: Config) -> set[int]:
    """The input width of every Linear of a model of `config`, built on the meta device (shapes
    only: no memory, no initialisation)."""
    import torch
    from torch import nn

    from ..model import Transformer

    with torch.device("meta"):
        net = Transformer(config)
    return {module.in_features for module in net.modules() if isinstance(module, nn.Linear)}


def load_from_args(source: ModelSource, args: argparse.Namespace, device: torch.device, *,
                   decoding: bool = True) -> Transformer:
    """The model of `source` as the shared options (and --no-verify) ask: `checkpoint.load_for_inference`,
    with the --lora adapter merged. `decoding`: for token-by-token generation (bf16 by default on
    CUDA) rather than scoring."""
    from ..checkpoint import attach_lora, load_for_inference

    verify = getattr(args, "verify", True)
    source = attach_lora(source, getattr(args, "lora", None), verify=verify)
    group_size = group_size_for(source, args.quantize, args.group_size)
    return load_for_inference(source, device=device, dtype=getattr(args, "dtype", None), quantize=args.quantize,
                              group_size=group_size, verify=verify, decoding=decoding)
