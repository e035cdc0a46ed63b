"""`andromeda plan`: parameters, FLOPs and per-GPU memory of a training run, nothing allocated."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from ..choices import GIB, H100_BF16_TFLOPS, H100_GIB, SCHEMES
from ..config import PRESETS, Config
from ..train.config import LORA_TARGETS, TrainConfig, planned_model_config, read_config_file
from .train import parse_overrides

DESCRIPTION = """Parameters, FLOPs and per-GPU memory of a training run, nothing allocated.

Give a --preset, or the --config file `andromeda train --config` runs: then the plan is that run's
model (preset, model_overrides, vocabulary of its tokenizer), seq_len, sequences per GPU per
micro-step (batch_size / grad_accum / --gpus) and bf16 setting. Options given here override it.

--lora-rank R (or a --config file with lora_rank) prices a LoRA fine-tune instead, in one process:
the frozen base (bf16 Linears; int8 / int4 with --quantize, QLoRA), the fp32 adapters with their
AdamW state, and the activations.
"""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (e.g. 8), got {text!r}")
    return value


def positive_number(example: str, unit_scale: float = 1.0) -> Callable[[str], float]:
    """argparse type: a positive number (`example` shows one, with its unit) that stays finite
    once multiplied by `unit_scale` (GiB to bytes, TFLOP/s to FLOP/s)."""
    largest = sys.float_info.max / unit_scale

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0 < value <= largest):  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected a positive, finite number of at most {largest:.3g} "
                                             f"({example}), got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model preset (required without --config)")
    parser.add_argument("--config", metavar="FILE",
                        help="plan the run of this `train --config` file (TOML or YAML of TrainConfig fields)")
    parser.add_argument("--override", nargs="+", action="extend", metavar="KEY=VALUE",
                        help="model Config fields over the preset and the file's model_overrides, e.g. "
                             "--override depth=24 dim=2048; repeatable")
    parser.add_argument("--gpus", type=positive_int, default=1)
    parser.add_argument("--seq-len", type=positive_int,
                        help="default: the --config file's seq_len, else the preset's max_seq_len")
    parser.add_argument("--batch", type=positive_int,
                        help="sequences per GPU per micro-step (default: the --config file's batch_size / "
                             "grad_accum / --gpus, else 1)")
    parser.add_argument("--gpu-memory", type=positive_number(f"GiB, e.g. {H100_GIB:g}", GIB), default=H100_GIB,
                        metavar="GIB", help=f"memory of one GPU in GiB (default {H100_GIB:g}, an H100)")
    parser.add_argument("--peak-tflops", type=positive_number(f"TFLOP/s, e.g. {H100_BF16_TFLOPS:g}", 1e12),
                        default=H100_BF16_TFLOPS,
                        help=f"the GPU's dense bf16 peak for the throughput estimate (default "
                             f"{H100_BF16_TFLOPS:g}, an H100)")
    parser.add_argument("--lora-rank", type=positive_int, metavar="R",
                        help="price a LoRA fine-tune of this rank (train --lora-rank) instead of training every weight")
    parser.add_argument("--lora-targets", nargs="+", metavar="TARGET",
                        help=f"the layers LoRA adapts, among {', '.join(LORA_TARGETS)} (default: all)")
    parser.add_argument("--quantize", choices=SCHEMES, help="QLoRA: the frozen base in int8 or int4")


def run(args: argparse.Namespace) -> int:
    from ..plan import format_plan, plan

    overrides = parse_overrides(args.override or [])
    if args.config is not None:
        setup = _planned_run(args, overrides)
    elif args.preset is not None:
        unknown = sorted(set(overrides) - {f.name for f in fields(Config)})
        if unknown:
            raise ValueError(f"--override {unknown[0]}=...: {unknown[0]!r} is not a model Config field; the fields "
                             f"are {', '.join(sorted(f.name for f in fields(Config)))}")
        setup = dict(config=Config.from_preset(args.preset, **overrides), seq_len=args.seq_len, batch=args.batch or 1)
    else:
        raise ValueError("give --preset NAME or --config FILE (a train config) to plan")
    lora = setup.pop("lora", {})
    lora.update({key: value for key, value in (("rank", args.lora_rank), ("quantize", args.quantize)) if value})
    if args.lora_targets:
        lora["targets"] = tuple(t for item in args.lora_targets for t in item.split(",") if t)
    if lora:
        return _print_lora_plan(args, setup, lora)
    result = plan(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, **setup)
    print(format_plan(result, peak_tflops=args.peak_tflops))
    return 0


def _print_lora_plan(args: argparse.Namespace, setup: dict[str, Any], lora: dict[str, Any]) -> int:
    from ..plan import format_lora_plan, lora_plan

    if "rank" not in lora:
        raise ValueError("--lora-targets and --quantize price a LoRA fine-tune: give --lora-rank too")
    if args.gpus != 1:
        raise ValueError("a LoRA plan is per process (DDP replicas each hold the same): drop --gpus")
    setup.pop("activation_checkpointing", None)  # the table shows both
    print(format_lora_plan(lora_plan(gpu_memory_gib=args.gpu_memory, **setup, **lora)))
    return 0


def _planned_run(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """plan()'s arguments for the run of the --config file, the options given overriding it."""
    values = read_config_file(args.config)
    values["model_overrides"] = {**values.get("model_overrides", {}), **overrides}
    if args.preset is not None:
        values["preset"] = args.preset
    if args.seq_len is not None:
        values["seq_len"] = args.seq_len
    # The run folder and the stop change nothing in the plan, but a TrainConfig needs them.
    run = TrainConfig(**{"out": args.config, "max_steps": 1, **values})
    micro_step = run.batch_size // run.grad_accum  # sequences per micro-step over all GPUs
    if args.batch is None and micro_step % args.gpus:
        raise ValueError(f"{args.config}: batch_size {run.batch_size} / grad_accum {run.grad_accum} = {micro_step} "
                         f"sequences per micro-step do not split over {args.gpus} GPUs; choose --gpus that "
                         f"divides {micro_step}, or give --batch")
    lora = {} if run.lora_rank is None else dict(rank=run.lora_rank, targets=run.lora_targets, quantize=run.quantize,
                                                 dropout=run.lora_dropout > 0)
    return dict(config=planned_model_config(run), seq_len=run.seq_len, batch=args.batch or micro_step // args.gpus,
                dtype="fp32" if run.bf16 is False else "bf16",
                activation_checkpointing=True if run.activation_checkpointing else None, lora=lora)
