"""`andromeda generate`: stream a continuation of a prompt, past max_seq_len with a sliding window."""

from __future__ import annotations

import argparse
import sys

import torch

from ..checkpoint import load_checkpoint_tokenizer
from ..inference.generate import stream_text
from ..parallel.environment import resolve_device
from .common import add_inference_arguments, load_for_inference

HELP = "stream a continuation of a prompt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    parser.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="below 1e-5 (0 included) = greedy, as in vLLM (default 1.0)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--window", type=int, metavar="W",
                        help="attend to the last W tokens only (sinks included), with a ring-buffer KV cache; "
                             "default: all tokens up to max_seq_len, then a window of max_seq_len")
    parser.add_argument("--sink-tokens", type=int, default=0, metavar="S",
                        help="keep the first S tokens in the window for good (attention sinks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against its manifest (SHA-256)")
    parser.add_argument("--compile", action="store_true",
                        help="run each decode step as one torch.compile'd graph (CUDA graphs on a GPU); "
                             "the first call compiles for tens of seconds")
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    net = load_for_inference(args.checkpoint, args, device, verify=args.verify)
    tokenizer = load_checkpoint_tokenizer(args.checkpoint, verify=args.verify)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pieces = stream_text(net, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, generator=generator,
                         window=args.window, sink_tokens=args.sink_tokens, compile=args.compile)
    first = next(pieces, "")  # arguments are checked before anything is printed
    sys.stdout.write(args.prompt + first)
    sys.stdout.flush()
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
