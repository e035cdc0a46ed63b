"""Where one decode step's time goes, per weight scheme (issue #25, item 1).

Batch-1 decoding should be bound by reading the weights; this says what else the step spends
its time on before a fix is chosen. For each scheme (`bench_decode`'s: bf16 through F.linear,
bf16 prepacked for oneDNN, int8, int4 group 128) the same seeded bf16 model is built and
converted, decodes greedily through `inference.generate.stream` (the real loop), and after a
warm-up `torch.profiler` records `--steps` steps at a context of about `--prompt-len` tokens,
of which the fastest is shown (outside load only adds time, and a preemption of several ms lands
on whichever op was running).

Each operator the step launches from Python (a top-level ATen op) is charged to the innermost
labelled region around it; the regions come from forward hooks on the modules and from wrappers
around a few functions, applied from outside for the profile only:

    weight products   every Linear (nn.Linear, PackedLinear, Bf16RowsLinear, Int8Linear, Int4Linear), logits
                      included, and the matrix-product ops by name wherever they run (the
                      feed-forward calls F.linear on its weights, not its Linear modules)
    attention         `attend` (the bias and SDPA), the KV cache write, and the rest of Attention
                      (views, transposes, the QK-norm scales' products)
    norms             LayerNorm, QK-norm (`l2_normalize`)
    rotary            `apply_rotary` and the xPos tables
    GELU              the feed-forward less its products
    residual, embedding, model other (per-forward inputs), sampling, loop other
    Python/dispatch   the step's time outside every top-level op: Python, hooks, op dispatch

Then the top operators by name, per scheme. OpenMP barriers and threads waiting inside an
operator count as that operator (the profiler sees one thread launch it). The profiler's own
overhead inflates the small ops and Python/dispatch: the "unprofiled ms/step" column is the
median and the best step without it. With `--compile` (the default; `--no-compile` skips it)
each scheme also decodes through `generate(compile=True)`'s compiled fixed-shape step, timed
and profiled by what its graph runs (hooks and wrappers off; Inductor's C++ kernels built to
record themselves): the weight products (int8/int4: the `andromeda::` kernel ops), SDPA,
Inductor's fused kernels, other ATen ops, the ops outside the graph, and the rest (Python, the
guards, the graph's wrapper); or the reason it fails. Its attention reads the whole cache,
whose capacity is the context plus the steps rounded up to 256: ~256 columns here.

    python benchmarks/profile_decode.py --small                  # hidden 512, 4 layers: ~2 min
    python benchmarks/profile_decode.py                          # the 2.5 B default: ~15 min, ~8 GB RAM
    python benchmarks/profile_decode.py --schemes int8 --no-compile --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import bench_decode
import common
from andromeda.inference.bf16_linear import Bf16RowsLinear
from andromeda.inference.packed import PackedLinear
from andromeda.inference.quantized_linear import Int4Linear, Int8Linear
from andromeda.model import attention as attention_module
from andromeda.model import build_transformer
from andromeda.model import cache as cache_module
from andromeda.model import transformer as transformer_module
from bench_llama_cpp import our_config  # the shapes both scripts measure

log = logging.getLogger("profile_decode")
# The module, not the function `andromeda.inference.generate` that the package exports.
generate_module = importlib.import_module("andromeda.inference.generate")

PREFIX = "§"  # marks our labelled regions among the profiler's events
STEP = "step"
WEIGHTS = "weight products"
WEIGHT_OPS = {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "mkldnn::_linear_pointwise",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int4pack_mm",
              "andromeda::int8_rows", "andromeda::int4_rows",  # the VNNI kernels (inference/native.py)
              "andromeda::bf16_rows"}  # the bf16 rows kernel
# Innermost label wins: a Linear inside Attention is a weight product, the rest of Attention is
# "attention".
MODULE_LABELS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.Linear, PackedLinear, Bf16RowsLinear, Int8Linear, Int4Linear), WEIGHTS),
    ((nn.LayerNorm,), "norms"),
    ((nn.Embedding,), "embedding"),
    ((attention_module.Attention,), "attention"),
    ((transformer_module.FeedForward,), "GELU"),
    ((transformer_module.Block,), "residual"),
    ((transformer_module.Transformer,), "model other"),
)
# (module, function name, label): wrapped while profiling, where the name exists.
FUNCTION_LABELS = (
    (attention_module, "attend", "attention"),
    (attention_module, "l2_normalize", "norms"),
    (attention_module, "apply_rotary", "rotary"),
    (transformer_module, "xpos_tables", "rotary"),
    (generate_module, "sample", "sampling"),
)
METHOD_LABELS = ((cache_module.CacheStep, "write", "attention"),)


def module_label(module: nn.Module) -> str | None:
    return next((label for types, label in MODULE_LABELS if isinstance(module, types)), None)


def labelled(fn: Callable, label: str) -> Callable:
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + label):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def labels(net: nn.Module) -> Iterator[None]:
    """Label the regions of a decode step for the profiler, from outside the model; undone after."""
    handles, open_ranges = [], defaultdict(list)
    for module in net.modules():
        label = module_label(module)
        if label is None:
            continue

        def enter(mod, _args, label=label):
            scope = record_function(PREFIX + label)
            scope.__enter__()
            open_ranges[id(mod)].append(scope)

        def leave(mod, _args, _out):
            open_ranges[id(mod)].pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    patched = [(owner, name, getattr(owner, name), label) for owner, name, label in (*FUNCTION_LABELS, *METHOD_LABELS)
               if hasattr(owner, name)]
    for owner, name, original, label in patched:
        setattr(owner, name, labelled(original, label))
    try:
        yield
    finally:
        for owner, name, original, _ in patched:
            setattr(owner, name, original)
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- measuring


def decoder(net: nn.Module, args: argparse.Namespace, compile: bool) -> Iterator[torch.Tensor]:
    """An endless-enough greedy stream whose next() is one decode step (after the prefill)."""
    prompt = torch.randint(0, net.config.num_tokens, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))
    total = args.warmup + 2 * args.steps + args.timed_steps + 2
    stream = generate_module.stream(net, prompt, total, temperature=0, compile=compile)
    next(stream)  # the prefill and the first token
    return stream


def step_times(stream: Iterator[torch.Tensor], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        next(stream)
        times.append(time.perf_counter() - start)
    return times


def profile_steps(stream: Iterator[torch.Tensor], steps: int) -> list:
    """The profiler's events over `steps` decode steps, each inside a STEP region."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(PREFIX + STEP):
                next(stream)
    return prof.events()


