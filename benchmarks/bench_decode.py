"""Decoding throughput: new tokens per second of KV-cached generation.

(a) Against x-transformers 2.31.10 with the same weights, in one process, interleaved A, B, A, B:
the seed's features (4 of 8 heads ALiBi, rotary xPos, 2 kv heads, QK-norm with dim scale) at
dim 512, depth 8, vocabulary 50432; CPU fp32, batch 1, greedy. The peer decodes with
`cache_kv=False`: its cached path crashes when ALiBi and rotary embeddings are combined (the
script shows the error), so every peer step recomputes the whole prefix.

(b) `--big`: the 2.5 B default model at batch 1 against the memory-bandwidth bound (issue #13),
one row per weight scheme: bf16 through the default F.linear (on CPU, oneDNN reorders each
weight on every call), bf16 prepacked for oneDNN once (`andromeda.inference.packed`), bf16 read
as stored by the rows kernel (`andromeda.inference.bf16_linear`, what `load_for_inference` gives
where AVX-512 BF16 runs it; "bf16-rows"), and the weight-only int8 and int4 (group 128) of `andromeda.inference.quantize`. A decode step must read
every weight once (all but the embedding table, of which it reads one row), so
tokens/s <= bandwidth / streamed weight bytes. Each scheme runs in a fresh process of this
script: the same seeded bf16 model is built, converted (timed), then decodes greedily (tok/s from
the median step) and prefills `--prefill-len` tokens; that process then measures its own read
bandwidth (best of 5 float32 sums of a multi-GiB tensor: on this VM it varies between processes, so
each share is against the bandwidth of its own process) and its peak RSS, during the build and
conversion and then while decoding. A process per scheme gives clean peaks and keeps the run
near one model's memory; a watchdog kills a process past `--max-rss-gb`. "other load" is the
most CPU the rest of the machine used while that scheme decoded or prefilled, in cores: figures
taken with other load are slower than the machine (`--wait-idle 85` waits for a quiet one).
On `--device cuda` (untested: no GPU was available) the model is built there, steps are
synchronised, memory is `torch.cuda.max_memory_allocated`, the bandwidth is that of a
device-to-device copy, and bf16-packed (CPU only) is skipped.

    python benchmarks/bench_decode.py              # (a): 256-token prompt, 128 new tokens
    python benchmarks/bench_decode.py --quick      # (a): 64-token prompt, 16 new tokens
    python benchmarks/bench_decode.py --big        # (b): all five schemes, 1024-token prefills (~6 GB RAM)
    python benchmarks/bench_decode.py --big --schemes bf16,bf16-packed --prefill-len 0 --threads 2
    python benchmarks/bench_decode.py --big --schemes bf16-packed,int8,int4 --prefill-len 0 --compile  # compiled steps
    python benchmarks/bench_decode.py --big --schemes bf16-packed,bf16-rows --compile   # bf16: oneDNN against the kernel
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import logging
import os
import statistics
import sys
import time

import torch
from torch import nn

import common
from andromeda import Config
from andromeda.inference.generate import stream
from andromeda.inference.huge_pages import back_with_huge_pages
from andromeda.inference.bf16_linear import Bf16RowsLinear, use_bf16_rows
from andromeda.inference.packed import PackedLinear, prepack
from andromeda.inference.quantize import DEFAULT_GROUP_SIZE, quantize
from andromeda.inference.quantized_linear import pack_for_decoding
from andromeda.model import build_transformer

log = logging.getLogger("bench_decode")


def small_config(max_seq_len: int) -> Config:
    """The seed's feature mix at dim 512 (the issue's decode setting)."""
    return Config(num_tokens=50432, max_seq_len=max_seq_len, dim=512, depth=8, dim_head=64, heads=8,
                  alibi_num_heads=4, attn_kv_heads=2)


def peer_cached_error(wrapper, prompt: torch.Tensor) -> str:
    """What x-transformers' KV-cached generation does with this model: its error, or 'works'."""
    try:
        wrapper.generate(prompt, 2, temperature=0.0, cache_kv=True)
    except Exception as error:  # reported, not handled: any failure is the finding
        return f"{type(error).__name__}: {error}"
    return "works"


