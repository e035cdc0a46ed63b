"""Options several commands share: how to load a model for inference (dtype, quantization)."""

from __future__ import annotations

import argparse

import torch

from ..checkpoint import load_quantization, load_transformer
from ..interop.hf import is_hf_folder
from ..inference.packed import prepack_if_supported
from ..inference.quantize import DEFAULT_GROUP_SIZE, SCHEMES, check_scheme
from ..model import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def inference_dtype(path: str, args: argparse.Namespace, device: torch.device, *, decoding: bool) -> torch.dtype | None:
    """The dtype to load weights in: --dtype; else bf16 when quantizing a full-precision
    checkpoint (its scales and activations) or, for decoding, on CUDA (every token reads every
    weight); else as saved (always, for a quantized checkpoint)."""
    chosen = getattr(args, "dtype", None)
    if chosen is not None:
        return DTYPES[chosen]
    if not is_hf_folder(path) and load_quantization(path) is not None:
        return None
    if args.quantize is not None or (decoding and device.type == "cuda"):
        return torch.bfloat16
    return None


def load_for_inference(path: str, args: argparse.Namespace, device: torch.device, *, verify: bool = True,
                       decoding: bool = True) -> Transformer:
    """The model at `path` as the shared options ask, in eval mode, with bf16 weights on a CPU
    prepacked for oneDNN (`inference.packed`: the same products, up to 3x faster per decode step).
    `decoding`: for token-by-token generation (bf16 by default on CUDA) rather than scoring."""
    if args.quantize is not None:
        check_scheme(args.quantize, args.group_size)
    dtype = inference_dtype(path, args, device, decoding=decoding)
    net = load_transformer(path, device=device, dtype=dtype, verify=verify, quantize=args.quantize,
                           group_size=args.group_size)
    return prepack_if_supported(net).eval()
