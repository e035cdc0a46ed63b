"""`andromeda generate`: stream a continuation of a prompt, past max_seq_len with a sliding window.

The prompt comes from --prompt, a file (--prompt-file) or stdin (`-`). Stop strings are cut as the
server cuts them (`serve.detokenizer.TextStream`): the text stops right before the first one, which
is never printed, even when it spans tokens. -n N prints N samples of the same prompt, sample i
drawn with seed + i as the server's choices are.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .common import add_inference_arguments, load_from_args

STDIN = "-"  # --prompt - and --prompt-file - read the prompt from stdin
COMPILING = ("compiling the decode step with torch.compile (--compile): the first tokens take a while "
             "(tens of seconds), the rest come faster")

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, run folder, quantized checkpoint or Hugging Face export "
                             "(`andromeda export-hf`)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="", help="text to continue (default: a new document); - reads stdin")
    source.add_argument("--prompt-file", metavar="FILE",
                        help="read the prompt from FILE (UTF-8; - is stdin); one trailing newline is dropped, "
                             "as editors and echo add one")
    parser.add_argument("-n", "--num-samples", type=_positive_int, default=1, metavar="N",
                        help="print N samples of the prompt, each after a '=== sample i/N (seed S) ===' line; "
                             "sample i uses seed + i (default 1, printed without the line)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the text right before TEXT, which is not printed (even across tokens); "
                             "repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="below 1e-5 (0 included) = greedy, as in vLLM (default 1.0)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                        help="OpenAI's, in [-2, 2]: subtract F x (times a token was generated so far) from its "
                             "logit (default 0)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                        help="OpenAI's, in [-2, 2]: subtract P from the logit of every token generated so far "
                             "(default 0)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="CTRL's, as in Hugging Face, > 0: divide the positive logits (multiply the negative "
                             "ones) of tokens in the prompt or the output by R (default 1: none)")
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
    import torch

    from ..checkpoint import load_checkpoint_tokenizer, open_model_source
    from ..inference.generate import stream_text
    from ..parallel.environment import resolve_device
    from ..serve.detokenizer import TextStream

    prompt = _prompt(args)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                    repetition_penalty=args.repetition_penalty)
    _check_sampling(sampling)
    source = open_model_source(args.checkpoint, verify=args.verify)
    device = resolve_device(args.device)
    net = load_from_args(source, args, device)
    tokenizer = load_checkpoint_tokenizer(source, verify=args.verify)
    if args.compile:  # before the first compile, which takes a while
        logger.info(COMPILING)
    for i in range(args.num_samples):
        seed = args.seed + i
        generator = torch.Generator(device=device).manual_seed(seed)
        decoder = TextStream(tokenizer, args.stop)
        pieces = stream_text(net, tokenizer, prompt, args.max_new_tokens, decoder=decoder, generator=generator,
                             window=args.window, sink_tokens=args.sink_tokens, compile=args.compile, **sampling)
        header = f"=== sample {i + 1}/{args.num_samples} (seed {seed}) ===\n" if args.num_samples > 1 else ""
        _print_sample(header + prompt, pieces)
    return 0


def _print_sample(head: str, pieces) -> None:
    """Print `head`, then the pieces as they come, then a newline."""
    first = next(pieces, "")  # arguments are checked before anything is printed
    sys.stdout.write(head + first)
    sys.stdout.flush()
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _check_sampling(sampling: dict) -> None:
    """Name a bad sampling value by its flag, before the model loads."""
    from ..inference.sampling import SamplingParams

    try:
        SamplingParams(**sampling)
    except ValueError as error:  # "top_k must be ...": the message opens with the field's name
        field = str(error).partition(" ")[0]
        raise ValueError(f"--{field.replace('_', '-')}: {error}") from None


def _prompt(args: argparse.Namespace) -> str:
    """The prompt: --prompt's text, or a file's or stdin's (one trailing newline dropped)."""
    source = args.prompt_file if args.prompt_file is not None else args.prompt if args.prompt == STDIN else None
    if source is None:
        return args.prompt
    name = "stdin" if source == STDIN else source
    try:
        data = sys.stdin.buffer.read() if source == STDIN else Path(source).read_bytes()
    except OSError as error:
        raise OSError(f"cannot read the prompt from {name}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"the prompt in {name} is not UTF-8 text ({error})") from None
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
