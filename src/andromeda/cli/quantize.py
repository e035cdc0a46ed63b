"""`andromeda quantize`: write a weight-only int8 or int4 copy of a checkpoint, for fast decoding."""

from __future__ import annotations

import argparse
import time

from ..choices import DEFAULT_GROUP_SIZE, DTYPE_NAMES, INT4_GROUP_SIZES, SCHEMES

DESCRIPTION = ("Write a weight-only int8 or int4 quantized copy of a checkpoint: every Linear (attention, "
               "feed-forward, output projection) is stored in 8 or 4 bits with its scales; generate, eval and "
               "serve load the result like any checkpoint.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="full-precision checkpoint folder or run folder")
    parser.add_argument("--out", required=True, help="a new or empty folder to write; an earlier quantized checkpoint there is replaced, "
                                                      "any other folder is refused")
    parser.add_argument("--scheme", required=True, choices=SCHEMES,
                        help="int8: one scale per output row; int4: a scale and zero per group of inputs")
    parser.add_argument("--group-size", type=int,
                        help=f"int4 inputs per scale and zero: {', '.join(map(str, INT4_GROUP_SIZES))} (default: "
                             f"the largest of {DEFAULT_GROUP_SIZE} and below that divides every layer)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16",
                        help="dtype of the scales, embeddings, norms and activations (default bf16)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against its manifest (SHA-256)")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import (
        DTYPES,
        check_checkpoint_output,
        check_load_request,
        describe_quantization,
        load_checkpoint_tokenizer,
        load_transformer,
        open_model_source,
        save_pretrained,
    )
    from ..inference.quantize import check_scheme
    from .common import group_size_for

    if args.group_size is not None:
        check_scheme(args.scheme, args.group_size)
    check_checkpoint_output(args.out, quantized=True, flag="--out")  # before the slow part
    source = open_model_source(args.checkpoint, verify=args.verify)
    args.group_size = group_size_for(source, args.scheme, args.group_size)
    check_scheme(args.scheme, args.group_size)
    check_load_request(source, args.scheme, args.group_size)  # every layer's width, before reading weights
    start = time.perf_counter()
    net = load_transformer(source, device="cpu", dtype=DTYPES[args.dtype], verify=args.verify, quantize=args.scheme,
                           group_size=args.group_size)
    seconds = time.perf_counter() - start
    try:
        tokenizer = load_checkpoint_tokenizer(source, verify=args.verify)
    except FileNotFoundError:
        tokenizer = None  # a model saved without one is written without one
    out = save_pretrained(net, args.out, tokenizer=tokenizer, flag="--out")
    size = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    group = args.group_size if args.scheme == "int4" else None
    print(f"wrote {out}: {describe_quantization((args.scheme, group))}, {size / 2**20:,.1f} MiB of weights "
          f"(loaded and quantized in {seconds:.1f} s)")
    return 0
