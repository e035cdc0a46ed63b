"""The `andromeda` command: train, eval, generate, plan.

A thin layer: each subcommand turns its arguments into a call of the library (`train(TrainConfig)`,
`evaluate`, `generation.stream_text`, `plan.plan`) and prints the result. `train`'s options are
generated from `TrainConfig`'s fields, so the two cannot drift apart.

    andromeda train --preset demo --out runs/demo --time-budget 480
    torchrun --standalone --nproc_per_node 2 -m andromeda train --parallel ddp --preset demo --out runs/ddp ...
    andromeda eval --checkpoint runs/demo --seq-len 256 1024 --json
    andromeda generate --checkpoint runs/demo --prompt "ROMEO:" --max-new-tokens 200
    andromeda plan --preset 7b --gpus 8 --seq-len 8192 --batch 1

`--checkpoint` takes a checkpoint folder or a run folder (meaning its latest checkpoint). Logs go
to stderr; stdout carries only the command's output (text, a table or JSON). Under torchrun, rank 0
speaks for the run; the other processes only report warnings and errors, prefixed by their rank.
Exit codes: 0 done, 1 an error (the message names the problem), 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .checkpoint import latest_checkpoint, load_checkpoint_tokenizer, load_pretrained, load_train_config, resolve_checkpoint
from .config import PRESETS, Config
from .data import TokenStore, cache_root, resolve_data, shakespeare_corpus
from .distributed import launched_rank
from .evaluation import evaluate
from .training import TrainConfig, resolve_device, train

logger = logging.getLogger("andromeda")

TRAIN_HELP: dict[str, str] = {
    "out": "run folder: checkpoints/, latest, metrics.jsonl, loss.png",
    "preset": f"model preset: {', '.join(PRESETS)}",
    "data": "training files, folders or globs of .txt/.jsonl (default: Shakespeare's train split)",
    "eval_data": "held-out files for periodic evaluation (default: Shakespeare's held-out plays "
                 "when --data is not given)",
    "tokenizer": "byte, bpe (trained on --data, saved with the run) or a tokenizer.json path",
    "bpe_vocab_size": "vocabulary size of a trained BPE",
    "seed": "seed of the initialisation and of the data order",
    "batch_size": "sequences per optimizer step (over all accumulation micro-steps)",
    "seq_len": "tokens per training sequence (at most the model's max_seq_len)",
    "grad_accum": "gradient-accumulation micro-steps per optimizer step (must divide --batch-size)",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW decoupled weight decay (linear weights only)",
    "qk_scale_lr_mult": "learning-rate multiplier of the QK-norm scales (the attention temperature)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "max global gradient norm (0: no clipping)",
    "max_steps": "optimizer steps: the learning-rate schedule's length",
    "time_budget": "stop after this many seconds; without --max-steps the schedule's length is "
                   "set from the speed measured over the first steps, so the run ends decayed",
    "save_every": "checkpoint every N steps (and at the end)",
    "keep": "checkpoints to keep",
    "eval_every": "held-out evaluation every N steps",
    "eval_batches": "held-out batches per evaluation (0: none)",
    "log_every": "log a metrics line every N steps",
    "bf16": "bfloat16 compute: autocast, or with --parallel fsdp bf16 gathered weights (the shards, the "
            "gradient reduction and the optimizer stay fp32)",
    "activation_checkpointing": "recompute each block's activations in backward to save memory",
    "parallel": "how the processes torchrun starts share the work: ddp (replicas) or fsdp (sharded "
                "weights, gradients and optimizer state); ignored by a single process",
    "dist_timeout": "seconds a process waits for the others in a collective before failing",
    "device": "auto, cpu, cuda or cuda:N",
    "resume": "continue the run in --out from its latest checkpoint (settings not given are the run's)",
    "cache_dir": "corpus and token cache folder (default $ANDROMEDA_CACHE or ~/.cache/andromeda)",
}


# --------------------------------------------------------------------------- parsers


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, typed from its annotation; options not given stay absent
    from the namespace (argparse.SUPPRESS), so --resume can tell them from defaults."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        if f.name in ("model_overrides", "progress"):
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kinds = {a for a in typing.get_args(hint) if a is not type(None)} or {hint}
        default = defaults[f.name]
        help_text = TRAIN_HELP[f.name] + ("" if default in (None, False) or f.name == "out" else f" (default {default})")
        common = dict(default=argparse.SUPPRESS, help=help_text, dest=f.name)
        if hint is bool:
            parser.add_argument(flag, action="store_true", **common)
        elif any(typing.get_origin(k) is tuple for k in kinds):
            parser.add_argument(flag, nargs="+", metavar="PATH", **common)
        else:
            kind = next(iter(kinds))
            parser.add_argument(flag, type=kind, required=f.name == "out", metavar=f.name.upper(), **common)
    parser.add_argument("--override", nargs="+", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                        help="model Config fields over the preset, e.g. --override depth=4 max_seq_len=512")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                        help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser = argparse.ArgumentParser(prog="andromeda", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(commands.add_parser, parents=[common])

    train_parser = add("train", help="train a model", description="Train (or resume) a model.")
    _add_train_options(train_parser)

    eval_parser = add("eval", help="loss, perplexity and bits per byte on held-out text")
    eval_parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    eval_parser.add_argument("--data", nargs="+", metavar="PATH",
                             help="files, folders or globs (default: Shakespeare's held-out plays)")
    eval_parser.add_argument("--seq-len", nargs="+", type=int, metavar="N",
                             help="window lengths; several show length extrapolation (default: the training seq_len)")
    eval_parser.add_argument("--batch-size", type=int, default=8)
    eval_parser.add_argument("--max-windows", type=int, help="score only N evenly spread windows (an estimate)")
    eval_parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    eval_parser.add_argument("--device", default="auto")
    eval_parser.add_argument("--cache-dir", help="corpus and token cache folder")
    eval_parser.add_argument("--json", action="store_true", help="print one JSON object (see evaluate_command)")

    gen_parser = add("generate", help="stream a continuation of a prompt")
    gen_parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    gen_parser.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    gen_parser.add_argument("--max-new-tokens", type=int, default=256)
    gen_parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen_parser.add_argument("--top-k", type=int)
    gen_parser.add_argument("--top-p", type=float)
    gen_parser.add_argument("--min-p", type=float)
    gen_parser.add_argument("--seed", type=int, default=0)
    gen_parser.add_argument("--device", default="auto")

    plan_parser = add("plan", help="parameters, FLOPs and per-GPU memory of a training run")
    plan_parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    plan_parser.add_argument("--gpus", type=int, default=1)
    plan_parser.add_argument("--seq-len", type=int, help="default: the preset's max_seq_len")
    plan_parser.add_argument("--batch", type=int, default=1, help="sequences per GPU per micro-step")
    return parser


# --------------------------------------------------------------------------- commands


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
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
    """The TrainConfig of `andromeda train`: the given options over the defaults, or with
    --resume over the run's saved settings."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if hasattr(args, "override"):
        given["model_overrides"] = _parse_overrides(args.override)
    if not given.get("resume"):
        return TrainConfig(**given)
    checkpoint = latest_checkpoint(args.out)
    if checkpoint is None:
        raise FileNotFoundError(f"nothing to resume: {args.out} has no checkpoint; start without --resume")
    saved = load_train_config(checkpoint)
    if saved is None:
        raise ValueError(f"{checkpoint} holds no train_config.json: it is not a training checkpoint")
    return TrainConfig.from_dict({**saved, **given})


