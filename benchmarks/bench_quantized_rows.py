"""int8 and int4 products of a few to a few hundred rows: the VNNI kernels against the slabs.

A quantized Linear prepared for decoding (`pack_for_decoding`) runs up to
`quantized_linear.DECODE_KERNEL_ROWS` rows (decoding, a batch of streams, a speculative verify, a
short prompt) through `native`'s kernels and more rows by dequantizing its weight a 4 MB slab at a
time into a bf16 matmul. This times both paths through the layers' own `forward` (the limit set
for each call) on `--layers` layers of the 2.5 B default's four matrices (2560 -> 3584, 3072 -> 2560,
2560 -> 10240, 10240 -> 2560; group 128 for int4; sixteen layers: 604 MB of int4, 1.2 GB of
int8, past the 300 MB L3 that a VM on an Emerald Rapids host reports), bf16 activations of each row count; each round times the kernel, then the
slabs (best of `--repeats` passes over all layers), so a slower minute hits both. It shows where
the limit belongs (the kernel/slabs column crossing 1) and what rows cost the kernel against one
row (its time grows with the rows: each is quantized and multiplied alone, int4's unpacked codes
shared by up to three rows).

`--prompt-tokens N ...` then times the whole 2.5 B default (random weights, each scheme) reading a
prompt of each length (one forward, the logits of its last position) both ways: what the limit means
for the time to a chat turn's first token.

    python benchmarks/bench_quantized_rows.py                        # 2 threads, rows 1 3 5 16 64 128 192
    python benchmarks/bench_quantized_rows.py --schemes int4 --rows 1 2 3 4 5 8 --rounds 3
    python benchmarks/bench_quantized_rows.py --rows 1 --prompt-tokens 24 48   # + the 2.5 B's prompts (~8 GB)
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

import common
from andromeda import Config
from andromeda.inference import native
from andromeda.inference import quantized_linear
from andromeda.inference.huge_pages import back_with_huge_pages
from andromeda.inference.quantize import DEFAULT_GROUP_SIZE, quantize
from andromeda.model import build_transformer

SHAPES = ((2560, 3584), (3072, 2560), (2560, 10240), (10240, 2560))  # (in, out): qkv, out, ff in, ff out


@contextlib.contextmanager
def kernel_rows(limit: int) -> Iterator[None]:
    """The layers' row limit for the kernels, for the calls inside."""
    saved = quantized_linear.DECODE_KERNEL_ROWS
    quantized_linear.DECODE_KERNEL_ROWS = limit
    try:
        yield
    finally:
        quantized_linear.DECODE_KERNEL_ROWS = saved


def best_pass(layers: nn.Module, inputs: dict[int, torch.Tensor], repeats: int) -> float:
    """Seconds of the fastest pass over every layer (after one untimed pass)."""
    for layer in layers:
        layer(inputs[layer.in_features])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="int8,int4", help="comma-separated subset of int8, int4")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 3, 5, 16, 64, 128, 192])
    parser.add_argument("--layers", type=int, default=16, help="layers of the 2.5 B default's four matrices")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, nargs="*", default=[],
                        help="also the 2.5 B default reading prompts of these lengths, kernel against slabs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native.kernels() is None:
        raise SystemExit(f"the VNNI kernels do not run here: {native.unavailable_reason()}")
    print(f"- machine: {common.environment()}")
    print(f"- {args.layers} layers of (in, out) {', '.join(f'{i} -> {o}' for i, o in SHAPES)}; "
          f"limit now {quantized_linear.DECODE_KERNEL_ROWS} rows; best of {args.repeats} passes, "
          f"best of {args.rounds} rounds\n")
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    for scheme in args.schemes.split(","):
        layers = nn.Sequential(*[nn.Linear(i, o, bias=False) for _ in range(args.layers) for i, o in SHAPES])
        layers = quantize(layers.bfloat16(), scheme, DEFAULT_GROUP_SIZE)
        quantized_linear.pack_for_decoding(layers)
        weight_bytes = sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])
        one_row = None
        for rows in args.rows:
            inputs = {i: torch.randn(rows, i, generator=generator).bfloat16() for i, _ in SHAPES}
            kernel, slabs = [], []
            with torch.inference_mode():
                for _ in range(args.rounds):
                    with kernel_rows(10**9):
                        kernel.append(best_pass(layers, inputs, args.repeats))
                    with kernel_rows(0):
                        slabs.append(best_pass(layers, inputs, args.repeats))
            k, s = min(kernel), min(slabs)
            one_row = one_row or (k if rows == 1 else None)
            rows_out.append([scheme, rows, f"{k * 1e3:.1f}", f"{s * 1e3:.1f}", f"**{k / s:.2f}x**",
                             f"{weight_bytes / k / 1e9:.1f}", f"{k / one_row:.2f}x" if one_row else "-"])
        del layers
    print(common.markdown_table(["scheme", "rows", "kernel ms", "slabs ms", "kernel / slabs",
                                 "kernel GB/s of weights", "kernel vs 1 row"], rows_out))
    if args.prompt_tokens:
        prompts(args, generator)


def prompts(args: argparse.Namespace, generator: torch.Generator) -> None:
    """The 2.5 B default reading each prompt, through the kernels and through the slabs."""
    rows_out = []
    for scheme in args.schemes.split(","):
        torch.manual_seed(0)
        net = build_transformer(Config.from_preset("default"), dtype=torch.bfloat16).eval()
        net = quantize(net, scheme, DEFAULT_GROUP_SIZE)
        quantized_linear.pack_for_decoding(net)
        back_with_huge_pages(net)
        for tokens in args.prompt_tokens:
            prompt = torch.randint(0, net.config.num_tokens, (1, tokens), generator=generator)
            times: dict[str, list[float]] = {"kernel": [], "slabs": []}
            with torch.inference_mode():
                for _ in range(args.rounds + 1):  # the first round warms both paths up, untimed
                    for path, limit in (("kernel", 10**9), ("slabs", 0)):
                        with kernel_rows(limit):
                            start = time.perf_counter()
                            net(prompt, logits_to_keep=1)
                            times[path].append(time.perf_counter() - start)
            k, s = min(times["kernel"][1:]), min(times["slabs"][1:])
            rows_out.append([scheme, tokens, f"{k:.3f}", f"{s:.3f}", f"**{s / k:.2f}x**"])
        del net
    print(f"\nThe 2.5 B default reading a prompt (one forward; best of {args.rounds} rounds after one untimed):\n")
    print(common.markdown_table(["scheme", "prompt tokens", "kernels s", "slabs s", "kernels faster by"], rows_out))


if __name__ == "__main__":
    main()
