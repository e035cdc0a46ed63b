"""The fused decode attention on the CPU (`andromeda::decode_sdpa`) against PyTorch's SDPA.

1. One call at the 2.5 B default's attention shape (bf16, 12 query heads over each of 2 key/value
   heads of 128 channels, batch 1): a few numbers of keys written, over a cache read whole (as the
   compiled step reads it) or just the written keys; the op with no hand-over limit (bf16 calls
   take its AMX tiles where the CPU has them, else its FMA path) against
   F.scaled_dot_product_attention, interleaved, medians of `--calls` calls.
2. Long contexts: one decode step's attention at the 2.5 B default's shape over 32 layers' own
   caches (so that the keys and values come from memory, as in use: 256 MiB at 8k tokens, next to
   this CPU's caches), `--long` numbers of keys, all written: the op (AMX tiles where the CPU has
   them, else its FMA path up to the limit and SDPA past it) against SDPA, alternating, medians of
   `--steps` steps; milliseconds a step and the GB/s of keys and values that makes.
3. Whole decode steps of an int4 model (the 2.5 B default's layout at width `--dim`: 32 layers,
   so at the default width 256 nearly all of a step is per-step cost; `--dim 2560` is the 2.5 B
   itself), greedy, `--new-tokens` tokens after a prompt of each `--contexts` length, compiled
   (`generate(compile=True)`) or eager (`--eager`): the cache given the fused attention (as
   `generate` gives it) against none, alternating in one process for `--rounds` rounds; median
   milliseconds a step. The op hands calls past `native.DECODE_SDPA_COLUMNS` readable keys to
   SDPA, as in use.

    python benchmarks/bench_decode_attention.py --threads 2
    python benchmarks/bench_decode_attention.py --threads 2 --dim 2560 --contexts 8 --rounds 4
    python benchmarks/bench_decode_attention.py --threads 2 --dim 2560 --contexts 8 --eager --skip-calls
    python benchmarks/bench_decode_attention.py --threads 1 --long 1024,4096,8192,16384 --contexts ""
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

import bench_decode
import common
from andromeda import Config
from andromeda.inference import native
from andromeda.model import build_transformer

generate_module = importlib.import_module("andromeda.inference.generate")
CALL_CASES = ((40, 40), (256, 40), (256, 256), (1024, 1024))  # (keys read, keys written)


def time_calls(calls: int) -> None:
    print("| keys read | keys written | decode_sdpa us | SDPA us | SDPA / decode_sdpa |")
    print("|---|---|---|---|---|")
    for read, written in CALL_CASES:
        generator = torch.Generator().manual_seed(read + written)
        q = torch.randn(1, 2, 12, 128, generator=generator).to(torch.bfloat16)
        k, v = (torch.randn(1, 2, read, 128, generator=generator).to(torch.bfloat16) for _ in range(2))
        mask = torch.zeros(1, 2, 12, read)
        mask[..., written:] = torch.finfo(torch.bfloat16).min
        mask = mask.to(torch.bfloat16)
        contestants = {"fused": lambda: torch.ops.andromeda.decode_sdpa(q, k, v, mask, 0.088, 1 << 40),
                       "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.088)}
        times = common.alternate(contestants, calls, warmup=10)
        fused, sdpa = (common.median(times[name]) * 1e6 for name in ("fused", "sdpa"))
        print(f"| {read} | {written} | {fused:.1f} | {sdpa:.1f} | {sdpa / fused:.2f}x |")


def time_long(contexts: list[int], steps: int) -> None:
    layers, K, G, D = 32, 2, 12, 128
    print(f"\none step's attention, {layers} layers' caches, bf16, {G * K} query heads over {K} kv heads of {D}, "
          f"AMX path: {'yes' if native.decode_sdpa_amx() else 'no'}\n")
    print("| keys | decode_sdpa ms | SDPA ms | SDPA / decode_sdpa | decode_sdpa GB/s | SDPA GB/s |")
    print("|---|---|---|---|---|---|")
    for keys in contexts:
        generator = torch.Generator().manual_seed(keys)
        q = torch.randn(1, K, G, D, generator=generator).to(torch.bfloat16)
        caches = [[torch.randn(1, K, keys, D, generator=generator).to(torch.bfloat16) for _ in range(2)]
                  for _ in range(layers)]
        mask = (-0.01 * torch.arange(keys - 1, -1, -1.0)).expand(1, K, G, keys).to(torch.bfloat16)  # ALiBi-like
        scale = D**-0.5

        def fused() -> None:
            for k, v in caches:
                torch.ops.andromeda.decode_sdpa(q, k, v, mask, scale, native.DECODE_SDPA_COLUMNS)

        def sdpa() -> None:
            for k, v in caches:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

        times = common.alternate({"fused": fused, "sdpa": sdpa}, steps, warmup=2)
        ours, theirs = (common.median(times[name]) * 1e3 for name in ("fused", "sdpa"))
        gigabytes = layers * 2 * K * keys * D * 2 / 1e9
        print(f"| {keys} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x | {gigabytes / ours * 1e3:.1f} | "
              f"{gigabytes / theirs * 1e3:.1f} |", flush=True)


def time_steps(dim: int, contexts: list[int], new_tokens: int, rounds: int, compile: bool) -> None:
    torch.manual_seed(0)
    config = Config.from_preset("default", dim=dim)
    net = bench_decode.convert(build_transformer(config, dtype=torch.bfloat16).eval(), "int4")
    given = generate_module.decode_sdpa_for

    def step_ms(prompt: torch.Tensor, fused: bool, n: int) -> float:
        generate_module.decode_sdpa_for = given if fused else (lambda cache: None)
        try:
            stamps = [time.perf_counter() for _ in generate_module.stream(net, prompt, n, temperature=0,
                                                                            compile=compile)]
        finally:
            generate_module.decode_sdpa_for = given
        return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])) * 1e3

    mode = "compiled" if compile else "eager"
    print(f"\n{mode} int4 step, width {dim}, {config.depth} layers, {new_tokens} tokens a round\n")
    print("| context (keys written) | SDPA ms/step (rounds) | fused ms/step (rounds) | SDPA / fused |")
    print("|---|---|---|---|")
    for length in contexts:
        prompt = torch.randint(0, config.num_tokens, (1, length), generator=torch.Generator().manual_seed(length))
        for fused in (False, True):  # compile (or warm) both first
            step_ms(prompt, fused, 8)
        results: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for fused in (False, True):
                results[fused].append(step_ms(prompt, fused, new_tokens))
        sdpa, fused = (statistics.median(results[key]) for key in (False, True))
        shown = {key: ", ".join(f"{value:.2f}" for value in results[key]) for key in results}
        print(f"| {length}-{length + new_tokens} | {sdpa:.2f} ({shown[False]}) | {fused:.2f} ({shown[True]}) "
              f"| {sdpa / fused:.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per case (part 1)")
    parser.add_argument("--long", default="1024,2048,8192", help="keys of part 2, comma-separated")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per context (part 2)")
    parser.add_argument("--dim", type=int, default=256, help="model width of part 3 (2560: the 2.5 B default)")
    parser.add_argument("--contexts", default="16,80,120,160", help="prompt lengths of part 3, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per context")
    parser.add_argument("--eager", action="store_true", help="time eager steps (default: compiled)")
    parser.add_argument("--skip-calls", action="store_true", help="skip part 1")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    found = native.kernels()
    if found is None or not found.cpp_ops:
        print(f"decode_sdpa's kernel is not built here ({native.unavailable_reason() or 'no C++ ops'}): nothing to time")
        return
    print(f"- machine: {common.environment()}; bf16 by AMX tiles: {'yes' if native.decode_sdpa_amx() else 'no'}; "
          f"the FMA path hands over to SDPA past {native.DECODE_SDPA_COLUMNS} readable keys\n")
    if not args.skip_calls:
        time_calls(args.calls)
    long_contexts = [int(value) for value in args.long.split(",") if value]
    if long_contexts:
        time_long(long_contexts, args.steps)
    contexts = [int(value) for value in args.contexts.split(",") if value]
    if contexts:
        time_steps(args.dim, contexts, args.new_tokens, args.rounds, not args.eager)


if __name__ == "__main__":
    main()
