"""`andromeda train`: one option per TrainConfig field, typed from its annotation, with the
field's help text (and choices); or a file of those fields (--config), the options given
overriding it. TrainConfig imports no PyTorch, so `andromeda train --help` answers at once."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from ..train.config import TrainConfig, read_config_file

DESCRIPTION = """Train (or resume) a model.

--config FILE reads the run's settings from a TOML file (YAML with PyYAML installed) of the
fields below, spelled batch_size or batch-size; model Config fields go in a [model_overrides]
table. Options given on the command line override the file (--override per model field):

    preset = "tiny"
    data = ["corpus/*.txt"]
    seq_len = 512
    time_budget = 600
    [model_overrides]
    depth = 4
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options not given stay absent from the namespace (argparse.SUPPRESS), so --resume can tell
    them from defaults."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = {a for a in typing.get_args(hint) if a is not type(None)} if union else {hint}
        shown = f.default not in (None, False, MISSING)
        common = dict(default=argparse.SUPPRESS, dest=f.name,
                      help=f.metadata["help"] + (f" (default {_shown_default(f.default)})" if shown else ""))
        if "choices" in f.metadata:  # argparse lists them in --help and refuses others
            common["choices"] = f.metadata["choices"]
        if hint is bool:
            parser.add_argument(flag, action="store_true", **common)
        elif kinds == {bool}:  # on, off, or None: decided by the run (e.g. --bf16 on CUDA)
            parser.add_argument(flag, action="store_true", **common)
            parser.add_argument("--no-" + flag[2:], action="store_false", default=argparse.SUPPRESS, dest=f.name,
                                help=argparse.SUPPRESS)
        elif any(typing.get_origin(k) is tuple for k in kinds):
            parser.add_argument(flag, nargs="+", metavar=f.metadata.get("metavar", "PATH"), **common)
        else:  # a field without default (--out) may come from --config instead: see check_arguments
            shown_as = None if "choices" in common else f.name.upper()  # None: argparse shows {a,b}
            parser.add_argument(flag, type=next(iter(kinds)), metavar=shown_as, **common)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="a TOML or YAML file of the options above (TrainConfig fields); options given "
                             "here override it")
    parser.add_argument("--override", nargs="+", action="extend", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                        help="model Config fields over the preset (and the --config file's model_overrides), "
                             "e.g. --override depth=4 max_seq_len=512; repeatable")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                        help="no progress bar")
    parser.set_defaults(check_arguments=functools.partial(check_arguments, parser))


def _shown_default(value: Any) -> str:
    """A default as one types it: a tuple's items separated by spaces (--report-to none)."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit as argparse does (code 2) when a TrainConfig field without default (--out) is given
    neither on the command line nor in the --config file."""
    missing = [f.name for f in fields(TrainConfig) if f.default is MISSING and f.default_factory is MISSING
               and not hasattr(args, f.name)]
    if missing and hasattr(args, "config"):
        try:
            missing = [name for name in missing if name not in read_config_file(args.config)]
        except (ValueError, OSError, ImportError):
            return  # run() reports what is wrong with the file
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        parser.error(f"the following arguments are required: {flags} (or {', '.join(missing)} in the --config file)")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as JSON (4, 1e-5, true) or else kept as a string."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of `andromeda train`: the given options over the --config file over the
    defaults, or with --resume over the run's saved settings."""
    from ..checkpoint import latest_checkpoint, load_train_config

    given = read_config_file(args.config) if hasattr(args, "config") else {}
    given.update((f.name, getattr(args, f.name)) for f in fields(TrainConfig) if hasattr(args, f.name))
    if hasattr(args, "override"):
        given["model_overrides"] = {**given.get("model_overrides", {}), **parse_overrides(args.override)}
    if not given.get("resume"):
        return TrainConfig(**given)
    out = given.get("out")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        raise FileNotFoundError(f"nothing to resume: {out} has no checkpoint; start without --resume")
    saved = load_train_config(checkpoint)
    if saved is None:
        raise ValueError(f"{checkpoint} holds no train_config.json: it is not a training checkpoint")
    if given.get("init_from") is not None and given["init_from"] != saved.get("init_from"):
        began = f"started from {saved['init_from']}" if saved.get("init_from") else "started from scratch"
        raise ValueError(f"{out} is a run that {began}; --resume continues it from its own checkpoint: drop "
                         f"--init-from (or start a new run in another --out)")
    return TrainConfig.from_dict({**saved, **given})


def run(args: argparse.Namespace) -> int:
    import torch

    from ..parallel.environment import launched_rank, resolve_device
    from ..pause import pause_hook, tokenizer_pause
    from ..train import PREEMPTED_EXIT_CODE, Preempted, heap, train

    config = train_config_from_args(args)
    # The process is ours, so its globals are ours to set (a library call would not set them).
    after_step = None
    device = resolve_device(config.device)
    if device.type == "cuda":
        # fp32 matmuls may use TF32 tensor cores (bf16 autocast is the default on CUDA; this
        # covers what runs in fp32).
        torch.set_float32_matmul_precision("high")
    if config.keep_freed_memory and device.type != "cpu":
        print(f"andromeda train: --keep-freed-memory is for CPU runs; ignored on {device}", file=sys.stderr)
    elif config.keep_freed_memory and heap.keep_freed_memory():
        # Asked for: this process keeps freed memory for good; FreedMemory keeps it near its steady size.
        after_step = heap.FreedMemory().after_step
    try:
        # The test hooks (pause points) are read here, at the application's edge, and passed in.
        result = train(config, pause=pause_hook(), tokenizer_pause=tokenizer_pause(), after_step=after_step)
    except Preempted as stopped:
        print(f"andromeda train: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if launched_rank() != 0:
        return 0
    print(f"trained {result.step} steps in {result.elapsed_s:.0f}s ({result.stopped_by}); "
          f"checkpoint {result.checkpoint}")
    if result.train_loss is not None:
        print(f"train loss {result.train_loss:.4f}")
    if result.eval is not None:
        print(f"held-out loss {result.eval['loss']:.4f}, bits per byte {result.eval['bits_per_byte']:.4f} "
              f"(estimate on {result.eval['tokens']:,} tokens)")
    return 0
