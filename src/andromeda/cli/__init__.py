"""The `andromeda` command.

A thin layer: each subcommand is a module here with `add_arguments(parser)` and `run(args)`,
turning its arguments into a call of the library and printing the result.

    andromeda train --preset demo --out runs/demo --time-budget 480
    torchrun --standalone --nproc_per_node 2 -m andromeda train --parallel ddp --preset demo --out runs/ddp ...
    andromeda eval --checkpoint runs/demo --seq-len 256 1024 --json
    andromeda generate --checkpoint runs/demo --prompt "ROMEO:" --max-new-tokens 200
    andromeda quantize --checkpoint runs/demo --out runs/demo-int8 --scheme int8
    andromeda plan --preset 7b --gpus 8 --seq-len 8192 --batch 1
    andromeda plan --config run.toml --gpus 8      # the run `andromeda train --config run.toml` starts

`--checkpoint` takes a checkpoint folder or a run folder (meaning its latest checkpoint). Logs go
to stderr; stdout carries only the command's output (text, a table or JSON). Under torchrun, rank 0
speaks for the run; the other processes only report warnings and errors, prefixed by their rank.
Exit codes: 0 done, 1 an error (the message names the problem), 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from ..pause import pause_point

logger = logging.getLogger("andromeda")

# Subcommand name -> module in this package. Modules import their heavy or optional
# dependencies only when run, so `andromeda --help` works with the core install alone.
COMMANDS = {
    "train": "train",
    "eval": "eval",
    "generate": "generate",
    "serve": "serve",
    "plan": "plan",
    "export-hf": "export_hf",
    "import-hf": "import_hf",
    "lm-eval": "lm_eval",
    "tokenize": "tokenize",
    "quantize": "quantize",
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser = argparse.ArgumentParser(prog="andromeda", description="Train, evaluate and run Andromeda, a long-context language model.")
    commands = parser.add_subparsers(dest="command", required=True)
    # Descriptions keep their line breaks (examples, JSON shapes); option help is still wrapped.
    add = functools.partial(commands.add_parser, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        sub = add(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Loading the commands imports PyTorch: seconds in which a Ctrl-C deserves a plain exit.
        pause_point("startup")
        parser = build_parser()
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