def is_label(event) -> bool:
    return event.name.startswith(PREFIX)


def step_of(event):
    """The STEP region an event ran in."""
    while event is not None and event.name != PREFIX + STEP:
        event = event.cpu_parent
    return event


def region(op) -> str:
    """What a top-level op is charged to: a weight product by its name wherever it runs (the
    feed-forward calls F.linear on its weights, not its Linear modules), else its region."""
    if op.name in WEIGHT_OPS:
        return WEIGHTS
    label = op.cpu_parent.name[len(PREFIX):]
    return "loop other" if label == STEP else label


def breakdown(events) -> dict:
    """The fastest profiled step: its ms, and ms by region and by (region, op name) of its
    top-level ops (those whose parent is a label). One step, not a sum or a median: on a shared
    machine a preemption (a scheduler slice of several ms) lands on whichever op was running,
    and outside load only ever adds time."""
    steps = {id(e): (e, defaultdict(float), defaultdict(float)) for e in events if e.name == PREFIX + STEP}
    for event in events:
        parent = event.cpu_parent
        if is_label(event) or parent is None or not is_label(parent):
            continue
        _, by_region, by_op = steps[id(step_of(event))]
        where = region(event)
        by_region[where] += event.cpu_time_total / 1e3
        by_op[(where, event.name)] += event.cpu_time_total / 1e3
    ranked = sorted(steps.values(), key=lambda step: step[0].cpu_time_total)
    step, by_region, by_op = ranked[0]
    step_ms = step.cpu_time_total / 1e3
    by_region["Python/dispatch"] = step_ms - sum(by_region.values())
    return {"step_ms": step_ms, "by_label": dict(by_region), "by_op": dict(by_op),
            "profiled_ms": [s[0].cpu_time_total / 1e3 for s in ranked]}


COMPILED_GRAPH = "## Call CompiledFxGraph"  # the profiler's record around a compiled graph's run
COMPILED_CATEGORIES = (WEIGHTS, "attention (SDPA)", "fused kernels", "other graph ops", "outside the graph",
                       "Python/dispatch")


