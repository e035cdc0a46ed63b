"""`andromeda eval`: loss, perplexity and bits per byte of checkpoints on held-out text, at one or
more evaluation lengths (past the training length too: how far the model reads), optionally
plotted."""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..choices import KV_CACHE_DTYPES
from .common import add_inference_arguments, load_from_args

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


DESCRIPTION = """Loss, perplexity and bits per byte of checkpoints on held-out text, at one or more
evaluation lengths (past the training length too: how far the model reads), optionally plotted.

The text scored, named in the output: --data; else the run's held-out data (its --eval-data);
else, for a run of the default corpus or a checkpoint without a training record, Shakespeare's
held-out plays.

--json prints, for one checkpoint, one object:
  {"checkpoint": PATH, "data": what was scored, "files": [PATH, ...], "corpus_tokens": N,
   "corpus_bytes": N, "kv_cache_dtype": null | "auto" | "int8", "seq_len": N, "loss": X, "perplexity": X,
   "bits_per_byte": X, "estimate": B,
   "results": {"SEQ_LEN": {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "estimate"}, ...}}
The top-level numbers are those of the first --seq-len; "estimate" is true where --max-windows
scored only part of the text. For several checkpoints:
  {"checkpoints": [one such object per checkpoint, in the order given, each with "train_seq_len"]}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="PATH",
                        help="checkpoint folders or run folders (several: one line each in --plot)")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="files, folders or globs (default: the run's held-out data, its --eval-data; "
                             "Shakespeare's held-out plays for a run of the default corpus)")
    parser.add_argument("--text-field", help="the string field of .jsonl/.parquet/datasets records (default: the "
                                             "run's, else text)")
    parser.add_argument("--seq-len", nargs="+", type=int, metavar="N",
                        help="window lengths, past max_seq_len too unless the model has learned absolute "
                             "positions (default: the training seq_len)")
    parser.add_argument("--plot", metavar="FILE",
                        help="draw bits per byte against --seq-len, one line per checkpoint (.png, .svg, .pdf)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int,
                        help="score only N evenly spread windows: an estimate, marked so in the output")
    parser.add_argument("--bf16", action="store_true", help="deprecated: means --dtype bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against its manifest (SHA-256)")
    parser.add_argument("--cache-dir", help="corpus and token cache folder")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        help="a progress bar on stderr (default: when stderr is a terminal)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (shape above)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                        help="score through a KV cache stored in this dtype, as decoding reads it: int8 (per-token, "
                             "per-head scales) measures what an int8 cache costs; auto: the model's dtype (default: "
                             "no cache, one pass per window)")
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Print a table, or with --json the object the command's description shows."""
    from ..evaluation import check_plot_path, plot_bits_per_byte
    from ..parallel.environment import resolve_device

    plot = check_plot_path(args.plot) if args.plot else None
    for n in args.seq_len or []:
        if n < 1:
            raise ValueError(f"--seq-len {n} must be a positive number of tokens")
    _take_deprecated_bf16(args)
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
        _print_table(report, args.max_windows)
    if plot is not None:
        print(f"plot       {plot}")
    return 0


def _take_deprecated_bf16(args: argparse.Namespace) -> None:
    """--bf16, from before --dtype, is --dtype bf16 (with a warning)."""
    if not args.bf16:
        return
    if args.dtype not in (None, "bf16"):
        raise ValueError(f"--bf16 means --dtype bf16, which contradicts --dtype {args.dtype}: give only --dtype")
    logger.warning("--bf16 is deprecated: use --dtype bf16 (the weights in bfloat16)")
    args.dtype = "bf16"


def _print_table(report: dict, max_windows: int | None) -> None:
    print(f"checkpoint {report['checkpoint']} ({report['parameters']:,} parameters, tokenizer "
          f"{report['tokenizer']}, trained at {report['train_seq_len']} tokens)")
    print(f"data       {report['data']}: {_files_text(report['files'])}; {report['corpus_tokens']:,} tokens, "
          f"{report['corpus_bytes']:,} bytes")
    if report["kv_cache_dtype"] is not None:
        print(f"kv cache   {report['kv_cache_dtype']}: scored through a KV cache, as decoding reads it")
    print(f"{'seq_len':>8} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}")
    for n, r in report["results"].items():
        estimate = (f"  estimate: --max-windows {max_windows} scored {r['tokens']:,} of "
                    f"{report['corpus_tokens'] - 1:,} tokens" if r["estimate"] else "")
        print(f"{n:>8} {r['loss']:>8.4f} {r['perplexity']:>11.3f} {r['bits_per_byte']:>10.4f}{estimate}")


