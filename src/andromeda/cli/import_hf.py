"""`andromeda import-hf`: read a Hugging Face folder written by `export-hf` back into a checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="the Hugging Face folder (config.json, model.safetensors, ...)")
    parser.add_argument("--out", required=True, help="a new or empty folder to write; an earlier checkpoint there is replaced, "
                                                      "any other folder is refused")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import (
        HF_EXPORT,
        check_checkpoint_output,
        load_checkpoint_tokenizer,
        load_transformer,
        open_model_source,
        save_pretrained,
    )
    from ..serve.chat_template import find_chat_template

    check_checkpoint_output(args.out, quantized=False, flag="--out")  # before the slow part
    source = open_model_source(args.hf)
    if source.kind != HF_EXPORT:
        raise ValueError(f"{args.hf} holds {source.describe()}, not a Hugging Face export: it is a checkpoint "
                         f"already (load it with --checkpoint, or copy it)")
    try:
        tokenizer = load_checkpoint_tokenizer(source)
    except FileNotFoundError:
        tokenizer = None  # an export without a tokenizer is imported without one
    template = find_chat_template(source)  # chat_template.jinja, or tokenizer_config.json's chat_template
    out = save_pretrained(load_transformer(source), args.out, tokenizer=tokenizer, flag="--out", chat_template=template)
    print(f"wrote {out}")
    return 0
