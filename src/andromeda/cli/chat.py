"""`andromeda chat`: a multi-turn conversation with a checkpoint in the terminal.

Reads one message per line from stdin (a terminal, or a pipe: it can be scripted), streams each
reply to stdout, and keeps the history (within the context: it says on stderr when it drops old
turns). /reset starts over (the --system message stays), /exit or end of input ends. The history
stays in the KV cache from turn to turn, so each turn reads only its new tokens.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_inference_arguments, load_from_args

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) ends it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, run folder, quantized checkpoint or Hugging Face export")
    parser.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")
    parser.add_argument("--chat-template", metavar="FILE",
                        help="Jinja chat template (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="per reply (default 512)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="below 1e-5 (0 included) = greedy (default 0.7)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float, default=0.9, help="(default 0.9)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="also end a reply right before TEXT; repeat for several")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against its manifest (SHA-256)")
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint_tokenizer, open_model_source
    from ..inference.sampling import SamplingParams
    from ..parallel.environment import resolve_device
    from ..serve.chat import ChatSession
    from ..serve.chat_template import ChatTemplate, find_chat_template

    params = SamplingParams(args.temperature, args.top_k, args.top_p)  # checks them before anything loads
    source = open_model_source(args.checkpoint, verify=args.verify)
    template = find_chat_template(source, args.chat_template)
    if template is None:
        raise ValueError(f"{source.folder} has no chat template (chat_template.jinja, or chat_template in "
                         f"tokenizer_config.json); give one with --chat-template FILE (a Jinja template, as "
                         f"Hugging Face's), or continue plain text with `andromeda generate`")
    net = load_from_args(source, args, resolve_device(args.device))
    tokenizer = load_checkpoint_tokenizer(source, verify=args.verify)
    session = ChatSession(net, tokenizer, ChatTemplate(template), system=args.system, params=params, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=tuple(args.stop))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {source.folder.name}: {HELP}", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        message = line.rstrip("\n")
        if message.strip() == "/reset":
            session.reset()
            print("(the conversation starts over)", file=sys.stderr)
            continue
        if message.startswith("/") and " " not in message.strip():
            print(f"unknown command {message.strip()}: {HELP}", file=sys.stderr)
            continue
        dropped = session.dropped
        try:
            for piece in session.reply(message):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as error:  # a message too long for the context: say so, keep chatting
            print(f"error: {error}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if session.dropped > dropped:
            print(f"(dropped the {session.dropped - dropped} oldest exchange(s) to fit the model's context of "
                  f"{session.context} tokens)", file=sys.stderr)
