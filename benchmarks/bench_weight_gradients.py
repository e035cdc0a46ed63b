"""The forms of bf16 training's weight-gradient products on the CPU, side by side.

A weight's gradient is dy.T @ x over a step's rows (dy (N, out), x (N, in)). oneDNN's bf16
product takes the transposed first operand as it is, and on an Intel Xeon with AMX that form
runs at ~550-650 GFLOP/s where a product of contiguous operands runs at 750-1,050: the
feed-forward's lean backward (`model.fused`) therefore makes W2's narrow operand dy.T contiguous
first, as `fused.projection` does for the attention's projections from CONTIGUOUS_FIRST_MIN weights
on; W1's, from `fused.BLOCKS_MIN` weights on, is formed as the (in, out) product x.T @ dy of the
narrow x made contiguous, written back transposed into float32 in blocks of rows (`fused.transposed`;
read back in one pass it was 1.1x at dim 512 and 0.9-1.1x at the 2.5 B's width); and the loss's logits
weight gradient (`model.loss`) is summed as (C, V) from contiguous operands, each chunk's bf16
product added through a float32 buffer of a few rows, and written back transposed in blocks of
rows. This times each product both ways at a model's shapes, a chunk's product and sum with the
whole-tensor add_ against the blocks, and the write-back in one pass against the blocks,
alternating the two forms `--repeats` times (best of each): where the forms win or lose on a CPU
(not measured on an AMD EPYC yet).

    python benchmarks/bench_weight_gradients.py                       # dim 512 and the 2.5 B's width
    python benchmarks/bench_weight_gradients.py --widths 2560 --rows 4096 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys

from andromeda.cli import allocate_with_huge_pages

HUGE_PAGES = allocate_with_huge_pages(os.environ)  # as `andromeda train` allocates

import torch  # noqa: E402 - after the allocator's setting

import common  # noqa: E402
from andromeda.model.fused import CONTIGUOUS_FIRST_MIN, transposed  # noqa: E402
from andromeda.model.loss import _WeightGradient  # noqa: E402

VOCAB = 50432


def paired(before, now, repeats: int) -> tuple[float, float]:
    """Best seconds of each of two calls, timed alternately (a slow minute hits both)."""
    before(), now()
    times = [(common.time_call(before), common.time_call(now)) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def products(width: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of the feed-forward's two weight gradients (GELU MLP 4x wide) and the
    attention's two projections (bench_train's heads at dim 512: 8 of 64; else heads of 128 as
    the published presets have, width // 128 + 4 of them at 2560 as the default: 24 query heads)."""
    heads, dim_head = (8, 64) if width == 512 else ((24, 128) if width == 2560 else (width // 128, 128))
    return [("feed-forward W2", width, 4 * width), ("feed-forward W1", 4 * width, width),
            ("attention qkv", (heads + 4) * dim_head, width), ("attention out", width, heads * dim_head)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2560])
    parser.add_argument("--rows", type=int, default=4096, help="rows of a step (batch x sequence)")
    parser.add_argument("--logit-rows", type=int, default=1024, help="rows of one loss chunk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    table = []
    for width in args.widths:
        for name, out_features, in_features in products(width):
            dy = torch.randn(args.rows, out_features, generator=generator).bfloat16()
            x = torch.randn(args.rows, in_features, generator=generator).bfloat16()
            before = lambda: dy.T @ x  # noqa: E731
            if name.endswith("W2") or name.startswith("attention"):  # dy made contiguous first: what the
                now = lambda: transposed(dy, dy.dtype) @ x  # noqa: E731 - model uses for W2 and large projections
            else:  # W1: the (in, out) product of contiguous operands, written back transposed in blocks
                now = lambda: transposed(transposed(x, x.dtype) @ dy, torch.float32)  # noqa: E731
                before_fp32 = before
                before = lambda: before_fp32().to(torch.float32)  # noqa: E731 - as autograd converts it
            torch.testing.assert_close(now().float(), before().float(), rtol=2e-2, atol=2e-1)
            t_before, t_now = paired(before, now, args.repeats)
            flops = 2 * args.rows * out_features * in_features
            if name.startswith("attention"):
                used = out_features * in_features >= CONTIGUOUS_FIRST_MIN
                name += " (the model takes 'now')" if used else " (below CONTIGUOUS_FIRST_MIN: the model keeps 'before')"
            table.append([width, f"{name} ({out_features} x {in_features})", f"{t_before * 1e3:.1f} ms "
                          f"({flops / t_before / 1e9:,.0f} GFLOP/s)", f"{t_now * 1e3:.1f} ms "
                          f"({flops / t_now / 1e9:,.0f} GFLOP/s)", f"**{t_before / t_now:.2f}x**"])
        # The logits' weight gradient as the loss sums it: (C, V) float32 from bf16 chunk products.
        chunk_grad = torch.randn(args.logit_rows, VOCAB, generator=generator).bfloat16()
        chunk_rows = torch.randn(args.logit_rows, width, generator=generator).bfloat16()
        summed = _WeightGradient(torch.empty(VOCAB, width), torch.float32, torch.bfloat16, transposed=True)
        summed.add(chunk_grad, chunk_rows, first=True)
        block = summed.block

        def add_whole() -> None:  # as before: add_ of the bf16 product converts all of it first
            summed.block = None
            summed.add(chunk_grad, chunk_rows, first=False)

        def add_in_blocks() -> None:
            summed.block = block
            summed.add(chunk_grad, chunk_rows, first=False)

        t_before, t_now = paired(add_whole, add_in_blocks, args.repeats)
        table.append([width, f"a loss chunk's product ({args.logit_rows} rows) summed into the logits' "
                      f"gradient ({width} x {VOCAB}, fp32)", f"{t_before * 1e3:.1f} ms", f"{t_now * 1e3:.1f} ms",
                      f"**{t_before / t_now:.2f}x**"])
        scale = torch.tensor(0.5)

        def one_pass() -> torch.Tensor:  # as before
            return torch.mul(summed.sum.T, scale, out=summed.sum.new_empty((VOCAB, width)))

        def in_blocks() -> torch.Tensor:
            return summed.scaled(scale, torch.float32)

        assert torch.equal(one_pass(), in_blocks())
        t_before, t_now = paired(one_pass, in_blocks, args.repeats)
        table.append([width, f"logits' gradient written back ({VOCAB} x {width}, fp32)",
                      f"{t_before * 1e3:.1f} ms", f"{t_now * 1e3:.1f} ms", f"**{t_before / t_now:.2f}x**"])
    print("## bf16 weight-gradient products (`benchmarks/bench_weight_gradients.py`)\n")
    print(f"- machine: {common.environment()}; 2 MiB allocations in huge "
          f"pages: {'yes' if HUGE_PAGES else 'no'}")
    print(f"- {args.rows} rows; best of {args.repeats} alternating runs each; 'before' is dy.T @ x as it is (and the "
          f"logits' gradient transposed in one pass), 'now' the form the model uses on the CPU (W1's both into float32, as autograd gives it)\n")
    print(common.markdown_table(["width", "product", "before", "now", "speed-up"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