def train_command(args: argparse.Namespace) -> int:
    result = train(train_config_from_args(args))
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


def evaluate_command(args: argparse.Namespace) -> int:
    """Print a table, or with --json one object:
    {"checkpoint", "files", "corpus_tokens", "corpus_bytes", "seq_len", "loss", "perplexity", "bits_per_byte",
     "results": {"<seq_len>": {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}, ...}}
    where the top-level numbers are those of the first --seq-len."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = load_pretrained(checkpoint, device=device)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    if args.data is None:
        files = resolve_data([shakespeare_corpus(args.cache_dir) / "heldout"])
    else:
        files = resolve_data(args.data)
    cache = Path(args.cache_dir) / "tokens" if args.cache_dir else cache_root() / "tokens"
    store = TokenStore(files, tokenizer, cache_dir=cache)
    seq_lens = args.seq_len or [_trained_seq_len(checkpoint, model.config)]
    for seq_len in seq_lens:
        if not 1 <= seq_len <= model.config.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} is outside 1..{model.config.max_seq_len} (the model's "
                             f"max_seq_len)")
    autocast = torch.bfloat16 if args.bf16 else None
    results = {
        str(n): evaluate(model, store.tokens, n, args.batch_size, store.num_bytes, max_windows=args.max_windows,
                         autocast_dtype=autocast)
        for n in seq_lens
    }
    first = results[str(seq_lens[0])]
    if args.json:
        print(json.dumps({
            "checkpoint": str(checkpoint), "files": [str(f) for f in files], "corpus_tokens": len(store),
            "corpus_bytes": store.num_bytes, "seq_len": seq_lens[0], "loss": first["loss"],
            "perplexity": first["perplexity"], "bits_per_byte": first["bits_per_byte"], "results": results,
        }, indent=2))
        return 0
    print(f"checkpoint {checkpoint} ({model.num_parameters():,} parameters, tokenizer {tokenizer.name})")
    print(f"data       {len(files)} files, {len(store):,} tokens, {store.num_bytes:,} bytes")
    print(f"{'seq_len':>8} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}")
    for n, r in results.items():
        print(f"{n:>8} {r['loss']:>8.4f} {r['perplexity']:>11.3f} {r['bits_per_byte']:>10.4f}")
    return 0


def _trained_seq_len(checkpoint: Path, config: Config) -> int:
    saved = load_train_config(checkpoint)
    return int(saved["seq_len"]) if saved and "seq_len" in saved else config.max_seq_len


def generate_command(args: argparse.Namespace) -> int:
    from .generation import stream_text

    device = resolve_device(args.device)
    model = load_pretrained(args.checkpoint, device=device)
    tokenizer = load_checkpoint_tokenizer(args.checkpoint)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pieces = stream_text(model.Andromeda, tokenizer, args.prompt, args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                         generator=generator)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from .plan import format_plan, plan

    config = Config.from_preset(args.preset)
    print(format_plan(plan(config, gpus=args.gpus, seq_len=args.seq_len, batch=args.batch)))
    return 0


COMMANDS = {"train": train_command, "eval": evaluate_command, "generate": generate_command, "plan": plan_command}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # bad arguments (2) or --help (0): argparse has printed why
        return int(exit_.code or 0)
    rank = launched_rank()
    if not logging.getLogger().handlers:
        logging.basicConfig(format=f"[rank {rank}] %(message)s" if rank else "%(message)s", stream=sys.stderr)
    logger.setLevel(logging.WARNING if args.quiet or rank else logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as interrupt:
        print(f"andromeda {args.command}: {interrupt or 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        # Expected failures (bad input, missing files, a diverged run) carry messages that name
        # the problem; a traceback would bury them.
        print(f"andromeda {args.command}: error: {error}", file=sys.stderr)
        return 1
