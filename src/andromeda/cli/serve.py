"""`andromeda serve`: an OpenAI-compatible HTTP server with continuous batching (see
`andromeda.serve`). One flag per `ServeConfig` field, typed from its annotation, with the field's
help text; --checkpoint and the loading options every inference command shares besides."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing

from ..serve.config import ServeConfig, flag
from .common import add_inference_arguments, group_size_for

DESCRIPTION = ("Serve a checkpoint over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions "
               "(streamed or not), /v1/models, /health, /metrics, /tokenize, /detokenize. Needs the serve extra: "
               "pip install -e '.[serve]' in the andromeda checkout (PyPI's andromeda is an unrelated project).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, training run folder, quantized checkpoint or Hugging Face export")
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        default, help = f.default, f.metadata["help"]
        if f.type in (bool, "bool"):  # on by default: the flag turns it off
            parser.add_argument(flag(f.name), dest=f.name, action="store_false", help=help)
            continue
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kind = next(a for a in typing.get_args(hint) if a is not type(None)) if union else hint
        if f.name == "api_key":  # from the environment by default; an empty key is refused at parse time
            kind, default = _api_key, os.environ.get("ANDROMEDA_API_KEY")
        elif default is not None and "default" not in help:
            help += f" (default {default})"
        parser.add_argument(flag(f.name), dest=f.name, type=kind, default=default, help=help,
                            choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"))
    add_inference_arguments(parser, dtype=False)


def run(args: argparse.Namespace) -> int:
    from ..serve.server import serve

    config = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    return serve(args.checkpoint, config, quantize=args.quantize,
                 group_size=group_size_for(args.checkpoint, args.quantize, args.group_size), lora=args.lora)


def _api_key(value: str) -> str:
    """--api-key (or ANDROMEDA_API_KEY, which argparse passes here too): an empty key would turn
    authentication off without a word, so it is refused."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the key is empty (from --api-key or ANDROMEDA_API_KEY), which would "
                                         "leave the API open to anyone; give a key, or unset both to serve "
                                         "without one")
    return value