def _evaluate_checkpoint(path: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One checkpoint's JSON object (see DESCRIPTION), with "parameters", "tokenizer" for the table."""
    import torch

    from ..checkpoint import load_checkpoint_tokenizer, load_train_config, open_model_source
    from ..data import TokenStore, token_cache_dir
    from ..evaluation import check_eval_length, evaluate
    from ..model import Transformer

    source = open_model_source(path, verify=args.verify)
    checkpoint, saved = source.folder, load_train_config(source)
    data = _eval_data(checkpoint, saved, args)  # before loading: a missing --data is known at once
    net = load_from_args(source, args, device, decoding=False)
    trained = int(saved["seq_len"]) if saved and "seq_len" in saved else net.config.max_seq_len
    seq_lens = args.seq_len or [trained]
    for seq_len in seq_lens:
        try:
            check_eval_length(seq_len, net.config)
        except ValueError:
            raise ValueError(f"--seq-len {seq_len} is outside 1..{net.config.max_seq_len} (the model's max_seq_len); "
                             f"{checkpoint} has learned absolute positions (use_abs_pos_emb), which end "
                             f"there") from None
    tokenizer = load_checkpoint_tokenizer(source, verify=args.verify)
    store = TokenStore(data.files, tokenizer, cache_dir=token_cache_dir(data.cache_dir), text_field=data.text_field)
    results = {}
    for n in seq_lens:
        result = evaluate(net, store.tokens, n, args.batch_size, store.num_bytes, max_windows=args.max_windows,
                          progress=args.progress, kv_cache_dtype=args.kv_cache_dtype)
        # Fewer predictions than the text holds: --max-windows sampled it.
        results[str(n)] = {**result, "estimate": result["tokens"] < len(store) - 1}
    first = results[str(seq_lens[0])]
    report = {
        "checkpoint": str(checkpoint), "data": data.source, "files": [str(f) for f in data.files],
        "corpus_tokens": len(store), "corpus_bytes": store.num_bytes, "kv_cache_dtype": args.kv_cache_dtype,
        "seq_len": seq_lens[0], "loss": first["loss"],
        "perplexity": first["perplexity"], "bits_per_byte": first["bits_per_byte"], "estimate": first["estimate"],
        "results": results, "train_seq_len": trained,
    }
    if not args.json:
        with torch.device("meta"):  # counted as built: a quantized model holds its weights as buffers
            parameters = Transformer(net.config).num_parameters()
        report.update(parameters=parameters, tokenizer=tokenizer.name)
    return report


@dataclass(frozen=True)
class EvalData:
    files: list[Path]
    source: str  # what the files are, for the output
    text_field: str  # of .jsonl/.parquet/datasets records
    cache_dir: str | None  # the cache root: --cache-dir, else the run's when scoring the run's data


def _eval_data(checkpoint: Path, saved: dict | None, args: argparse.Namespace) -> EvalData:
    """--data; else the held-out files the run (whose training record is `saved`) evaluated on,
    found as training found them."""
    from ..data import resolve_data, shakespeare_corpus
    from ..train import TrainConfig
    from ..train.data import data_files

    text_field = args.text_field or (saved or {}).get("text_field", "text")
    if args.data is not None:
        return EvalData(resolve_data(args.data), f"--data {' '.join(args.data)}", text_field, args.cache_dir)
    if saved is None:
        files = resolve_data([shakespeare_corpus(args.cache_dir) / "heldout"])
        return EvalData(files, "Shakespeare's held-out plays (the checkpoint has no training record)", text_field,
                        args.cache_dir)
    known = {f.name for f in fields(TrainConfig)}
    try:
        run = TrainConfig(**{**{k: v for k, v in saved.items() if k in known},
                             "cache_dir": args.cache_dir or saved.get("cache_dir")})
    except (TypeError, ValueError) as err:
        raise ValueError(f"the training record of {checkpoint} does not say which data the run held out ({err}); "
                         f"give --data FILES") from None
    if run.objective != "lm":
        raise ValueError(f"{checkpoint} was trained on prompt/completion or chat records (objective {run.objective}); "
                         f"`eval` scores plain text: give --data FILES")
    _, held_out = data_files(run)
    if not held_out:
        raise ValueError(f"{checkpoint} was trained on {' '.join(run.data or ())} without held-out data "
                         f"(--eval-data), so there is no split to default to: give --data FILES the run did not "
                         f"train on")
    if run.eval_data is not None:
        source = f"the run's held-out data (--eval-data {' '.join(run.eval_data)})"
    else:
        source = "Shakespeare's held-out plays (the run's held-out split)"
    return EvalData(held_out, source, text_field, run.cache_dir)


def _files_text(files: list[str]) -> str:
    if len(files) <= 3:
        return ", ".join(files)
    return f"{len(files)} files in {os.path.commonpath(files)}"


def _label(checkpoint: Path) -> str:
    """A run's name for a checkpoint inside runs/NAME/checkpoints/, else the folder's name."""
    return checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.name
