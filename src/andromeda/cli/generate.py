"""`andromeda generate`: stream a continuation of a prompt, past max_seq_len with a sliding window.

The prompt comes from --prompt, a file (--prompt-file) or stdin (`-`). Stop strings are cut as the
server cuts them (`serve.detokenizer.TextStream`): the text stops right before the first one, which
is never printed, even when it spans tokens. -n N prints N samples of the same prompt, sample i
drawn with seed + i as the server's choices are.

--speculative ngram|draft decodes speculatively (`inference.speculative`): prompt lookup, or a
draft checkpoint (--draft-checkpoint) with the same tokenizer, proposes --num-speculative-tokens
tokens that one forward of the model checks. Greedy output is the same text; sampled output has
the same distribution (other draws for a given seed). The acceptance rate and tokens/s go to
stderr at the end of each sample.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ..choices import KV_CACHE_DTYPES, MAX_SPECULATIVE_TOKENS
from .common import add_inference_arguments, load_from_args

STDIN = "-"  # --prompt - and --prompt-file - read the prompt from stdin
SPECULATIVE_METHODS = ("ngram", "draft")
DEFAULT_SPECULATIVE_TOKENS = 4
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
    parser.add_argument("--speculative", choices=SPECULATIVE_METHODS,
                        help="speculative decoding: ngram proposes the continuation of the latest earlier match of "
                             "the last tokens in prompt + output (prompt lookup), draft the tokens of a smaller model "
                             "(--draft-checkpoint); one forward of the model checks them. Same greedy text, same "
                             "sampling distribution; acceptance and tokens/s on stderr")
    parser.add_argument("--draft-checkpoint", metavar="DIR",
                        help="the draft model of --speculative draft: a smaller checkpoint with the same tokenizer "
                             "(full precision: --quantize applies to --checkpoint only; --dtype to both)")
    parser.add_argument("--num-speculative-tokens", type=int, metavar="K",
                        help=f"tokens proposed per step, 1..{MAX_SPECULATIVE_TOKENS} (default "
                             f"{DEFAULT_SPECULATIVE_TOKENS}); fewer, or none for a while, where few are accepted")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="what the KV cache stores: auto (the weights' dtype) or int8 (a scale per token and "
                             "head: half the memory of bf16, slower to read; default auto)")
    constrained = parser.add_mutually_exclusive_group()
    constrained.add_argument("--json-schema", metavar="FILE",
                             help="the output is JSON valid against this JSON schema (compact, no whitespace between "
                                  "tokens); needs the structured extra")
    constrained.add_argument("--regex", metavar="PATTERN",
                             help="the output is text this regular expression matches as a whole (Rust regex "
                                  "syntax); needs the structured extra")
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
    _check_speculation(args)
    constraint = _constraint(args)
    source = open_model_source(args.checkpoint, verify=args.verify)
    draft_source = _draft_source(source, args) if args.speculative == "draft" else None
    device = resolve_device(args.device)
    net = load_from_args(source, args, device)
    tokenizer = load_checkpoint_tokenizer(source, verify=args.verify)
    draft = None
    if draft_source is not None:
        from ..checkpoint import load_for_inference

        draft = load_for_inference(draft_source, device=device, dtype=args.dtype, verify=args.verify)
    if args.compile:  # before the first compile, which takes a while
        from ..inference.bf16_linear import use_bf16_rows
        from ..inference.packed import unpack

        # Inductor cannot lower prepacked Linears (row-tiled ones compile; quantized ones without their
        # kernels are refused): bf16 ones read by the rows kernel where it runs, else plain
        use_bf16_rows(unpack(net, row_tiles=False))
        logger.info(COMPILING)
    for i in range(args.num_samples):
        seed = args.seed + i
        generator = torch.Generator(device=device).manual_seed(seed)
        decoder = TextStream(tokenizer, args.stop)
        if args.speculative:
            pieces = _speculative_text(net, draft, tokenizer, prompt, args, decoder, generator, sampling)
        else:
            pieces = stream_text(net, tokenizer, prompt, args.max_new_tokens, decoder=decoder, generator=generator,
                                 constraint=constraint, kv_cache_dtype=args.kv_cache_dtype,
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


def _check_speculation(args: argparse.Namespace) -> None:
    """Refuse, before anything loads, the speculative options that do not go together."""
    if args.speculative is None:
        for flag, value in (("--draft-checkpoint", args.draft_checkpoint),
                            ("--num-speculative-tokens", args.num_speculative_tokens)):
            if value is not None:
                raise ValueError(f"{flag} is an option of speculative decoding; add --speculative "
                                 f"{'draft' if flag == '--draft-checkpoint' else 'ngram or --speculative draft'}")
        return
    k = args.num_speculative_tokens
    if k is None:
        args.num_speculative_tokens = DEFAULT_SPECULATIVE_TOKENS
    elif not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"--num-speculative-tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {k}")
    if args.speculative == "draft" and args.draft_checkpoint is None:
        raise ValueError("--speculative draft needs --draft-checkpoint DIR (a smaller model with the same tokenizer)")
    if args.speculative == "ngram" and args.draft_checkpoint is not None:
        raise ValueError("--draft-checkpoint goes with --speculative draft, not --speculative ngram")
    unsupported = [flag for flag, given in (("--window", args.window is not None), ("--sink-tokens", args.sink_tokens),
                                            ("--compile", args.compile), ("--json-schema", args.json_schema),
                                            ("--regex", args.regex)) if given]
    if unsupported:
        raise ValueError(f"--speculative does not support {' or '.join(unsupported)}: speculative decoding keeps "
                         f"every token in view (no sliding window) and runs the eager forward; drop "
                         f"{'them' if len(unsupported) > 1 else 'it'} or --speculative")


def _constraint(args: argparse.Namespace):
    """The `OutputConstraint` of --json-schema or --regex (checked now, before anything loads), or None."""
    if args.json_schema is None and args.regex is None:
        return None
    from ..inference.structured import OutputConstraint, validate_constraint

    flag = "--json-schema" if args.json_schema is not None else "--regex"
    try:
        if args.json_schema is not None:
            try:
                text = Path(args.json_schema).read_text()
            except OSError as error:
                raise OSError(f"--json-schema: cannot read {args.json_schema}: {error.strerror or error}") from None
            constraint = OutputConstraint.json_schema(text)
        else:
            constraint = OutputConstraint.regex(args.regex)
        validate_constraint(constraint)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
    return constraint


def _draft_source(source, args: argparse.Namespace):
    """The draft checkpoint's `ModelSource`: full precision, the model's vocabulary and tokenizer."""
    from ..checkpoint import open_draft_source

    return open_draft_source(args.draft_checkpoint, source, verify=args.verify)


def _speculative_text(net, draft, tokenizer, prompt: str, args: argparse.Namespace, decoder, generator, sampling):
    """`stream_text` by speculative decoding: the pieces of the text, then the statistics on stderr."""
    from ..inference.speculative import SpeculationStats, speculative_stream

    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)  # the prompt opens a document, as stream_text's
    stats = SpeculationStats()
    steps = speculative_stream(net, [ids], args.max_new_tokens, draft=draft, kv_cache_dtype=args.kv_cache_dtype,
                               num_speculative_tokens=args.num_speculative_tokens, eos_token=tokenizer.eos_id,
                               generator=generator, stats=stats, **sampling)
    start = time.perf_counter()
    for gained in steps:
        for token in gained[0]:
            if token == tokenizer.eos_id:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
            if decoder.stopped is not None:
                break
        if decoder.stopped is not None:
            break
    yield decoder.flush()
    seconds = time.perf_counter() - start
    logger.info("speculative decoding (%s, K=%d): %s; %.1f tokens/s", args.speculative, args.num_speculative_tokens,
                stats.describe(), stats.tokens / max(seconds, 1e-9))


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
