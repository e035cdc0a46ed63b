"""Training throughput: tokens/s per optimizer step (forward + backward + AdamW) of Andromeda
against x-transformers 2.31.10 with the same hyperparameters and the same weights, in one
process, interleaved A, B, A, B; plus model FLOP utilisation against a measured matmul peak.

    python benchmarks/bench_train.py              # dim 512, depth 8, 4 x 1024 tokens, fp32 + bf16
    python benchmarks/bench_train.py --quick      # depth 2, 2 x 256 tokens: a smoke test
    python benchmarks/bench_train.py --compile    # also Andromeda compiled each block, and whole
    python benchmarks/bench_train.py --profile    # also the top ops of one step of each model, the step by category
                                                  # and the ceiling the ops outside the products leave
    python benchmarks/bench_train.py --no-peer --modes bf16 --without norm-kernel   # a CPU kernel's worth
    python benchmarks/bench_train.py --device cuda --config default --seq-len 8192 --batch 1 \
        --no-peer --peak-tflops 989               # GPU MFU of the seed model (H100 bf16 dense)
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
import resource
import sys
import time
from collections.abc import Callable

from andromeda.cli import allocate_with_huge_pages

# As the `andromeda` command does, before PyTorch allocates anything (its allocator reads the
# setting once, and the imports below already allocate); THP_MEM_ALLOC_ENABLE=0 opts out.
HUGE_PAGES = allocate_with_huge_pages(os.environ)

import torch  # noqa: E402 - after the allocator's setting
from torch import Tensor, nn

import common
from andromeda import Andromeda, Config
from andromeda.config import PRESETS
from andromeda.model import Transformer
from andromeda.model.transformer import LayerNorm
from andromeda.parallel.parallelize import TRAIN_COMPILE_SCOPE, apply_compile
from andromeda.train.attention_kernel import use_attention_kernel
from andromeda.train.heap import keep_freed_memory
from andromeda.train.loss_kernel import use_loss_kernel
from andromeda.train.norm_kernel import use_norm_kernel
from andromeda.train.transpose_kernel import use_transpose_kernel

log = logging.getLogger("bench_train")

MODES = {"fp32": None, "bf16": torch.bfloat16}  # mode -> autocast dtype (None: plain fp32)


def bench_config(args: argparse.Namespace) -> Config:
    """The issue's training setting (seed features at dim 512), or a named preset."""
    if args.config is not None:
        max_len = max(PRESETS[args.config].get("max_seq_len", Config.max_seq_len), args.seq_len)
        depth = {} if args.depth is None else {"depth": args.depth}  # fewer layers, same width
        return Config.from_preset(args.config, max_seq_len=max_len, **depth)
    return Config(num_tokens=50432, max_seq_len=args.seq_len, dim=512, depth=args.depth or 8, dim_head=64,
                  heads=8, alibi_num_heads=4, attn_kv_heads=2)


class TrainStep:
    """One training step of `loss_model` on a fixed batch: zero grads, loss, backward, AdamW.

    Both models get the same optimizer implementation; by default PyTorch's fused AdamW, which on
    CPU is ~3.5x faster than the default per-parameter loop (0.3 s vs 1.07 s a step for these
    74 M parameters on 2 cores), so the comparison is of the models, not of the optimizer.
    """

    OPTIMIZERS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}

    def __init__(
        self, name: str, loss_model: nn.Module, tokens: Tensor, device: torch.device,
        dtype: torch.dtype | None, args: argparse.Namespace,
    ) -> None:
        self.name, self.loss_model, self.tokens = name, loss_model, tokens
        self.device, self.dtype = device, dtype
        self.optimizer = torch.optim.AdamW(loss_model.parameters(), lr=args.lr,
                                           **self.OPTIMIZERS[args.optimizer])
        self.first_loss: float | None = None  # same weights, same batch: first losses agree
        # The process's CPU seconds per call: at one thread, the time the step had the core,
        # which the other jobs of a shared machine lengthen far less than the wall time.
        self.cpu_seconds: list[float] = []
        self.system_seconds: list[float] = []  # of those, the kernel's (page faults, mostly)

    def __call__(self) -> Tensor:
        start, system = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
        try:
            return self._step()
        finally:
            self.cpu_seconds.append(time.process_time() - start)
            self.system_seconds.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - system)

    def _step(self) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with common.autocast_context(self.device, self.dtype):
            loss = self.loss_model(self.tokens)
        loss.backward()
        self.optimizer.step()
        if self.first_loss is None:
            self.first_loss = loss.item()
        return loss


