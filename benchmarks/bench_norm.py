"""A block's LayerNorm in a bf16 training step on the CPU: the kernel against PyTorch's ops.

Under CPU autocast the norm runs in float32 on the float32 residual stream, its consumer converts
the output to bf16 and the backward converts the bf16 gradient back; `train.norm_kernel` does
norm and conversion in one pass each way. This times both, forward and backward, at dim 512 and
the 2.5 B default's width (4 x 1024 rows, as `bench_train.py`'s step), alternating `--rounds`
times, the best of `--repeats` calls each; allocations of 2 MiB or more in huge pages, as
`andromeda train` makes them.

    python benchmarks/bench_norm.py
    python benchmarks/bench_norm.py --widths 2560 --threads 2
"""

from __future__ import annotations

import argparse
import os

from andromeda.cli import allocate_with_huge_pages

HUGE_PAGES = allocate_with_huge_pages(os.environ)  # as `andromeda train` allocates

import torch  # noqa: E402 - after the allocator's setting
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from andromeda.train.norm_kernel import layer_norm_bf16, unavailable_reason  # noqa: E402

EPS = 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2560])
    parser.add_argument("--rows", type=int, default=4096, help="rows of a step (batch x sequence)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"the LayerNorm kernel cannot run here: {reason}")
        return
    torch.set_num_threads(args.threads)
    paths = {
        "PyTorch: float32 LayerNorm, then to bf16 (autocast)":
            lambda x, w: F.layer_norm(x, (x.shape[-1],), w, None, EPS).to(torch.bfloat16),
        "kernel (`norm_kernel.layer_norm_bf16`)": lambda x, w: layer_norm_bf16(x, w, EPS),
    }
    rows = []
    for width in args.widths:
        generator = torch.Generator().manual_seed(width)
        x = torch.randn(args.rows, width, generator=generator).requires_grad_()
        weight = (torch.rand(width, generator=generator) + 0.5).requires_grad_()
        grad = torch.randn(args.rows, width, generator=generator).bfloat16()
        for round_ in range(1, args.rounds + 1):
            for name, function in paths.items():
                forward, backward = common.time_forward_backward(lambda f=function: f(x, weight), grad, args.repeats,
                                                                 torch.bfloat16)
                rows.append([width, round_, name, f"{forward * 1e3:.2f}", f"{backward * 1e3:.2f}",
                             f"{(forward + backward) * 1e3:.2f}"])
    print("## A block's LayerNorm, bf16 training on the CPU (`benchmarks/bench_norm.py`)\n")
    print(f"- machine: {common.environment()}; 2 MiB allocations in huge pages: {'yes' if HUGE_PAGES else 'no'}")
    print(f"- {args.rows} rows of float32 in, bf16 out, a bf16 output gradient; best of {args.repeats} calls "
          f"per round\n")
    print(common.markdown_table(["width", "round", "path", "forward ms", "backward ms", "forward + backward ms"], rows))


if __name__ == "__main__":
    main()
