"""bf16 products of a few rows: the rows kernel (`andromeda.inference.bf16_linear`, the weight in row
tiles) against oneDNN's prepacked product (`andromeda.inference.packed`) and plain F.linear.

The 2.5 B default's feed-forward weights (2560 x 10240 and 10240 x 2560, bf16, `--pairs` pairs:
629 MB at 6, more than any cache), x of 1 to 32 rows; each round times the three paths one after
the other (median of `--repeats` passes over all weights), so a minute of slower memory hits all
three. Where the kernel wins (decoding, a few rows) and where oneDNN's packed product does (a full
batch of serving rows) is what it shows.

    python benchmarks/bench_bf16_rows.py                      # 2 threads, rows 1 4 8 16 32
    python benchmarks/bench_bf16_rows.py --threads 1 --rows 1 16 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import common
from andromeda.inference import native
from andromeda.inference.packed import packing_supported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--pairs", type=int, default=6, help="pairs of feed-forward weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.bf16_rows_kernel() or not packing_supported():
        raise SystemExit("the bf16 rows kernel or oneDNN's bf16 packing does not run here")
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator).bfloat16()
               for _ in range(args.pairs) for shape in ((10240, 2560), (2560, 10240))]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    tiles = [native.to_row_tiles(w) for w in weights]

    def median_ms(function) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    print("## bf16 products of a few rows (`benchmarks/bench_bf16_rows.py`)\n")
    print(f"- machine: {common.environment()}")
    print(f"- {len(weights)} weights of the 2.5 B default's feed-forward, "
          f"{sum(w.numel() * 2 for w in weights) / 1e6:.0f} MB; median of {args.repeats} passes, ms\n")
    print("| round | rows | rows kernel | oneDNN prepacked | F.linear | kernel vs prepacked |")
    print("|---|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        for rows in args.rows:
            x = {k: torch.randn(rows, k, generator=generator).bfloat16() for k in (2560, 10240)}
            kernel = median_ms(lambda: [native.bf16_rows(x[w.shape[1]], t, w.shape[0]) for w, t in zip(weights, tiles)])
            onednn = median_ms(lambda: [torch.ops.mkldnn._linear_pointwise(x[w.shape[1]], p, None, "none", [None], "")
                                        for w, p in zip(weights, packed)])
            plain = median_ms(lambda: [F.linear(x[w.shape[1]], w) for w in weights])
            print(f"| {round_} | {rows} | {kernel:.1f} | {onednn:.1f} | {plain:.1f} | {onednn / kernel:.2f}x |")


if __name__ == "__main__":
    main()
