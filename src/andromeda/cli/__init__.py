"""The `andromeda` command.

A thin layer: each subcommand is a module here with `add_arguments(parser)` and `run(args)`,
turning its arguments into a call of the library and printing the result.

    andromeda train --preset demo --out runs/demo --time-budget 480
    torchrun --standalone --nproc_per_node 2 -m andromeda train --parallel ddp --preset demo --out runs/ddp ...
    andromeda eval --checkpoint runs/demo --seq-len 256 1024 --json
    andromeda generate --checkpoint runs/demo --prompt "ROMEO:" --max-new-tokens 200
    andromeda quantize --checkpoint runs/demo --out runs/demo-int8 --scheme int8
    andromeda train --init-from runs/demo --lora-rank 16 --out runs/lora --data chat.jsonl --max-steps 500
    andromeda merge-lora --checkpoint runs/demo --lora runs/lora --out runs/demo-lora
    andromeda plan --preset 7b --gpus 8 --seq-len 8192 --batch 1
    andromeda plan --config run.toml --gpus 8      # the run `andromeda train --config run.toml` starts

`--checkpoint` takes a checkpoint folder, a run folder (meaning its latest checkpoint), a quantized
checkpoint or a Hugging Face export (`andromeda export-hf`; training takes it as --init-from). Logs go
to stderr; stdout carries only the command's output (text, a table or JSON). Under torchrun, rank 0
speaks for the run; the other processes only report warnings and errors, prefixed by their rank.
Exit codes: 0 done, 1 an error (the message names the problem), 2 bad arguments, 130 interrupted.

`andromeda --help` and `andromeda COMMAND --help` answer without loading PyTorch: the commands are
listed from a table, only the chosen command's module is imported, and no command module imports
PyTorch before its `run` (their option choices come from `andromeda.choices`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
from collections.abc import MutableMapping, Sequence

from ..pause import pause_point  # the test hooks are read here, at the application's edge

logger = logging.getLogger("andromeda")

# Subcommand -> (its module in this package, its one-line help). Each module has
# `add_arguments(parser)` and `run(args)`, and imports its heavy or optional dependencies only in
# `run`, so `andromeda --help` works with the core install alone.
COMMANDS = {
    "train": ("train", "train a model"),
    "eval": ("eval", "loss, perplexity and bits per byte on held-out text"),
    "generate": ("generate", "stream a continuation of a prompt"),
    "chat": ("chat", "a multi-turn conversation in the terminal, with the checkpoint's chat template"),
    "serve": ("serve", "serve a checkpoint over an OpenAI-compatible HTTP API"),
    "plan": ("plan", "parameters, FLOPs and per-GPU memory of a training run"),
    "export-hf": ("export_hf", "write a checkpoint as a Hugging Face transformers folder (trust_remote_code)"),
    "import-hf": ("import_hf", "turn a Hugging Face folder written by export-hf back into a checkpoint"),
    "lm-eval": ("lm_eval", "score a checkpoint on lm-evaluation-harness tasks (needs the eval extra)"),
    "tokenize": ("tokenize", "tokenise a corpus into the token cache ahead of training (what a cluster runs once "
                             "on a CPU node)"),
    "quantize": ("quantize", "write a weight-only int8 or int4 quantized copy of a checkpoint"),
    "merge-lora": ("merge_lora", "write a checkpoint with a LoRA adapter merged into its weights"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `andromeda` parser: every command with its one-line help, and the options of `command`,
    whose module alone is imported (argparse parses only the command named, so the others need
    none)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser = argparse.ArgumentParser(prog="andromeda", description="Train, evaluate and run Andromeda, a long-context language model.")
    commands = parser.add_subparsers(dest="command", required=True)
    # Descriptions keep their line breaks (examples, JSON shapes); option help is still wrapped.
    add = functools.partial(commands.add_parser, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            add(name, help=help_text)
            continue
        module = importlib.import_module(f"{__name__}.{module_name}")
        sub = add(name, help=help_text, description=getattr(module, "DESCRIPTION", help_text))
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def command_named(argv: Sequence[str]) -> str | None:
    """The command `argv` names: its first word that is not an option (the top level has none
    but --help)."""
    return next((word for word in argv if not word.startswith("-")), None)


# PyTorch's CPU allocator backs each allocation of 2 MiB or more with transparent huge pages when
# THP_MEM_ALLOC_ENABLE=1 is in its environment at its first allocation (it reads the variable once,
# then). Without it every fresh activation, logits chunk or gradient buffer is page-faulted in
# 4 KiB at a time (glibc hands blocks over 32 MiB back to Linux on free, so that is every step):
# a bf16 training step of the dim-512 benchmark model at one thread went from 3.58 s to 3.23 s
# eager and 2.88 s to 2.70 s compiled (`benchmarks/bench_train.py`, Intel Xeon with AMX).
THP_ALLOCATIONS = "THP_MEM_ALLOC_ENABLE"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def allocate_with_huge_pages(environ: MutableMapping[str, str]) -> bool:
    """Set THP_MEM_ALLOC_ENABLE=1 in `environ` (the process's, before PyTorch allocates) where
    Linux offers transparent huge pages, unless the variable is already set (=0 opts out).
    Returns whether huge-page allocations are asked for."""
    try:
        with open(THP_SETTING) as setting:
            offered = "[never]" not in setting.read()
    except OSError:  # not Linux, or a kernel without transparent huge pages
        offered = False
    if offered:
        environ.setdefault(THP_ALLOCATIONS, "1")
    return offered and environ[THP_ALLOCATIONS] == "1"


def entry() -> int:
    """The `andromeda` executable (its console script and `python -m andromeda`): `main` in a
    process of its own, whose CPU allocations of 2 MiB or more take huge pages
    (`allocate_with_huge_pages`; no command has imported PyTorch yet). `main` itself leaves the
    environment alone, for callers that run commands inside their own process."""
    allocate_with_huge_pages(os.environ)
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # The command's module may load optional dependencies: a Ctrl-C then deserves a plain exit.
        pause_point("startup")
        parser = build_parser(command_named(argv))
    except KeyboardInterrupt:
        print("andromeda: interrupted", file=sys.stderr)
        return 130
    try:
        args = parser.parse_args(argv)
        if hasattr(args, "check_arguments"):  # what argparse cannot check alone (e.g. with a --config file)
            args.check_arguments(args)
    except SystemExit as exit_:  # bad arguments (2) or --help (0): argparse has printed why
        return int(exit_.code or 0)
    rank = int(os.environ.get("RANK", "0") or 0)  # torchrun's; see parallel.environment
    if not logging.getLogger().handlers:
        logging.basicConfig(format=f"[rank {rank}] %(message)s" if rank else "%(message)s", stream=sys.stderr)
    logger.setLevel(logging.WARNING if args.quiet or rank else logging.INFO)
    try:
        return args.run(args)
    except KeyboardInterrupt as interrupt:
        print(f"andromeda {args.command}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        # Expected failures (bad input, missing files, a diverged run) carry messages that name
        # the problem; a traceback would bury them.
        print(f"andromeda {args.command}: error: {error}", file=sys.stderr)
        return 1

