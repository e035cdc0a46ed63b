"""`andromeda plan`: parameters, FLOPs and per-GPU memory of a training run, nothing allocated."""

from __future__ import annotations

import argparse

from ..config import PRESETS, Config
from ..plan import H100_BF16_TFLOPS, H100_GIB, format_plan, plan

HELP = "parameters, FLOPs and per-GPU memory of a training run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--seq-len", type=int, help="default: the preset's max_seq_len")
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU per micro-step")
    parser.add_argument("--gpu-memory", type=float, default=H100_GIB, metavar="GIB",
                        help=f"memory of one GPU in GiB (default {H100_GIB:g}, an H100)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                        help=f"the GPU's dense bf16 peak for the throughput estimate (default {H100_BF16_TFLOPS:g}, an H100)")


def run(args: argparse.Namespace) -> int:
    config = Config.from_preset(args.preset)
    result = plan(config, gpus=args.gpus, seq_len=args.seq_len, batch=args.batch, gpu_memory_gib=args.gpu_memory)
    print(format_plan(result, peak_tflops=args.peak_tflops))
    return 0
