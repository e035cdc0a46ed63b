"""Decoding with the weights in 4 KiB pages against 2 MiB pages (`inference.huge_pages`).

Two copies of the same seeded 2.5 B default (or `--small`) model in one process, converted to a
scheme as `bench_decode` converts it: one left in the 4 KiB pages PyTorch's allocations get where
transparent huge pages are "madvise", one moved to 2 MiB pages. Rounds alternate between them, in
both orders (this machine's memory bandwidth drifts within minutes), each decoding `--tokens`
tokens greedily through `inference.generate.stream`; prints tokens/s per round and the ratio of
medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import bench_decode
import common
from andromeda import Config
from andromeda.inference.huge_pages import back_with_huge_pages, huge_page_size
from andromeda.model import build_transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default="int4,int8",
                        help="comma-separated: bf16, int8, int4 (prepacked bf16's weights are opaque to madvise)")
    parser.add_argument("--small", action="store_true", help="a 6-layer model of the default's width")
    parser.add_argument("--compile", action="store_true", help="the compiled decode step (`generate --compile`)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=24, help="tokens decoded per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if huge_page_size() is None:
        raise SystemExit("no transparent huge pages here (not Linux, or transparent_hugepage/enabled is never)")
    config = Config(depth=6) if args.small else Config()
    print(f"{common._cpu_name()}, {args.threads} threads, torch {torch.__version__}; dim {config.dim}, depth "
          f"{config.depth}; {'compiled' if args.compile else 'eager'}, {args.tokens} tokens a round\n")
    print("| scheme | 4 KiB pages tok/s (rounds) | 2 MiB pages tok/s (rounds) | 2 MiB / 4 KiB |")
    print("|---|---|---|---|")
    device = torch.device("cpu")
    for scheme in args.schemes.split(","):
        torch.manual_seed(0)
        small = bench_decode.convert(build_transformer(config, dtype=torch.bfloat16).eval(), scheme)
        # `convert` moves its result to huge pages; a deep copy is allocated anew, in small pages
        nets = {"4k": copy.deepcopy(small), "2m": small}
        bench_decode.release_freed_memory()
        huge_bytes = int(open("/proc/self/smaps_rollup").read().split("AnonHugePages:")[1].split()[0]) * 1024
        print(f"<!-- {scheme}: {huge_bytes / common.GIB:.2f} GiB of this process in huge pages -->", flush=True)
        prompt = torch.randint(0, config.num_tokens, (1, 1), generator=torch.Generator().manual_seed(0))
        for net in nets.values():
            bench_decode.time_stream(net, prompt, 3, device, args.compile)  # warm-up (and compile)
        rates: dict[str, list[float]] = {name: [] for name in nets}
        for round_ in range(args.rounds):
            for name, net in (nets.items() if round_ % 2 == 0 else reversed(nets.items())):  # both orders
                steps = bench_decode.time_stream(net, prompt, args.tokens, device, args.compile)[1]
                rates[name].append(len(steps) / sum(steps))
        small_pages, huge = (statistics.median(rates[name]) for name in ("4k", "2m"))
        print(f"| {scheme} | {small_pages:.2f} ({', '.join(f'{r:.2f}' for r in rates['4k'])}) | {huge:.2f} "
              f"({', '.join(f'{r:.2f}' for r in rates['2m'])}) | {huge / small_pages:.3f}x |", flush=True)
        del nets, small
        bench_decode.release_freed_memory()


if __name__ == "__main__":
    main()
