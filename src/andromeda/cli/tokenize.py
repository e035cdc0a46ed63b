"""`andromeda tokenize`: build the token cache of a corpus ahead of training."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH", help="files, folders or globs")
    parser.add_argument("--tokenizer", default="byte", help="byte, bpe (trained on --data) or a tokenizer.json path")
    parser.add_argument("--bpe-vocab-size", type=int, default=4096, help="vocabulary size of a trained BPE")
    parser.add_argument("--text-field", default="text", help="the string field of .jsonl/.parquet/datasets records")
    parser.add_argument("--num-proc", type=int, help="tokenising processes (default: every CPU)")
    parser.add_argument("--cache-dir", help="cache root (default $ANDROMEDA_CACHE or ~/.cache/andromeda)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data import iter_texts, resolve_data, token_cache_dir, tokenize_corpus
    from ..pause import tokenizer_pause
    from ..tokenizers import build_tokenizer
    from ..train.loop import BPE_PIECE_CHARS

    files = resolve_data(args.data)
    tokenizer = build_tokenizer(args.tokenizer, vocab_size=args.bpe_vocab_size,
                                train_texts=lambda: iter_texts(files, args.text_field, max_chars=BPE_PIECE_CHARS))
    stats = tokenize_corpus(files, tokenizer, token_cache_dir(args.cache_dir), num_proc=args.num_proc,
                            text_field=args.text_field, progress=args.progress, tokenizer_pause=tokenizer_pause())
    print(stats)
    return 0
