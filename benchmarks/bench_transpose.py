"""The weight gradients' transposed copies of a bf16 training step on the CPU: PyTorch's ops
(`model.fused.transposed`, blocks of 64 rows from 1 M entries) against the C kernel
(`train.transpose_kernel`), at a model's shapes, alternating `--repeats` times (best of each).

The copies a step makes: each projection's bf16 output gradient dy (N, out) as (out, N) for its
weight's product, the feed-forward W1's bf16 (C, F) product written back into float32 (F, C), and
the logits' float32 (C, V) gradient, scaled, into (V, C). Both sides give the same bits (checked).

    python benchmarks/bench_transpose.py                        # dim 512 and the 2.5 B's width
    python benchmarks/bench_transpose.py --widths 2560 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys

from andromeda.cli import allocate_with_huge_pages

HUGE_PAGES = allocate_with_huge_pages(os.environ)  # as `andromeda train` allocates

import torch  # noqa: E402 - after the allocator's setting

import common  # noqa: E402
from andromeda.model.fused import BLOCKS_MIN, CONTIGUOUS_FIRST_MIN, transposed  # noqa: E402
from andromeda.train.transpose_kernel import transposed_by_kernel, unavailable_reason  # noqa: E402
from bench_weight_gradients import VOCAB, paired, products  # noqa: E402


def copies(width: int, rows: int) -> list[tuple[str, tuple[int, int], torch.dtype, torch.dtype, bool]]:
    """(name, source shape, source dtype, result dtype, scaled) of one step's transposed copies; those
    the model does not make at this width (the projections under CONTIGUOUS_FIRST_MIN weights keep
    nn.Linear, W1 under BLOCKS_MIN its dh.T @ x form) say so."""
    unused = " (not made at this width)"
    out = [(f"{name}'s dy ({rows} x {n})" + ("" if name.endswith("W2") or n * k >= CONTIGUOUS_FIRST_MIN else unused),
            (rows, n), torch.bfloat16, torch.bfloat16, False)
           for name, n, k in products(width) if name != "feed-forward W1"]
    w1 = f"feed-forward W1's product written back ({width} x {4 * width} bf16 -> fp32)"
    return out + [(w1 + ("" if 4 * width * width >= BLOCKS_MIN else unused),
                   (width, 4 * width), torch.bfloat16, torch.float32, False),
                  (f"the logits' gradient written back, scaled ({width} x {VOCAB} fp32)",
                   (width, VOCAB), torch.float32, torch.float32, True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2560])
    parser.add_argument("--rows", type=int, default=4096, help="rows of a step (batch x sequence)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"the transpose kernel cannot run here: {reason}")
        return 0
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    table = []
    for width in args.widths:
        for name, shape, src_dtype, dtype, scaled in copies(width, args.rows):
            src = torch.randn(shape, generator=generator).to(src_dtype)
            scale = torch.tensor(0.37) if scaled else None
            ops = lambda: transposed(src, dtype, scale)  # noqa: E731
            kernel = lambda: transposed_by_kernel(src, dtype, scale)  # noqa: E731
            assert torch.equal(ops(), kernel())
            t_ops, t_kernel = paired(ops, kernel, args.repeats)
            gigabytes = src.numel() * (src.element_size() + dtype.itemsize) / 1e9
            table.append([width, name, f"{t_ops * 1e3:.1f} ms", f"{t_kernel * 1e3:.1f} ms "
                          f"({gigabytes / t_kernel:.1f} GB/s)", f"**{t_ops / t_kernel:.2f}x**"])
    print("## Transposed copies of a bf16 training step (`benchmarks/bench_transpose.py`)\n")
    print(f"- machine: {common.environment()}; {args.threads} thread(s); 2 MiB allocations in huge "
          f"pages: {'yes' if HUGE_PAGES else 'no'}")
    print(f"- best of {args.repeats} alternating runs each; GB/s counts the bytes read and written once\n")
    print(common.markdown_table(["width", "copy", "PyTorch's ops", "kernel", "speed-up"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
