"""Options several commands share: how to load a model for inference (dtype, quantization)."""

from __future__ import annotations

import argparse

import torch

from ..checkpoint import DTYPES, ModelSource, load_for_inference
from ..inference.quantize import DEFAULT_GROUP_SIZE, SCHEMES
from ..model import Transformer


def add_inference_arguments(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """--dtype, --quantize and --group-size."""
    if dtype:
        parser.add_argument("--dtype", choices=sorted(DTYPES),
                            help="cast the weights (default: as saved; bf16 on CUDA and when quantizing)")
    parser.add_argument("--quantize", choices=SCHEMES,
                        help="quantize the weights as they load: int8 (per-row scales) or int4 (per-group scales "
                             "and zeros), weight-only; a checkpoint written by `andromeda quantize` needs no flag")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help=f"int4 inputs per scale and zero: 32, 64, 128 or 256 (default {DEFAULT_GROUP_SIZE})")


def load_from_args(source: ModelSource, args: argparse.Namespace, device: torch.device, *,
                   decoding: bool = True) -> Transformer:
    """The model of `source` as the shared options (and --no-verify) ask: `checkpoint.load_for_inference`.
    `decoding`: for token-by-token generation (bf16 by default on CUDA) rather than scoring."""
    return load_for_inference(source, device=device, dtype=getattr(args, "dtype", None), quantize=args.quantize,
                              group_size=args.group_size, verify=getattr(args, "verify", True), decoding=decoding)
