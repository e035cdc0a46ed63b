"""`andromeda export-hf`: write a checkpoint as a Hugging Face `transformers` folder."""

from __future__ import annotations

import argparse

from ..choices import DTYPE_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    parser.add_argument("--out", required=True, help="a new or empty folder to write; an earlier export there is replaced, any other "
                                                      "folder is refused")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="cast the weights (default: as saved)")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import DTYPES, load_checkpoint_tokenizer, load_transformer, open_model_source
    from ..interop.hf import export_hf
    from ..serve.chat_template import find_chat_template

    source = open_model_source(args.checkpoint)
    net = load_transformer(source)
    try:
        tokenizer = load_checkpoint_tokenizer(source)
    except FileNotFoundError:
        tokenizer = None  # a model saved without one exports without one
    template = find_chat_template(source)  # the checkpoint's, checked against its manifest
    out = export_hf(net, tokenizer, args.out, dtype=DTYPES.get(args.dtype), flag="--out", chat_template=template)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)"
          + (f" and AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=False)"
             if tokenizer is not None else ""))
    return 0