def compiled_breakdown(events) -> dict:
    """The fastest profiled compiled step: ms by kind of the ops the compiled graph runs (its
    direct children: the products by name, SDPA, Inductor's fused C++ kernels, other ATen ops),
    the top-level ops outside it (the loop's bookkeeping and sampling), and the rest: Python,
    the guards and the graph's wrapper."""
    steps = {id(e): (e, defaultdict(float), defaultdict(float)) for e in events if e.name == PREFIX + STEP}
    for event in events:
        parent = event.cpu_parent
        if parent is None or is_label(event):
            continue
        if parent.name.startswith(COMPILED_GRAPH):
            # SDPA: aten::..., or aoti_torch_cpu_... from the C++ wrapper of a compiled CPU step
            kind = (WEIGHTS if event.name in WEIGHT_OPS else "fused kernels" if event.name.startswith("graph_")
                    else "attention (SDPA)" if "scaled_dot_product" in event.name else "other graph ops")
        elif parent.name == PREFIX + STEP and not event.name.startswith("Torch-Compiled Region"):
            kind = "outside the graph"
        else:
            continue
        _, by_kind, by_op = steps[id(step_of(event))]
        by_kind[kind] += event.cpu_time_total / 1e3
        by_op[(kind, event.name[:60])] += event.cpu_time_total / 1e3
    step, by_kind, by_op = min(steps.values(), key=lambda step: step[0].cpu_time_total)
    step_ms = step.cpu_time_total / 1e3
    by_kind["Python/dispatch"] = step_ms - sum(by_kind.values())
    return {"step_ms": step_ms, "by_label": dict(by_kind), "by_op": dict(by_op)}


def measure(net: nn.Module, args: argparse.Namespace, compile: bool) -> dict:
    """Unprofiled step times, then a profile, of one stream of `net`. Compiled, Inductor's C++
    kernels are built to record themselves in a running profiler (a check per kernel otherwise)."""
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}) if compile else contextlib.nullcontext():
        stream = decoder(net, args, compile)
        step_times(stream, args.warmup)
        times = step_times(stream, args.timed_steps)
        if compile:
            events = profile_steps(stream, args.steps)
        else:
            with labels(net):
                events = profile_steps(stream, args.steps)
    stream.close()
    return {"unprofiled_ms": statistics.median(times) * 1e3, "best_ms": min(times) * 1e3,
            **(compiled_breakdown(events) if compile else breakdown(events))}


def profile_scheme(scheme: str, args: argparse.Namespace) -> dict:
    if args.wait_idle:
        log.info("%s: machine %.0f%% idle", scheme, bench_decode.wait_until_idle(args.wait_idle))
    torch.manual_seed(args.seed)
    config = our_config(args.small, args.layers)
    net = bench_decode.convert(build_transformer(config, dtype=torch.bfloat16).eval(), scheme)
    bench_decode.release_freed_memory()
    results = {"scheme": scheme, "streamed": bench_decode.streamed_bytes(net), "eager": measure(net, args, False)}
    log.info("%s eager: %.1f ms/step", scheme, results["eager"]["unprofiled_ms"])
    if args.compile:
        start = time.perf_counter()
        try:
            results["compiled"] = measure(net, args, True)
            log.info("%s compiled: %.1f ms/step (%.0f s with compiling)", scheme,
                     results["compiled"]["unprofiled_ms"], time.perf_counter() - start)
        except Exception as error:  # reported, not handled: the failure is the finding
            results["compiled_error"] = compile_failure(error)
        torch._dynamo.reset()  # the next scheme's model compiles afresh, and this one is freed
    del net
    bench_decode.release_freed_memory()
    return results


# ----------------------------------------------------------------------------- reporting

CATEGORIES = (WEIGHTS, "attention", "norms", "rotary", "GELU", "residual", "sampling", "other", "Python/dispatch")
OTHER = ("embedding", "model other", "loop other")  # summed as "other" in the table


def category_ms(by_label: dict[str, float], category: str) -> float:
    return sum(by_label.get(label, 0.0) for label in OTHER) if category == "other" else by_label.get(category, 0.0)


