"""`andromeda eval`: loss, perplexity and bits per byte of a checkpoint on held-out text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint_tokenizer, load_train_config, load_transformer, resolve_checkpoint
from ..config import Config
from ..data import TokenStore, cache_root, resolve_data, shakespeare_corpus
from ..evaluation import evaluate
from ..parallel.environment import resolve_device

HELP = "loss, perplexity and bits per byte on held-out text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="files, folders or globs (default: Shakespeare's held-out plays)")
    parser.add_argument("--seq-len", nargs="+", type=int, metavar="N",
                        help="window lengths; several show length extrapolation (default: the training seq_len)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-windows", type=int, help="score only N evenly spread windows (an estimate)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against its manifest (SHA-256)")
    parser.add_argument("--cache-dir", help="corpus and token cache folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object (see `run`)")


def run(args: argparse.Namespace) -> int:
    """Print a table, or with --json one object:
    {"checkpoint", "files", "corpus_tokens", "corpus_bytes", "seq_len", "loss", "perplexity", "bits_per_byte",
     "results": {"<seq_len>": {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}, ...}}
    where the top-level numbers are those of the first --seq-len."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    net = load_transformer(checkpoint, device=device, verify=args.verify)
    tokenizer = load_checkpoint_tokenizer(checkpoint, verify=args.verify)
    if args.data is None:
        files = resolve_data([shakespeare_corpus(args.cache_dir) / "heldout"])
    else:
        files = resolve_data(args.data)
    cache = Path(args.cache_dir) / "tokens" if args.cache_dir else cache_root() / "tokens"
    store = TokenStore(files, tokenizer, cache_dir=cache)
    seq_lens = args.seq_len or [_trained_seq_len(checkpoint, net.config)]
    for seq_len in seq_lens:
        if not 1 <= seq_len <= net.config.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} is outside 1..{net.config.max_seq_len} (the model's "
                             f"max_seq_len)")
    autocast = torch.bfloat16 if args.bf16 else None
    results = {
        str(n): evaluate(net, store.tokens, n, args.batch_size, store.num_bytes, max_windows=args.max_windows,
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
    print(f"checkpoint {checkpoint} ({net.num_parameters():,} parameters, tokenizer {tokenizer.name})")
    print(f"data       {len(files)} files, {len(store):,} tokens, {store.num_bytes:,} bytes")
    print(f"{'seq_len':>8} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}")
    for n, r in results.items():
        print(f"{n:>8} {r['loss']:>8.4f} {r['perplexity']:>11.3f} {r['bits_per_byte']:>10.4f}")
    return 0


def _trained_seq_len(checkpoint: Path, config: Config) -> int:
    saved = load_train_config(checkpoint)
    return int(saved["seq_len"]) if saved and "seq_len" in saved else config.max_seq_len