def _without(model: nn.Module, kind: type[nn.Module], attribute: str) -> None:
    for module in model.modules():
        if isinstance(module, kind):
            setattr(module, attribute, None)


# --without NAME: a copy of Andromeda without one CPU kernel, its steps interleaved with the others'
# (what the kernel is worth to a step, in one sitting). name -> (label, what the copy loses).
ABLATIONS: dict[str, tuple[str, Callable[[nn.Module], None]]] = {
    "loss-kernel": ("the loss kernel", lambda m: _without(m, Transformer, "softmax_cross_entropy")),
    "attention-kernel": ("the attention kernels", lambda m: (_without(m, Transformer, "causal_attention"),
                                                           _without(m, Transformer, "attention_prologue"))),
    "attention-prologue": ("the attention prologue", lambda m: _without(m, Transformer, "attention_prologue")),
    "norm-kernel": ("the LayerNorm kernel", lambda m: _without(m, LayerNorm, "to_bf16")),
    "transpose-kernel": ("the transpose kernel", lambda m: _without(m, Transformer, "transpose")),
}


def contestants_for(
    config: Config, mode: str, tokens: Tensor, args: argparse.Namespace, device: torch.device
) -> list[TrainStep]:
    """Fresh models with equal weights and fresh optimizers, so each mode starts alike."""
    dtype = MODES[mode]
    if args.no_peer:
        torch.manual_seed(args.seed)
        ours = Andromeda.from_config(config, device=device)
        peer = None
    else:
        ours, peer = common.matched_pair(config, device=device, seed=args.seed)
    if device.type == "cpu" and not args.no_loss_kernel:  # as `andromeda train` does on the CPU
        use_loss_kernel(ours)
    if device.type == "cpu" and not args.no_attention_kernel:
        use_attention_kernel(ours)
        if args.no_attention_prologue:
            for module in ours.modules():
                if isinstance(module, Transformer):
                    module.attention_prologue = None
    if device.type == "cpu" and not args.no_norm_kernel:
        use_norm_kernel(ours)
    if device.type == "cpu" and not args.no_transpose_kernel:
        use_transpose_kernel(ours)
    result = [TrainStep("andromeda", ours, tokens, device, dtype, args)]
    if peer is not None:
        peer_loss = common.x_transformers_loss_model(peer)
        result.append(TrainStep("x-transformers", peer_loss, tokens, device, dtype, args))
    for name in args.without:
        label, remove = ABLATIONS[name]
        ablated = copy.deepcopy(ours)
        remove(ablated)
        result.append(TrainStep(f"andromeda without {label}", ablated, tokens, device, dtype, args))
    if args.compile:  # both scopes `andromeda train --compile` chooses from, applied as it applies them
        for scope, label in (("blocks", "each block compiled"), ("model", "whole model compiled")):
            compiled = copy.deepcopy(ours)
            apply_compile(compiled.Andromeda, scope)
            name = f"andromeda, {label}" + (" (train --compile)" if scope == TRAIN_COMPILE_SCOPE else "")
            result.append(TrainStep(name, compiled, tokens, device, dtype, args))
    return result


PROBE = "matmul peak probe"  # run_mode's extra entry in the alternation


