"""`andromeda lm-eval`: score a checkpoint with EleutherAI's lm-evaluation-harness."""

from __future__ import annotations

import argparse


def _limit(text: str) -> int | float:
    """--limit N (examples) or a fraction below 1."""
    return float(text) if "." in text else int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder or exported HF folder")
    parser.add_argument("--tasks", required=True, help="task names, comma-separated")
    parser.add_argument("--include-path", nargs="+", help="folders of task YAMLs (e.g. local tasks)")
    parser.add_argument("--limit", type=_limit, help="examples per task (a fraction if it has a decimal point)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", help="write the harness's results as JSON here")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lora", metavar="DIR",
                        help="apply a LoRA adapter trained on --checkpoint: a LoRA run, one of its checkpoints "
                             "(train --lora-rank) or a peft adapter folder")


def run(args: argparse.Namespace) -> int:
    from ..interop.lm_eval import format_table, run_lm_eval  # ImportError names the extra

    results = run_lm_eval(args.checkpoint, args.tasks, include_path=args.include_path, limit=args.limit,
                          num_fewshot=args.num_fewshot, batch_size=args.batch_size, output=args.output,
                          device=args.device, lora=args.lora)
    print(format_table(results))
    return 0