def leading_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many tokens two greedy continuations share before they first differ."""
    differ = (a != b).flatten().nonzero()
    return a.numel() if len(differ) == 0 else int(differ[0])


def bench_peer(args: argparse.Namespace) -> None:
    import x_transformers

    prompt_len, new_tokens = (64, 16) if args.quick else (args.prompt_len, args.new_tokens)
    config = small_config(max_seq_len=prompt_len + new_tokens)
    ours, peer = common.matched_pair(config, seed=args.seed)
    wrapper = x_transformers.AutoregressiveWrapper(peer)
    prompt = torch.randint(0, config.num_tokens, (1, prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))

    crash = peer_cached_error(wrapper, prompt)
    print(f"- x-transformers cache_kv=True with ALiBi + rotary xPos: {crash}")

    outputs: dict[str, torch.Tensor] = {}

    def run_ours() -> None:
        outputs["andromeda"] = ours.generate(prompt, new_tokens, temperature=0)

    def run_peer() -> None:
        outputs["x-transformers"] = wrapper.generate(prompt, new_tokens, temperature=0.0,
                                                     cache_kv=False)

    # Warm up on short runs: the peer's full run is the slow part of the whole benchmark.
    ours.generate(prompt, 2, temperature=0)
    wrapper.generate(prompt, 2, temperature=0.0, cache_kv=False)
    times = common.alternate({"andromeda": run_ours, "x-transformers": run_peer}, args.repeats,
                             warmup=0)
    agree = leading_agreement(outputs["andromeda"], outputs["x-transformers"])
    print(f"- greedy tokens identical to the peer's: first {agree} of {new_tokens}")
    ours_rate = new_tokens / common.median(times["andromeda"])
    peer_rate = new_tokens / common.median(times["x-transformers"])
    prefill = common.median([common.time_call(lambda: ours.generate(prompt, 1, temperature=0))
                             for _ in range(3)])
    step_ms = (common.median(times["andromeda"]) - prefill) / (new_tokens - 1) * 1e3
    print(f"- andromeda: prefill of {prompt_len} tokens {prefill * 1e3:.1f} ms, then "
          f"{step_ms:.2f} ms per token")
    print()
    print(common.markdown_table(
        ["decode, CPU fp32, batch 1", "prompt", "new", "andromeda tok/s", "x-transformers tok/s",
         "speed-up"],
        [["dim 512, depth 8, seed features", prompt_len, new_tokens, f"{ours_rate:.1f}",
          f"{peer_rate:.2f}", f"{ours_rate / peer_rate:.1f}x"]]))


SCHEMES = ("bf16", "bf16-packed", "bf16-rows", "int8", "int4")
CPU_ONLY = ("bf16-packed", "bf16-rows")


def read_bandwidth(gib: float, device: torch.device, repeats: int = 5) -> float:
    """Bytes/s at which this process streams memory: on CPU reading a `gib`-GiB tensor (best of
    `repeats` float32 sums: a bf16 sum converts every element and was compute-bound on an Intel
    Xeon, reading at 60% of the float32 sum's rate), on a GPU copying one (read + write counted)."""
    data = torch.ones(int(gib * common.GIB) // 2, dtype=torch.bfloat16, device=device)
    back_with_huge_pages([data])  # in the pages the weights have (`convert`)
    if device.type == "cpu":
        work, nbytes = data.view(torch.float32).sum, data.numel() * data.element_size()
    else:
        copy = torch.empty_like(data)
        work, nbytes = (lambda: copy.copy_(data)), 2 * data.numel() * data.element_size()
    work()
    return nbytes / min(common.time_call(work, device) for _ in range(repeats))


def streamed_bytes(net: nn.Module) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding tables (one row
    each), with a PackedLinear's packed weight and a Bf16RowsLinear's row tiles (attributes, not
    buffers) counted at their dense size."""
    total = sum(t.numel() * t.element_size() for name, t in [*net.named_parameters(), *net.named_buffers()]
                if not name.startswith(("token_emb.", "pos_emb.")))
    return total + sum(m.in_features * m.out_features * 2 for m in net.modules()
                       if isinstance(m, (PackedLinear, Bf16RowsLinear)))


def convert(net: nn.Module, scheme: str) -> nn.Module:
    """`net` in `scheme`, as `load_for_inference` prepares a model to decode: prepacked or
    quantized, its CPU weights in 2 MiB pages where Linux has them."""
    if scheme == "bf16-packed":
        net = prepack(net)
    elif scheme == "bf16-rows" and not use_bf16_rows(net):
        raise SystemExit("bf16-rows: the bf16 rows kernel does not run here (it needs AVX-512 BF16 and the ops "
                         "library, `andromeda.inference.native.bf16_rows_kernel`)")
    elif scheme in ("int8", "int4"):
        net = quantize(net, scheme, DEFAULT_GROUP_SIZE)
        pack_for_decoding(net)
    back_with_huge_pages(net)
    return net


class CpuUse:
    """CPU seconds the rest of the machine used over an interval: all busy time (/proc/stat) less
    this process's own."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def others_cores(self) -> float:
        busy, own, now = self._sample()
        return max(0.0, (busy - self.start[0]) - (own - self.start[1])) / (now - self.start[2])


def time_stream(net: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device, compile: bool = False
                ) -> tuple[float, list[float], list[int]]:
    """(seconds to the first token, seconds of each later step, the greedy tokens); `compile`: the
    decode steps through `generate(compile=True)`'s compiled step."""
    stamps, tokens = [time.perf_counter()], []
    for token in stream(net, prompt, new_tokens, temperature=0, compile=compile):
        common.synchronize(device)
        stamps.append(time.perf_counter())
        tokens.append(int(token[0]))
    steps = [b - a for a, b in itertools.pairwise(stamps[1:])]
    return stamps[1] - stamps[0], steps, tokens


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps freed blocks under 32 MB in its heap),
    so the decoding peak counts the converted model, not the bf16 weights it replaced."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def wait_until_idle(percent: float, timeout_s: float = 1200.0) -> float:
    """Wait until the CPUs have been at least `percent`% idle over 3 s (other work shares the
    machine); returns the idle share seen last."""
    deadline = time.monotonic() + timeout_s
    while True:
        use = CpuUse()
        time.sleep(3)
        idle = 100 * (1 - use.others_cores() / os.cpu_count())
        if idle >= percent or time.monotonic() > deadline:
            return idle
        log.info("waiting for the machine to quieten: %.0f%% idle", idle)


def run_scheme(args: argparse.Namespace) -> dict:
    """One scheme in this process (the child of `bench_big`): a JSON-able result."""
    scheme, device = args.child, torch.device(args.device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    net = build_transformer(Config.from_preset("default"), device=device, dtype=torch.bfloat16).eval()
    build_s = time.perf_counter() - start
    log.info("%s: built in %.1f s; converting", scheme, build_s)
    common.synchronize(device)
    start = time.perf_counter()
    net = convert(net, scheme)
    common.synchronize(device)
    convert_s = time.perf_counter() - start
    if device.type == "cpu":
        build_peak = common.high_water_rss_bytes()
        release_freed_memory()
        common.reset_peak_rss()
    else:
        build_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    if args.wait_idle:
        log.info("%s: machine %.0f%% idle; timing", scheme, wait_until_idle(args.wait_idle))
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, net.config.num_tokens, (1, args.big_prompt_len), generator=generator).to(device)
    compiled = compiles(args, scheme)
    time_stream(net, prompt, 3, device, compiled)  # warm-up: kernels chosen (compiled), buffers allocated
    steps, tokens, others = [], None, []
    for _ in range(args.repeats):
        use = CpuUse()
        _, run_steps, run_tokens = time_stream(net, prompt, args.big_new_tokens, device, compiled)
        others.append(use.others_cores())
        steps += run_steps
        tokens = tokens or run_tokens
    prefill_s = None
    if args.prefill_len:
        long_prompt = torch.randint(0, net.config.num_tokens, (1, args.prefill_len), generator=generator).to(device)
        use = CpuUse()
        prefills = [time_stream(net, long_prompt, 1, device)[0] for _ in range(args.prefill_repeats)]
        others.append(use.others_cores())
        log.info("%s: prefills of %d tokens: %s s", scheme, args.prefill_len, ", ".join(f"{t:.2f}" for t in prefills))
        prefill_s = min(prefills)  # the first also pays oneDNN's one-time setup for this shape
    run_peak = common.high_water_rss_bytes() if device.type == "cpu" else torch.cuda.max_memory_allocated(device)
    streamed = streamed_bytes(net)
    del net
    release_freed_memory()
    bandwidth = read_bandwidth(args.bandwidth_gib, device)
    return {"scheme": scheme, "tok_s": 1 / statistics.median(steps), "steps": len(steps), "streamed": streamed,
            "bandwidth": bandwidth, "prefill_s": prefill_s, "build_s": build_s, "convert_s": convert_s,
            "build_peak": build_peak, "run_peak": run_peak, "tokens": tokens, "others": max(others),
            "threads": torch.get_num_threads(), "compiled": compiled}


def compiles(args: argparse.Namespace, scheme: str) -> bool:
    """Whether `--compile` compiles this scheme's decode step: every scheme but prepacked bf16,
    which Inductor cannot lower (`generate --compile` unpacks it to plain bf16, the "bf16" scheme)."""
    return args.compile and scheme != "bf16-packed"


def bench_big(args: argparse.Namespace) -> None:
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise SystemExit(f"unknown scheme(s) {unknown}; choose from {', '.join(SCHEMES)}")
    if args.device == "cuda":
        skipped = [s for s in schemes if s in CPU_ONLY]
        if skipped:
            print(f"- skipped on cuda (CPU only): {', '.join(skipped)}")
        schemes = [s for s in schemes if s not in CPU_ONLY]
    forwarded = ["--device", args.device, "--seed", str(args.seed), "--repeats", str(args.repeats),
                 "--big-prompt-len", str(args.big_prompt_len), "--big-new-tokens", str(args.big_new_tokens),
                 "--prefill-len", str(args.prefill_len), "--prefill-repeats", str(args.prefill_repeats),
                 "--bandwidth-gib", str(args.bandwidth_gib), "--wait-idle", str(args.wait_idle)]
    if args.threads is not None:
        forwarded += ["--threads", str(args.threads)]
    if args.compile:
        forwarded.append("--compile")
    if args.verbose:
        forwarded.append("--verbose")
    results = []
    for scheme in schemes:
        log.info("%s: starting", scheme)
        run = common.run_capped(common.child_command(__file__, "--child", scheme, *forwarded),
                                cap_bytes=int(args.max_rss_gb * 1e9))
        if args.verbose:
            sys.stderr.write(run.stderr)  # the scheme's own progress lines
        result = run.last_json()
        if result is None:
            print(f"- {scheme} failed ({run.killed or f'exit code {run.returncode}'}): {run.stderr[-2000:]}")
            continue
        log.info("%s: %.2f tok/s", scheme, result["tok_s"])
        results.append(result)
    if not results:
        return
    memory = "peak RSS" if args.device == "cpu" else "peak allocated"
    config = Config.from_preset("default")
    print(f"- model: 2.5 B default (dim {config.dim}, depth {config.depth}, vocabulary {config.num_tokens}), "
          f"batch 1, greedy; {args.big_prompt_len}-token prompt, {args.big_new_tokens} new tokens x "
          f"{args.repeats} runs, tok/s = 1 / median step; {results[0]['threads']} threads")
    reference = next((r["tokens"] for r in results if r["scheme"] == "bf16"), None)
    rows = []
    for r in results:
        bound = r["bandwidth"] / r["streamed"]
        same = "" if reference is None else f"{leading_agreement(torch.tensor(r['tokens']), torch.tensor(reference))}/{len(reference)}"
        rows.append([r["scheme"] + (", compiled" if r["compiled"] else ""), f"{r['tok_s']:.2f}", f"{r['streamed'] / 1e9:.2f}", f"{r['bandwidth'] / 1e9:.1f}",
                     f"{bound:.2f}", f"**{r['tok_s'] / bound:.0%}**",
                     "-" if r["prefill_s"] is None else f"{r['prefill_s']:.2f}",
                     "-" if r["scheme"] == "bf16" else f"{r['convert_s']:.1f}",
                     f"{r['build_peak'] / 1e9:.2f}", f"{r['run_peak'] / 1e9:.2f}", same, f"{r['others']:.2f}"])
    print()
    print(common.markdown_table(
        ["scheme", "tok/s", "GB streamed / token", "bandwidth GB/s", "bound tok/s", "of bound",
         f"prefill {args.prefill_len} s (best of {args.prefill_repeats})", "convert s", f"{memory} build+convert GB", f"{memory} decode GB",
         "greedy = bf16", "other load (cores)"], rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="(a) with a 64-token prompt, 16 new tokens")
    parser.add_argument("--big", action="store_true",
                        help="(b): the 2.5 B model per weight scheme against the bandwidth bound")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of each side in (a); decoding runs per scheme in (b)")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help=f"(b): comma-separated subset of {', '.join(SCHEMES)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(b): where the model runs")
    parser.add_argument("--big-prompt-len", type=int, default=16)
    parser.add_argument("--big-new-tokens", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=1024, help="(b): prompt length timed for prefill; 0 skips")
    parser.add_argument("--prefill-repeats", type=int, default=2, help="(b): prefills per scheme (best is shown)")
    parser.add_argument("--bandwidth-gib", type=float, default=2.0, help="size of the bandwidth probe")
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="(b): kill a scheme's process past this RSS")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="(b): before timing each scheme wait until the CPUs are this %% idle (0: don't wait)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true",
                        help="(b): decode through generate(compile=True)'s compiled step (not bf16-packed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    parser.add_argument("--child", choices=SCHEMES, help=argparse.SUPPRESS)  # (b)'s per-scheme process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_scheme(args)))
        return 0
    print(f"- machine: {common.environment()}")
    if args.big:
        bench_big(args)
    else:
        bench_peer(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
