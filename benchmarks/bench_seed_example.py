"""The seed's own example, timed and weighed: build `Andromeda()` (2.48 B parameters), then the
loss of `torch.randint(0, 50432, (1, 8192))` under `torch.no_grad()`.

Reports build time, forward time and PEAK RESIDENT MEMORY of the whole process
(`getrusage(RUSAGE_SELF).ru_maxrss`; with `/usr/bin/time -v` as an external cross-check when it
is installed: `apt-get install time` otherwise). Each mode runs in its own process so the peaks
are separate. Goals: fp32 <= 13 GB (the weights alone are 9.9 GB), bf16 <= 7 GB (built directly
in bf16, with no transient fp32 copy).

    python benchmarks/bench_seed_example.py                    # fp32 and bf16, one process each
    python benchmarks/bench_seed_example.py --dtype fp32       # one mode, in this process
    /usr/bin/time -v python benchmarks/bench_seed_example.py --dtype fp32   # external check
    python benchmarks/bench_seed_example.py --peer             # + x-transformers, under a 20 GB cap
    python benchmarks/bench_seed_example.py --small --seq-len 512 --peer    # smoke test

The peer (x-transformers 2.31.10 with the same hyperparameters, fp32) runs under a watchdog that
kills it when its RSS passes `--cap-gb` or the machine's available memory falls below 1 GiB; on a
24 GB machine it is killed for running out of memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time

import torch

import common
from andromeda import Andromeda, Config

log = logging.getLogger("bench_seed_example")

GB = 1e9  # the goals are stated in decimal GB, as is "9.9 GB of weights"
GOALS_GB = {"fp32": 13.0, "bf16": 7.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED_VOCAB = 50432


def small_config(seq_len: int) -> Config:
    """A two-layer model with the seed's vocabulary and features, for smoke tests."""
    return Config.from_preset("default", dim=256, depth=2, heads=4, alibi_num_heads=2,
                              max_seq_len=max(seq_len, Config.max_seq_len))


def build(model: str, dtype: str, args: argparse.Namespace) -> torch.nn.Module:
    """The model as the seed example builds it; the loss model for x-transformers."""
    if model == "x-transformers":
        config = small_config(args.seq_len) if args.small else Config(max_seq_len=max(args.seq_len, 8192))
        net = common.x_transformers_model(config).to(DTYPES[dtype])
        return common.x_transformers_loss_model(net)
    if args.small:
        return Andromeda.from_config(small_config(args.seq_len), dtype=DTYPES[dtype])
    if dtype == "fp32" and args.seq_len <= Config.max_seq_len:
        return Andromeda()  # the seed's exact call
    return Andromeda.from_config("default", dtype=DTYPES[dtype],
                                 max_seq_len=max(args.seq_len, Config.max_seq_len))


def measure(model_name: str, dtype: str, args: argparse.Namespace) -> dict:
    """Build and run once in this process; returns the figures (peak over the whole process)."""
    torch.manual_seed(args.seed)  # the same weights in every run
    start = time.perf_counter()
    model = build(model_name, dtype, args)
    build_s = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_after_build = common.rss_bytes()
    log.info("built %s %s in %.1f s; RSS %.2f GB", model_name, dtype, build_s, rss_after_build / GB)
    tokens = torch.randint(0, SEED_VOCAB, (1, args.seq_len))
    start = time.perf_counter()
    with torch.no_grad():
        loss = model(tokens)
    forward_s = time.perf_counter() - start
    return dict(model=model_name, dtype=dtype, parameters=sum(p.numel() for p in model.parameters()),
                weights=weights, build_s=build_s, forward_s=forward_s, loss=float(loss),
                rss_after_build=rss_after_build, peak_rss=common.peak_rss_bytes())


