"""Attention memory against sequence length: the peak resident-memory increase of one forward
with loss (under `torch.no_grad()`) of the tiny preset at 1k ... 32k tokens, each length in a
fresh process, for Andromeda and for x-transformers 2.31.10 with the same hyperparameters.

Andromeda never materialises a (T, T) score or bias matrix (ALiBi rides through the fused causal
kernel as extra q/k channels, and the loss is chunked), so its increase grows linearly with T:
the bytes per token stay flat. x-transformers builds the ALiBi bias as a dense (heads, T, T)
tensor, so its increase grows with T^2; lengths whose extrapolated peak would pass the cap are
skipped, and any run that passes it anyway is killed by the watchdog (see common.run_capped).

    python benchmarks/bench_memory.py                  # 1k..32k tokens, both models
    python benchmarks/bench_memory.py --quick          # 1k, 2k, 4k
    python benchmarks/bench_memory.py --no-peer --lengths 65536 --max-seq-len 65536
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time

import torch

import common
from andromeda import Andromeda, Config

log = logging.getLogger("bench_memory")

GB = 1e9
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
MODELS = ("andromeda", "x-transformers")


def measure(model_name: str, length: int, args: argparse.Namespace) -> dict:
    """In this (fresh) process: the peak RSS increase of one forward with loss at `length`."""
    config = Config.from_preset("tiny", max_seq_len=args.max_seq_len)
    torch.manual_seed(args.seed)
    if model_name == "andromeda":
        model = Andromeda.from_config(config)
    else:
        model = common.x_transformers_loss_model(common.x_transformers_model(config))
    model.eval()
    tokens = torch.randint(0, config.num_tokens, (1, length + 1))  # inputs: the first `length`
    with torch.no_grad():
        model(tokens[:, :65])  # one short pass first: kernels, thread pools, allocator arenas
        gc.collect()
        base = common.rss_bytes()
        exact = common.reset_peak_rss()  # VmHWM restarts here; else fall back to ru_maxrss
        start = time.perf_counter()
        loss = model(tokens)
        forward_s = time.perf_counter() - start
    peak = common.high_water_rss_bytes() if exact else common.peak_rss_bytes()
    return dict(model=model_name, length=length, increase=max(peak - base, 0), base=base,
                forward_s=forward_s, loss=float(loss), exact=exact)


def spawn(model_name: str, length: int, args: argparse.Namespace) -> dict:
    command = common.child_command(__file__, "--child", "--model", model_name, "--lengths",
                                   str(length), "--max-seq-len", str(args.max_seq_len),
                                   "--seed", str(args.seed))
    run = common.run_capped(command, cap_bytes=int(args.cap_gb * GB))
    result = run.last_json()
    if result is not None:
        return result
    reason = run.killed or (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
    log.warning("%s at %d tokens: %s", model_name, length, reason)
    return dict(model=model_name, length=length, failed=reason, seen_peak_rss=run.seen_peak_rss)


def predicted_increase(previous: dict | None, length: int, power: int) -> float | None:
    """The increase at `length` extrapolated from the last measured one as length**power."""
    if previous is None or "increase" not in previous:
        return None
    return previous["increase"] * (length / previous["length"]) ** power


def cell(result: dict | None) -> tuple[str, str]:
    """(increase, bytes per token) cells of one measurement."""
    if result is None:
        return "-", "-"
    if "skipped" in result:
        return f"skipped ({result['skipped']})", "-"
    if "failed" in result:
        return f"killed/failed ({result['failed']})", "-"
    return (common.format_bytes(result["increase"]), f"{result['increase'] / result['length']:,.0f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--quick", action="store_true", help="only 1k, 2k and 4k tokens")
    parser.add_argument("--max-seq-len", type=int, default=32768, help="the tiny preset's max_seq_len")
    parser.add_argument("--no-peer", action="store_true", help="measure Andromeda only")
    parser.add_argument("--cap-gb", type=float, default=20.0,
                        help="kill a run past this RSS; skip peer lengths predicted to pass it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, default="andromeda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths = [1024, 2048, 4096]
    too_long = [n for n in args.lengths if not 1 <= n <= args.max_seq_len]
    if too_long:
        parser.error(f"--lengths must lie in 1..--max-seq-len ({args.max_seq_len}), got {too_long}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    if args.child:
        print(json.dumps(measure(args.model, args.lengths[0], args)))
        return 0
    models = MODELS[:1] if args.no_peer else MODELS
    results: dict[str, dict[int, dict]] = {name: {} for name in models}
    previous: dict[str, dict | None] = {name: None for name in models}
    for length in sorted(args.lengths):
        for name in models:
            # x-transformers' dense ALiBi bias grows as T^2; skip what would pass the cap.
            guess = predicted_increase(previous[name], length, power=2 if name != "andromeda" else 1)
            if previous[name] is not None and "failed" in previous[name]:
                result = dict(model=name, length=length, skipped="a shorter length already failed")
            elif guess is not None and guess > args.cap_gb * GB:
                result = dict(model=name, length=length,
                              skipped=f"predicted {guess / GB:.0f} GB > {args.cap_gb:.0f} GB cap")
            else:
                log.info("%s at %d tokens", name, length)
                result = spawn(name, length, args)
                previous[name] = result
            results[name][length] = result
    print("## Attention memory vs sequence length (`benchmarks/bench_memory.py`)\n")
    print(f"- machine: {common.environment()}")
    print(f"- tiny preset (dim 64, depth 2, 4 heads of 16, 2 kv heads, 2 ALiBi heads, vocab 258), "
          f"max_seq_len {args.max_seq_len}; one forward with loss under torch.no_grad(), batch 1")
    exact = all(r.get("exact", True) for per in results.values() for r in per.values())
    how = "VmHWM reset just before the forward" if exact else "ru_maxrss (may under-count)"
    print(f"- peak RSS increase over the RSS just before the forward ({how}), each length in a fresh "
          f"process; runs killed past {args.cap_gb:.0f} GB")
    print()
    headers = ["tokens", "andromeda increase", "andromeda bytes/token"]
    if not args.no_peer:
        headers += ["x-transformers increase", "x-transformers bytes/token", "x-transformers / andromeda"]
    rows = []
    for length in sorted(args.lengths):
        ours = results["andromeda"][length]
        row = [f"{length:,}", *cell(ours)]
        if not args.no_peer:
            peer = results["x-transformers"][length]
            ratio = "-"
            if "increase" in peer and "increase" in ours and ours["increase"] > 0:
                ratio = f"{peer['increase'] / ours['increase']:.1f}x"
            row += [*cell(peer), ratio]
        rows.append(row)
    print(common.markdown_table(headers, rows))
    measured = [r for r in results["andromeda"].values() if "increase" in r]
    if len(measured) >= 2:
        first, last = measured[0], measured[-1]
        grew = last["length"] / first["length"]
        marginal = (last["increase"] - first["increase"]) / (last["length"] - first["length"])
        print(f"\nAndromeda: {grew:.0f}x more tokens ({first['length']:,} -> {last['length']:,}) took "
              f"{last['increase'] / max(first['increase'], 1):.1f}x the memory (linear: {grew:.0f}x; "
              f"quadratic: {grew**2:.0f}x); {marginal:,.0f} bytes per added token.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
