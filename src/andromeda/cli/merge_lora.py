"""`andromeda merge-lora`: write a plain checkpoint whose weights hold a LoRA adapter merged in."""

from __future__ import annotations

import argparse

from ..choices import DTYPE_NAMES

DESCRIPTION = ("Merge a LoRA adapter (a `train --lora-rank` run, or a peft adapter folder) into the weights of the "
               "checkpoint it was trained on, and write the result as a plain checkpoint: W + (alpha / r) B A for "
               "every adapted layer, computed in fp32. generate, eval, serve and export-hf load it like any "
               "checkpoint, with the adapter's effect and none of its cost.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the base: the checkpoint (or run folder) the adapter was "
                                                             "trained on")
    parser.add_argument("--lora", required=True, metavar="DIR", help="the adapter: a LoRA run folder, one of its "
                                                                      "checkpoints, or a peft adapter folder")
    parser.add_argument("--out", required=True, help="a new or empty folder to write; an earlier full-precision "
                                                      "checkpoint there is replaced, any other folder is refused")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                        help="dtype of the merged weights (default: the base's)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's and the adapter's files against their manifests (SHA-256)")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import (
        DTYPES,
        attach_lora,
        check_checkpoint_output,
        load_checkpoint_tokenizer,
        load_transformer,
        open_model_source,
        save_pretrained,
    )

    check_checkpoint_output(args.out, quantized=False, flag="--out")  # before the slow part
    source = attach_lora(open_model_source(args.checkpoint, verify=args.verify), args.lora, verify=args.verify)
    if source.quantization is not None:
        raise ValueError(f"{args.checkpoint} holds {source.describe()} weights, which take no merge: run the adapter "
                         f"beside them (--checkpoint {args.checkpoint} --lora {args.lora} on generate, eval, serve), "
                         f"or merge an adapter trained on a full-precision checkpoint")
    dtype = DTYPES[args.dtype] if args.dtype is not None else None
    net = load_transformer(source, device="cpu", dtype=dtype, verify=args.verify)
    try:
        tokenizer = load_checkpoint_tokenizer(source, verify=args.verify)
    except FileNotFoundError:
        tokenizer = None  # a model saved without one is written without one
    from ..serve.chat_template import find_chat_template

    template = find_chat_template(source)  # the base's, kept with the merged model
    out = save_pretrained(net, args.out, tokenizer=tokenizer, flag="--out", chat_template=template)
    print(f"wrote {out}: {source.folder} with the LoRA adapter {source.lora.folder} merged (rank {source.lora.rank}, "
          f"scaling {source.lora.scaling:g})")
    return 0