TIME_MAX_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def spawn(model_name: str, dtype: str, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh process. Ours is wrapped in `/usr/bin/time -v` when it is
    installed (an external figure for the same peak); the peer runs under the memory watchdog."""
    command = common.child_command(__file__, "--child", "--model", model_name, "--dtype", dtype,
                                   "--seq-len", str(args.seq_len), "--seed", str(args.seed))
    command += ["--small"] if args.small else []
    if model_name == "x-transformers":
        # The watchdog must watch the Python process itself, so no /usr/bin/time wrapper here.
        run = common.run_capped(command, cap_bytes=int(args.cap_gb * GB))
        result = run.last_json() or dict(model=model_name, dtype=dtype)
        result["killed"] = run.killed
        result["seen_peak_rss"] = run.seen_peak_rss
        if run.killed is None and run.returncode != 0:
            result["error"] = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
        return result
    time_binary = shutil.which("time", path="/usr/bin:/bin")
    wrapped = [time_binary, "-v", *command] if time_binary else command
    run = common.run_capped(wrapped, cap_bytes=int(args.cap_gb * GB))
    if run.killed or run.returncode != 0:
        raise RuntimeError(f"the {dtype} run of {model_name} failed: "
                           f"{run.killed or run.stderr.strip()[-2000:]}")
    result = run.last_json()
    match = TIME_MAX_RSS.search(run.stderr)
    result["time_peak_rss"] = int(match.group(1)) * 1024 if match else None
    return result


def row(result: dict, small: bool) -> list[object]:
    def gb(key: str) -> str:
        return f"{result[key] / GB:.2f} GB" if result.get(key) else "-"

    if "peak_rss" not in result:  # the peer, killed or failed before it reported
        what = result.get("killed") or result.get("error", "failed")
        return [result["model"], result["dtype"], "-", "-", "-", "-",
                f"> {result['seen_peak_rss'] / GB:.1f} GB: killed ({what})", "-", "-"]
    goal = GOALS_GB.get(result["dtype"]) if result["model"] == "andromeda" and not small else None
    verdict = "-" if goal is None else (
        f"{'met' if result['peak_rss'] <= goal * GB else 'MISSED'} (<= {goal:.0f} GB)")
    return [result["model"], result["dtype"], gb("weights"), f"{result['build_s']:.1f} s",
            f"{result['forward_s']:.1f} s", f"{result['loss']:.4f}", gb("peak_rss"),
            gb("time_peak_rss"), verdict]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both",
                        help="'both' runs each mode in its own process; one mode runs in this one")
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens in the example (the seed: 8192)")
    parser.add_argument("--small", action="store_true", help="a 2-layer dim-256 model, for smoke tests")
    parser.add_argument("--peer", action="store_true", help="also x-transformers fp32, memory-capped")
    parser.add_argument("--cap-gb", type=float, default=20.0, help="kill any child past this RSS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=("andromeda", "x-transformers"), default="andromeda",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seq_len < 2:
        parser.error(f"--seq-len must be at least 2 (the loss needs a next token), got {args.seq_len}")
    return args


HEADERS = ["model", "dtype", "weights", "build", "forward", "loss", "peak RSS (getrusage)",
           "peak RSS (/usr/bin/time -v)", "goal"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    if args.child:  # one measurement, reported as a JSON line to the parent
        print(json.dumps(measure(args.model, args.dtype, args)))
        return 0
    if args.dtype != "both" and not args.peer:
        results = [measure("andromeda", args.dtype, args)]
    else:
        dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
        results = [spawn("andromeda", dtype, args) for dtype in dtypes]
        if args.peer:
            results.append(spawn("x-transformers", "fp32", args))
    model = "small 2-layer model (dim 256)" if args.small else "`Andromeda()` (the seed default)"
    print("## The seed's example (`benchmarks/bench_seed_example.py`)\n")
    print(f"- machine: {common.environment()}; {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GB:.1f} GB RAM")
    print(f"- {model}, then `model(torch.randint(0, {SEED_VOCAB}, (1, {args.seq_len})))` under "
          f"`torch.no_grad()`; each row a fresh process; GB = 1e9 bytes")
    if args.peer:
        print(f"- x-transformers runs under a watchdog: killed past {args.cap_gb:.0f} GB RSS or "
              f"under 1 GiB of machine memory available")
    print()
    print(common.markdown_table(HEADERS, [row(r, args.small) for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
