"""Checkpoint save and load time of the 2.5 B default model, and what manifest verification costs.

Saves `Andromeda()`'s Transformer (fp32, 9.9 GB) with `save_pretrained` (which writes the
SHA-256 manifest), then times `load_transformer` with and without `verify`, alternating, and the
hashing alone. safetensors maps the file and reads it lazily, so each load is timed together with
one pass over every weight (what the first forward does anyway). The model built for saving is
freed before loading, so one copy is in memory. The file stays in the page cache between loads:
these are warm-cache figures; a cold read adds the disk's time to both.

    python benchmarks/bench_checkpoint.py                 # default model, fp32, in a temp folder
    python benchmarks/bench_checkpoint.py --preset 1b --dtype bf16 --dir /mnt/fast
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

import common
from andromeda import build_transformer
from andromeda.checkpoint import WEIGHTS_FILE, load_transformer, save_pretrained, verify_checkpoint
from andromeda.config import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose)
    root = Path(tempfile.mkdtemp(prefix="andromeda-bench-", dir=args.dir))
    folder = root / "checkpoint"
    try:
        net = build_transformer(Config.from_preset(args.preset), dtype=DTYPES[args.dtype])
        start = time.perf_counter()
        save_pretrained(net, folder)
        save_s = time.perf_counter() - start
        del net
        gc.collect()
        size = (folder / WEIGHTS_FILE).stat().st_size
        start = time.perf_counter()
        verify_checkpoint(folder)
        hash_s = time.perf_counter() - start
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for verify in (False, True):
                start = time.perf_counter()
                loaded = load_transformer(folder, verify=verify)
                for parameter in loaded.parameters():  # first use: every page read once
                    parameter.sum()
                times[verify].append(time.perf_counter() - start)
                del loaded
                gc.collect()
        plain, checked = common.median(times[False]), common.median(times[True])
        print(f"- machine: {common.environment()}")
        print(f"- {args.preset} preset, {args.dtype}: {WEIGHTS_FILE} {size / 1e9:.2f} GB; save (incl. manifest) "
              f"{save_s:.1f} s")
        print()
        print(common.markdown_table(
            ["load + one pass over the weights", "seconds (median)", "vs without verification"],
            [["without verification (`verify=False`, `--no-verify`)", f"{plain:.1f}", "1.00x"],
             ["with verification (default)", f"{checked:.1f}", f"{checked / plain:.2f}x"],
             ["SHA-256 of every file alone", f"{hash_s:.1f}", f"{size / hash_s / 1e9:.2f} GB/s"]]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig()
    raise SystemExit(main())
