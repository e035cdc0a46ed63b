"""`andromeda plan`: parameters, FLOPs and per-GPU memory of a training run, nothing allocated."""

from __future__ import annotations

import argparse

from ..config import PRESETS, Config
from ..plan import format_plan, plan

HELP = "parameters, FLOPs and per-GPU memory of a training run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--seq-len", type=int, help="default: the preset's max_seq_len")
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU per micro-step")


def run(args: argparse.Namespace) -> int:
    config = Config.from_preset(args.preset)
    print(format_plan(plan(config, gpus=args.gpus, seq_len=args.seq_len, batch=args.batch)))
    return 0
