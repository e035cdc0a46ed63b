"""`andromeda eval`: loss, perplexity and bits per byte of checkpoints on held-out text, at one or
more evaluation lengths (past the training length too: how far the model reads), optionally
plotted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint_tokenizer, load_train_config, resolve_checkpoint
from ..config import Config
from ..model import Transformer
from ..data import TokenStore, cache_root, resolve_data, shakespeare_corpus
from ..evaluation import check_eval_length, check_plot_path, evaluate, plot_bits_per_byte
from ..parallel.environment import resolve_device
from .common import add_inference_arguments, load_for_inference

HELP = "loss, perplexity and bits per byte on held-out text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="PATH",
                        help="checkpoint folders or run folders (several: one line each in --plot)")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="files, folders or globs (default: Shakespeare's held-out plays)")
    parser.add_argument("--seq-len", nargs="+", type=int, metavar="N",
                        help="window lengths, past max_seq_len too unless the model has learned absolute "
                             "positions (default: the training seq_len)")
    parser.add_argument("--plot", metavar="FILE",
                        help="draw bits per byte against --seq-len, one line per checkpoint (.png, .svg, .pdf)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int, help="score only N evenly spread windows (an estimate)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against its manifest (SHA-256)")
    parser.add_argument("--cache-dir", help="corpus and token cache folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object (see `run`)")
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Print a table, or with --json one object per checkpoint:
    {"checkpoint", "files", "corpus_tokens", "corpus_bytes", "seq_len", "loss", "perplexity", "bits_per_byte",
     "results": {"<seq_len>": {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}, ...}}
    where the top-level numbers are those of the first --seq-len. With several checkpoints:
    {"checkpoints": [that object, one per checkpoint, in order, each with "train_seq_len" added]}."""
    plot = check_plot_path(args.plot) if args.plot else None
    for n in args.seq_len or []:
        if n < 1:
            raise ValueError(f"--seq-len {n} must be a positive number of tokens")
    device = resolve_device(args.device)
    reports = []
    for path in args.checkpoint:
        reports.append(_evaluate_checkpoint(path, args, device))
    if plot is not None:
        curves = [{"label": _label(Path(r["checkpoint"])), "train_seq_len": r["train_seq_len"],
                   "results": {n: v["bits_per_byte"] for n, v in r["results"].items()}} for r in reports]
        plot_bits_per_byte(curves, plot, title="held-out bits per byte by evaluation length")
    if args.json:
        if len(reports) == 1:
            reports[0].pop("train_seq_len")
            print(json.dumps(reports[0], indent=2))
        else:
            print(json.dumps({"checkpoints": reports}, indent=2))
        return 0
    for report in reports:
        print(f"checkpoint {report['checkpoint']} ({report['parameters']:,} parameters, tokenizer "
              f"{report['tokenizer']}, trained at {report['train_seq_len']} tokens)")
        print(f"data       {len(report['files'])} files, {report['corpus_tokens']:,} tokens, "
              f"{report['corpus_bytes']:,} bytes")
        print(f"{'seq_len':>8} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}")
        for n, r in report["results"].items():
            print(f"{n:>8} {r['loss']:>8.4f} {r['perplexity']:>11.3f} {r['bits_per_byte']:>10.4f}")
    if plot is not None:
        print(f"plot       {plot}")
    return 0


def _evaluate_checkpoint(path: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One checkpoint's JSON object (see `run`), with "parameters", "tokenizer" for the table."""
    checkpoint = resolve_checkpoint(path)
    net = load_for_inference(str(checkpoint), args, device, verify=args.verify, decoding=False)
    trained = _trained_seq_len(checkpoint, net.config)
    seq_lens = args.seq_len or [trained]
    for seq_len in seq_lens:
        try:
            check_eval_length(seq_len, net.config)
        except ValueError:
            raise ValueError(f"--seq-len {seq_len} is outside 1..{net.config.max_seq_len} (the model's max_seq_len); "
                             f"{checkpoint} has learned absolute positions (use_abs_pos_emb), which end "
                             f"there") from None
    tokenizer = load_checkpoint_tokenizer(checkpoint, verify=args.verify)
    if args.data is None:
        files = resolve_data([shakespeare_corpus(args.cache_dir) / "heldout"])
    else:
        files = resolve_data(args.data)
    cache = Path(args.cache_dir) / "tokens" if args.cache_dir else cache_root() / "tokens"
    store = TokenStore(files, tokenizer, cache_dir=cache)
    autocast = torch.bfloat16 if args.bf16 else None
    results = {
        str(n): evaluate(net, store.tokens, n, args.batch_size, store.num_bytes, max_windows=args.max_windows,
                         autocast_dtype=autocast)
        for n in seq_lens
    }
    first = results[str(seq_lens[0])]
    report = {
        "checkpoint": str(checkpoint), "files": [str(f) for f in files], "corpus_tokens": len(store),
        "corpus_bytes": store.num_bytes, "seq_len": seq_lens[0], "loss": first["loss"],
        "perplexity": first["perplexity"], "bits_per_byte": first["bits_per_byte"], "results": results,
        "train_seq_len": trained,
    }
    if not args.json:
        with torch.device("meta"):  # counted as built: a quantized model holds its weights as buffers
            parameters = Transformer(net.config).num_parameters()
        report.update(parameters=parameters, tokenizer=tokenizer.name)
    return report


def _trained_seq_len(checkpoint: Path, config: Config) -> int:
    saved = load_train_config(checkpoint)
    return int(saved["seq_len"]) if saved and "seq_len" in saved else config.max_seq_len


def _label(checkpoint: Path) -> str:
    """A run's name for a checkpoint inside runs/NAME/checkpoints/, else the folder's name."""
    return checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.name