def compile_failure(error: Exception) -> str:
    """One line: the error, dynamo's reason where it gives one, and the user code it stopped at."""
    lines = str(error).splitlines()
    reason = next((line.split(":", 1)[1].strip() for line in lines if "Developer debug context" in line), "")
    frames = [re.search(r'File "(?:.*/src/)?([^"]+)", line (\d+), in (\w+)', line) for line in lines]
    frames = [frame for frame in frames if frame]
    where = f"{frames[-1][1]}:{frames[-1][2]} ({frames[-1][3]})" if frames else ""
    return " ".join(part for part in (f"{type(error).__name__}: {lines[0][:120] if lines else ''}", reason,
                                      f"at {where}" if where else "") if part)


def share(ms: float, total: float) -> str:
    return f"{ms:.2f} ({ms / total:.0%})"


def category_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        eager = r["eager"]
        rows.append([r["scheme"], f"{r['streamed'] / 1e9:.3f}", f"{eager['unprofiled_ms']:.2f}; {eager['best_ms']:.2f}",
                     f"{eager['step_ms']:.2f}",
                     *(share(category_ms(eager["by_label"], c), eager["step_ms"]) for c in CATEGORIES),
                     f"{r['compiled']['unprofiled_ms']:.2f}; {r['compiled']['best_ms']:.2f}" if "compiled" in r else "failed" if "compiled_error" in r else "-"])
    return common.markdown_table(["scheme", "GB read/token", "unprofiled ms/step (median; best)",
                                  "profiled ms/step (fastest)", *(f"{c} ms (share)" for c in CATEGORIES),
                                  "compiled ms/step (median; best)"], rows)


def compiled_table(results: list[dict]) -> str:
    rows = [[r["scheme"], f"{r['compiled']['unprofiled_ms']:.2f}; {r['compiled']['best_ms']:.2f}",
             f"{r['compiled']['step_ms']:.2f}",
             *(share(r["compiled"]["by_label"].get(c, 0.0), r["compiled"]["step_ms"]) for c in COMPILED_CATEGORIES)]
            for r in results if "compiled" in r]
    return common.markdown_table(["scheme", "compiled ms/step (median; best)", "profiled ms/step (fastest)",
                                  *(f"{c} ms (share)" for c in COMPILED_CATEGORIES)], rows)


def op_table(result: dict, key: str, top: int) -> str:
    run = result[key]
    ops = sorted(run["by_op"].items(), key=lambda item: -item[1])[:top]
    rows = [[label, name, share(ms, run["step_ms"])] for (label, name), ms in ops]
    return common.markdown_table(["region", "op", "ms/step (share of the profiled step)"], rows)


def report(results: list[dict], args: argparse.Namespace) -> None:
    config = our_config(args.small, args.layers)
    print(f"- model: dim {config.dim}, depth {config.depth}, vocabulary {config.num_tokens}; batch 1, greedy, "
          f"context ~{args.prompt_len} tokens; the fastest of {args.steps} profiled steps, after "
          f"{args.timed_steps} unprofiled; {torch.get_num_threads()} threads")
    print()
    print(category_table(results))
    if any("compiled" in r for r in results):
        print("\nThe compiled step, by what its graph runs:\n")
        print(compiled_table(results))
    for r in results:
        if "compiled_error" in r:
            print(f"- {r['scheme']}: the compiled step failed: {r['compiled_error']}")
    for r in results:
        for key in ("eager", "compiled"):
            if key in r:
                print(f"\n**{r['scheme']}, {key}**: top ops\n")
                print(op_table(r, key, args.top))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="hidden 512, 4 layers")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--schemes", default=",".join(bench_decode.SCHEMES),
                        help=f"comma-separated subset of {', '.join(bench_decode.SCHEMES)}")
    parser.add_argument("--prompt-len", type=int, default=32, help="context the profiled steps read")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--timed-steps", type=int, default=8, help="unprofiled steps timed")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (the fastest is shown)")
    parser.add_argument("--top", type=int, default=10, help="ops listed per scheme")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled step (generate --compile)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="before each scheme wait until the CPUs are this %% idle (0: don't wait)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)
    unknown = [s for s in args.schemes.split(",") if s not in bench_decode.SCHEMES]
    if unknown:
        parser.error(f"unknown scheme(s) {unknown}; choose from {', '.join(bench_decode.SCHEMES)}")
    for name in ("prompt_len", "timed_steps", "steps", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"- machine: {common.environment()}")
    results = [profile_scheme(scheme, args) for scheme in args.schemes.split(",")]
    report(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