def run_mode(
    config: Config, mode: str, args: argparse.Namespace, device: torch.device, peak_of: Callable[[], float],
    probe: Callable[[], float] | None = None,
) -> tuple[list[list[object]], list[TrainStep], list[str]]:
    """Measure one precision mode; returns its table rows, its contestants and notes on them.
    `peak_of()`, called after the steps, gives the FLOP/s the MFU is against. `probe()`, where
    given, measures the matmul peak again after every round of the alternation (and after the warmup calls;
    after every step where one model is measured), and the notes give each contestant's MFU
    against the peak measured beside each of its steps (`common.peaks_beside`): on a VM whose speed
    swings within minutes, a peak measured before and after all the steps may not be the one
    the steps ran at."""
    torch.manual_seed(args.seed)
    tokens = torch.randint(0, config.num_tokens, (args.batch, args.seq_len + 1), device=device)
    contestants = contestants_for(config, mode, tokens, args, device)
    probes: list[float] = []

    def with_probe(steps: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
        probes.clear()
        return steps if probe is None else steps | {PROBE: lambda: probes.append(probe())}

    steps = with_probe({c.name: c for c in contestants})
    try:
        for c in contestants:
            if "compile" in c.name:  # compile, then the recompile a guard on the first call's
                c()                  # state may trigger: neither belongs in the timings
        wall = common.alternate(steps, args.steps, warmup=args.warmup, device=device)
    except Exception as err:  # noqa: BLE001 - an optional contestant (compile) may fail
        if not args.compile:
            raise
        log.warning("torch.compile failed (%s: %s); measuring without it", type(err).__name__, err)
        print(f"\ntorch.compile failed in {mode}: {type(err).__name__}: {str(err).splitlines()[0]}")
        contestants = [c for c in contestants if "compile" not in c.name]
        steps = with_probe({c.name: c for c in contestants})
        wall = common.alternate(steps, args.steps, warmup=0, device=device)
    wall.pop(PROBE, None)
    peak = peak_of()
    tokens_per_step = args.batch * args.seq_len
    flops_per_token = common.model_flops_per_token(config, args.seq_len)
    peer = "x-transformers" if "x-transformers" in wall else None
    rows = []
    eager_cpu = min(contestants[0].cpu_seconds[-args.steps:])  # plain Andromeda, eager, comes first
    for c in contestants:
        seconds, best = common.median(wall[c.name]), min(wall[c.name])
        cpu = min(c.cpu_seconds[-args.steps:])  # the timed calls are the last ones
        rate = tokens_per_step / seconds
        ratios = "-"
        if peer is not None:  # speed ratios: the peer's time over ours
            ratios = f"{common.median(wall[peer]) / seconds:.2f}x / {min(wall[peer]) / best:.2f}x"
        mfu = flops_per_token * rate / peak
        rows.append([mode, c.name, f"{seconds:.2f} s", f"{best:.2f} s", f"{rate:,.0f}",
                     f"{100 * mfu:.1f}%", f"{cpu:.2f} s ({eager_cpu / cpu:.2f}x; MFU "
                     f"{100 * flops_per_token * tokens_per_step / cpu / peak:.1f}%)", ratios,
                     f"{c.first_loss:.5f}" if c.first_loss is not None else "-"])
    notes = []
    if probes:
        beside = common.peaks_beside(probes, args.steps)
        for c in contestants:
            flops = flops_per_token * tokens_per_step
            by_wall = common.median([flops / (seconds * p) for seconds, p in zip(wall[c.name], beside)])
            by_cpu = max(flops / (seconds * p) for seconds, p in zip(c.cpu_seconds[-args.steps:], beside))
            notes.append(f"{mode} {c.name}: MFU {100 * by_wall:.1f}% (median step), {100 * by_cpu:.1f}% by CPU "
                         f"time (best step)")
        notes.insert(0, f"{mode}: the peak beside each step, {min(beside) / 1e9:,.0f}-{max(beside) / 1e9:,.0f} GFLOP/s")
    return rows, contestants, notes


# Where a step's time goes, by op name (first match, any case; self time, so nothing counts twice). SDPA's own
# products (bmm) count as matrix products.
STEP_CATEGORIES = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention (kernels or SDPA)",
     ("causal_attention", "attention_prologue", "scaled_dot_product", "flash_attention")),
    ("loss softmax", ("softmax_cross_entropy", "log_softmax", "nll_loss")),
    ("optimizer", ("adam",)),
    ("conversions and copies", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
                                "andromeda::transpose")),
    ("norms", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("adds, multiplies, fills", ("aten::add", "aten::mul", "aten::fill_", "aten::zero_", "aten::sum")),
)


