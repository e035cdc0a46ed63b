"""`andromeda import-hf`: read a Hugging Face folder written by `export-hf` back into a checkpoint."""

from __future__ import annotations

import argparse

HELP = "turn a Hugging Face folder written by export-hf back into a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="the Hugging Face folder (config.json, model.safetensors, ...)")
    parser.add_argument("--out", required=True, help="a new or empty folder to write; an earlier checkpoint there is replaced, "
                                                      "any other folder is refused")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import check_checkpoint_output, save_pretrained
    from ..interop.hf import load_hf, load_hf_tokenizer

    check_checkpoint_output(args.out, quantized=False, flag="--out")  # before the slow part
    out = save_pretrained(load_hf(args.hf), args.out, tokenizer=load_hf_tokenizer(args.hf), flag="--out")
    print(f"wrote {out}")
    return 0