def step_breakdown(averages) -> dict[str, float]:
    """Self CPU microseconds per category (STEP_CATEGORIES, then "other") from a profile's key averages."""
    spent = {name: 0.0 for name, _ in STEP_CATEGORIES} | {"other": 0.0}
    for event in averages:
        key = event.key.lower()
        category = next((name for name, keys in STEP_CATEGORIES if any(k.lower() in key for k in keys)), "other")
        spent[category] += event.self_cpu_time_total
    return spent


def profile_step(contestant: TrainStep, mode: str, device: torch.device, config: Config,
                 args: argparse.Namespace) -> None:
    """Print the ops that took the most time in one training step, and the step by category."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        contestant()
        common.synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    print(f"\nTop ops, one {mode} step of {contestant.name}:\n```")
    print(averages.table(sort_by=sort_by, row_limit=15, max_name_column_width=50))
    print("```")
    if device.type == "cpu":
        spent = step_breakdown(averages)
        total = sum(spent.values())
        print(f"\nThe same step by category of op (self CPU time, {total / 1e6:.2f} s in all):\n")
        print(common.markdown_table(["ops", "time", "share"], [[name, f"{us / 1e3:,.0f} ms", f"{100 * us / total:.1f}%"]
                                                               for name, us in spent.items()]))
        if contestant.name == "andromeda" and spent["matrix products"]:
            # The products' own rate in this step, and the step's model FLOP/s against it: a utilisation
            # that a VM's peak moving between measurements does not move.
            tokens = args.batch * args.seq_len
            products = 6 * common.matmul_parameters(config) * tokens / (spent["matrix products"] / 1e6)
            step = common.model_flops_per_token(config, args.seq_len) * tokens / (total / 1e6)
            print(f"\nIn this step the matrix products (6 N FLOPs a token) ran at {products / 1e9:,.0f} GFLOP/s; "
                  f"the step's model FLOPs over its self CPU time, {step / 1e9:,.0f} GFLOP/s, are "
                  f"**{100 * step / products:.1f}%** of that rate.")
            # What the rest of the step leaves room for: the same ratio were every op outside these
            # categories free (the optimizer's fp32 AdamW reads and writes 28 bytes a parameter a step,
            # at the machine's bandwidth already; the products and attention are the model's FLOPs).
            work = spent["matrix products"] + spent["attention (kernels or SDPA)"]
            ceilings = [(label, work + extra) for label, extra in (
                ("the products and attention", 0.0), ("the products, attention and the optimizer", spent["optimizer"]))]
            print("Were every other op free, that ratio would be " + "; ".join(
                f"{100 * step * total / us / products:.1f}% with only {label} taking time" for label, us in ceilings)
                + f" (the other ops take {100 * (total - ceilings[-1][1]) / total:.1f}% of this step).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="depth 2, 2 x 256 tokens, 2 steps")
    parser.add_argument("--config", choices=sorted(PRESETS), default=None,
                        help="measure a preset instead of the dim-512 training setting")
    parser.add_argument("--depth", type=int, default=None,
                        help="layers (default 8; with --config, the preset's): e.g. --config default "
                             "--depth 2 is the 2.5 B default's width in two layers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=None,
                        help="precisions (default: fp32 and bf16 autocast on CPU, bf16 on CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: PyTorch's); 1 is steadier on a shared machine")
    parser.add_argument("--no-peer", action="store_true", help="measure Andromeda only")
    parser.add_argument("--compile", action="store_true",
                        help="also Andromeda under torch.compile, each block and the whole model")
    parser.add_argument("--profile", action="store_true",
                        help="print the top ops of one step each, and the step by category of op")
    parser.add_argument("--no-loss-kernel", action="store_true",
                        help="the loss's softmax in PyTorch's ops (as before `train.loss_kernel`), not its C kernel")
    parser.add_argument("--no-attention-kernel", action="store_true",
                        help="attention by PyTorch's SDPA (as before `train.attention_kernel`), not its C kernel")
    parser.add_argument("--without", nargs="+", choices=sorted(ABLATIONS), default=[],
                        help="also a copy of Andromeda without each named CPU kernel, steps interleaved "
                             "(the kernel's effect on a step in one sitting; a copy of the model each)")
    parser.add_argument("--no-norm-kernel", action="store_true",
                        help="keep PyTorch's LayerNorm and autocast's conversions around it")
    parser.add_argument("--no-transpose-kernel", action="store_true",
                        help="the weight gradients' transposed copies by PyTorch's ops, not `train.transpose_kernel`")
    parser.add_argument("--no-attention-prologue", action="store_true",
                        help="QK-norm and rotary xPos in PyTorch's ops (as before `attention_kernel.attention_prologue`), "
                             "not its C kernel")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: the process keeps freed memory for the next step, as `andromeda train "
                             "--keep-freed-memory` (train/heap.py); by default glibc gives large freed buffers back")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: the datasheet's dense bf16 peak for "
                             "known GPUs, else the measured matmul peak)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--optimizer", choices=("fused", "foreach", "loop"), default="fused",
                        help="the AdamW implementation both models use (default: fused)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="log each step to stderr")
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.seq_len, args.batch, args.steps = 2, 256, 2, 2
    device = torch.device(args.device)
    if args.modes is None:
        args.modes = ["bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False")
    heap_kept = device.type == "cpu" and args.keep_freed_memory and keep_freed_memory()
    config = bench_config(args)
    size = 2048 if args.quick else 4096
    peaks = {mode: common.matmul_peak_flops(MODES[mode] or torch.float32, device, size=size)
             for mode in args.modes}
    print("## Training throughput (`benchmarks/bench_train.py`)\n")
    print(f"- machine: {common.environment()}")
    print(f"- CPU allocations of 2 MiB or more in huge pages: {'yes' if HUGE_PAGES else 'no'} "
          f"(THP_MEM_ALLOC_ENABLE, set as the `andromeda` command sets it)")
    print(f"- freed memory kept for the next step: {'yes' if heap_kept else 'no'} (--keep-freed-memory, as "
          f"`andromeda train --keep-freed-memory` on the CPU, its few steps without FreedMemory's bound)")
    if device.type == "cpu":
        from andromeda.train.attention_kernel import AMX_HEAD_MULTIPLE, amx_tiles, prologue_fits

        attention = ("attention (AMX tiles)" if amx_tiles() and config.dim_head % AMX_HEAD_MULTIPLE == 0
                     else "attention")
        prologue = "its prologue (QK-norm, rotary xPos)" if prologue_fits(config.dim_head, config.rotary_dim) else None
        kernels = [name for name, off in (("loss", args.no_loss_kernel), (attention, args.no_attention_kernel),
                                          (prologue, args.no_attention_kernel or args.no_attention_prologue),
                                          ("LayerNorm to bf16", args.no_norm_kernel),
                                          ("transposes", args.no_transpose_kernel))
                   if name and not off]
        print(f"- Andromeda's CPU kernels for bf16 steps: {', '.join(kernels) or 'none'} (as `andromeda train` "
              f"gives them; --no-loss-kernel, --no-attention-kernel, --no-attention-prologue, --no-norm-kernel, "
              f"--no-transpose-kernel)")
    print(f"- model: dim {config.dim}, depth {config.depth}, {config.heads} heads of {config.dim_head}, "
          f"{config.attn_kv_heads} kv heads, {config.num_alibi_heads} ALiBi heads, vocab "
          f"{config.num_tokens}, xPos {config.rotary_xpos}, QK-norm {config.use_qk_norm}; "
          f"{common.matmul_parameters(config) / 1e6:.1f} M matmul parameters")
    print(f"- step: batch {args.batch} x {args.seq_len} tokens, forward + backward + AdamW "
          f"({args.optimizer}); "
          f"median of {args.steps} interleaved steps after {args.warmup} warmup each")
    flops = common.model_flops_per_token(config, args.seq_len)
    print(f"- {common.FLOPS_FORMULA} = {flops / 1e6:.1f} MFLOP/token")
    for mode, peak in peaks.items():
        print(f"- measured matmul peak {mode}: {peak / 1e9:,.1f} GFLOP/s before the steps ({size}x{size}, "
              f"best of 5), and again after them (below)")
    datasheet = common.datasheet_peak_flops(device)
    if args.peak_tflops is not None:
        print(f"- MFU against the given peak: {args.peak_tflops} TFLOP/s")
    elif datasheet is not None:
        print(f"- MFU against {datasheet[1]}'s datasheet dense bf16 peak: {datasheet[0] / 1e12:g} TFLOP/s "
              f"(measured matmul peaks above, for comparison)")
    else:
        print("- MFU against the measured matmul peak of each precision (give --peak-tflops for a datasheet MFU)")
    rows, measured, peaks_after, notes = [], [], {}, []

    def peak_of(mode: str) -> Callable[[], float]:
        if args.peak_tflops is not None:
            return lambda: args.peak_tflops * 1e12
        if datasheet is not None:
            return lambda: datasheet[0]

        def higher_of_two() -> float:
            # On a shared VM a slow spell can last through one peak measurement (600 against
            # 1,050 GFLOP/s measured minutes apart on one Xeon), which would inflate every MFU.
            peaks_after[mode] = common.matmul_peak_flops(MODES[mode] or torch.float32, device, size=size)
            return max(peaks[mode], peaks_after[mode])
        return higher_of_two

    for mode in args.modes:
        probe = None
        if args.peak_tflops is None and datasheet is None:  # MFU against a measured peak
            probe = functools.partial(common.matmul_peak_flops, MODES[mode] or torch.float32, device, size=size,
                                      repeats=3)
        mode_rows, contestants, mode_notes = run_mode(config, mode, args, device, peak_of(mode), probe)
        rows += mode_rows
        notes += mode_notes
        measured.append((mode, contestants))
    print()
    print(common.markdown_table(
        ["mode", "model", "step (median)", "step (best)", "tokens/s", "MFU",
         "CPU time (best; speed vs the first row; MFU)", "speed vs x-transformers (median / best)", "first-step loss"], rows))
    print("\ntokens/s and MFU use the median step. On a loaded machine the best-step ratio is the "
          "steadier one: a burst of outside load lengthens some steps, never shortens one. At one "
          "thread the CPU time per step is steadier still (time the step had the core; with more "
          "threads it sums them).")
    for mode, after in peaks_after.items():
        print(f"- matmul peak {mode}: {peaks[mode] / 1e9:,.1f} GFLOP/s before the steps, {after / 1e9:,.1f} after; "
              f"MFU is against the higher, {max(peaks[mode], after) / 1e9:,.1f}")
    if notes:
        print(f"- against the matmul peak measured beside each step ({size}x{size}, best of 3 after every round of the "
              f"alternation; a step's peak the higher of the measurements before and after it):\n  - " + "\n  - ".join(notes))
    if device.type == "cpu":  # the kernel's share of the CPU time: page faults, mostly
        print("- system time of the timed steps (median): " + "; ".join(
            f"{mode} {c.name} {common.median(c.system_seconds[-args.steps:]):.2f} s" for mode, contestants in measured
            for c in contestants))
    if args.profile:
        for mode, contestants in measured:
            for contestant in contestants:
                profile_step(contestant, mode, device, config, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
