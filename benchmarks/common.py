"""Helpers shared by the benchmark scripts: timing, memory, matmul peak, FLOPs, and the peer.

The peer is x-transformers 2.31 (`TransformerWrapper(Decoder(...))`), built with the same
hyperparameters as an Andromeda `Config`; its weights move into Andromeda through
`Andromeda.load_x_transformers`, so both sides of every comparison compute the same function.

Timing discipline. Other work shares the machine, so each comparison interleaves its contestants
(A, B, A, B, ...) and reports medians: a burst of outside load slows both sides alike.

Memory discipline. Peaks are taken per process (`ru_maxrss`, or the kernel's resettable VmHWM),
so each measurement that needs a clean peak runs in its own subprocess. A run that may exhaust
the machine (the peer at long sequence lengths) runs under `run_capped`, a watchdog that kills
it once its resident memory passes a cap or the machine's available memory runs low — an
address-space limit (RLIMIT_AS) would instead break the allocator's large virtual reservations.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from andromeda import Andromeda, Config
from andromeda.interop import build_x_transformers
from andromeda.plan import flops_per_token

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2
PEER_VERSION = "2.31.10"  # the x-transformers release the interop and the figures are pinned to


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work, so a wall-clock interval covers all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of `fn` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_forward_backward(function: Callable[[], object], grads: object, repeats: int,
                          autocast_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Best forward and best backward seconds over `repeats` calls of `function()` (on the CPU, under
    autocast to `autocast_dtype` where given) and `torch.autograd.backward` of its output(s) with
    `grads`."""
    forward = backward = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = function()
        middle = time.perf_counter()
        torch.autograd.backward(out, grads)
        forward, backward = min(forward, middle - start), min(backward, time.perf_counter() - middle)
    return forward, backward


def alternate(
    contestants: Mapping[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Time each contestant `repeats` times, interleaved A, B, A, B, ... after `warmup` untimed
    calls each; returns the wall seconds per call by name."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for name, fn in contestants.items():
        for _ in range(warmup):
            log.info("warmup: %s", name)
            fn()
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for r in range(repeats):
        for name, fn in contestants.items():
            times[name].append(time_call(fn, device))
            log.info("run %d/%d %s: %.3f s", r + 1, repeats, name, times[name][-1])
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    """This process's peak resident memory over its whole life (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_field(field: str, pid: int | str = "self") -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM, ...) in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/{pid}/status has no {field} line")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process now."""
    return _status_field("VmRSS", pid)


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (VmHWM) to its current RSS, so
    `high_water_rss_bytes` measures the peak of what follows. Linux >= 4.0; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def high_water_rss_bytes() -> int:
    """Peak resident memory since the process started or since `reset_peak_rss`."""
    return _status_field("VmHWM")


def available_memory_bytes() -> int:
    """The kernel's estimate of memory available to new work (MemAvailable)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KeyError("/proc/meminfo has no MemAvailable line")


@dataclass
class CappedRun:
    returncode: int
    stdout: str
    stderr: str
    killed: str | None  # why the watchdog killed the run, None if it was left alone
    seen_peak_rss: int  # the largest RSS the watchdog saw (a lower bound of the true peak)

    def last_json(self) -> dict | None:
        """The last stdout line that parses as a JSON object (how children report results)."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        return None


def run_capped(
    command: Sequence[str],
    *,
    cap_bytes: int,
    min_available_bytes: int = 1 * GIB,
    poll_s: float = 0.02,
    timeout_s: float | None = None,
) -> CappedRun:
    """Run `command`, killing it (SIGKILL) if its RSS exceeds `cap_bytes`, if the machine's
    available memory falls below `min_available_bytes`, or after `timeout_s` seconds.

    Polling can miss an allocation spike between two looks; the available-memory floor is the
    backstop that keeps a spike from taking the machine (and other people's work) down.
    """
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[str] = []
    peak = [0]
    start = time.monotonic()

    def watch() -> None:
        while proc.poll() is None:
            try:
                rss = rss_bytes(proc.pid)
            except (OSError, KeyError):  # exited between poll() and the read
                return
            peak[0] = max(peak[0], rss)
            reason = None
            if rss > cap_bytes:
                reason = f"RSS {rss / 1e9:.2f} GB passed the cap of {cap_bytes / 1e9:.2f} GB"
            elif available_memory_bytes() < min_available_bytes:
                reason = (f"machine memory available fell below {min_available_bytes / 1e9:.2f} GB "
                          f"(process RSS {rss / 1e9:.2f} GB)")
            elif timeout_s is not None and time.monotonic() - start > timeout_s:
                reason = f"ran past the {timeout_s:.0f} s time limit"
            if reason is not None:
                killed.append(reason)
                proc.send_signal(signal.SIGKILL)
                return
            time.sleep(poll_s)

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    stdout, stderr = proc.communicate()
    watchdog.join()
    return CappedRun(proc.returncode, stdout, stderr, killed[0] if killed else None, peak[0])


def child_command(script: str, *args: str) -> list[str]:
    """The command line that reruns a benchmark script (in a fresh interpreter) with `args`."""
    return [sys.executable, os.path.abspath(script), *args]


# ----------------------------------------------------------------------------- FLOPs

FLOPS_FORMULA = (
    "model FLOPs/token = 6*N + 12*depth*heads*dim_head*T  "
    "(PaLM convention, as `andromeda plan`: N = weights of every matrix product incl. the logits, "
    "excl. the embedding lookup; attention over all T keys, the causal mask not discounted; "
    "forward+backward)"
)
# Dense bf16 peaks from the datasheets (no sparsity), TFLOP/s: the denominator of GPU MFU unless
# --peak-tflops gives another. Matched against torch.cuda.get_device_name().
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def datasheet_peak_flops(device: torch.device) -> tuple[float, str] | None:
    """(FLOP/s, GPU name) of a CUDA device's dense bf16 datasheet peak, if the name is known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, name
    return None


def matmul_parameters(config: Config) -> int:
    """Weights that take part in a matrix product per token: projections, MLP, logits."""
    C, H, K, D = config.dim, config.heads, config.attn_kv_heads, config.dim_head
    per_block = C * (H + 2 * K) * D + H * D * C + 2 * C * config.ff_dim
    return config.depth * per_block + C * config.num_tokens


def model_flops_per_token(config: Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): `andromeda.plan.flops_per_token`, the PaLM
    appendix-B count (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311); FLOPS_FORMULA."""
    return flops_per_token(config, seq_len, matmul_parameters(config))[0]


def peaks_beside(probes: Sequence[float], steps: int) -> list[float]:
    """The matmul peak beside each of the last `steps` timed rounds of an alternation that measured
    the peak after every round (and after the warmup calls; `probes` in order): for round r, the higher
    of the measurements just before and just after it (only the one after for a first round)."""
    if steps < 1 or len(probes) < steps:
        raise ValueError(f"need at least {steps} (>= 1) peak measurements, got {len(probes)}")
    after = list(probes[-steps:])
    before = list(probes[-steps - 1:-steps] if len(probes) > steps else after[:1]) + after[:-1]
    return [max(pair) for pair in zip(before, after)]


def matmul_peak_flops(
    dtype: torch.dtype, device: torch.device | str = "cpu", *, size: int = 4096, repeats: int = 5
) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matrix product: the machine's practical
    peak for `dtype`, the denominator of the model FLOP utilisation (MFU) figures."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # first call: kernel selection and packing buffers
    best = min(time_call(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size**3 / best


# ----------------------------------------------------------------------------- models


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """bf16/fp16 autocast on `device`, or nothing for dtype None (plain fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def peer_version() -> str:
    """The installed x-transformers version; raises with the install command if it is missing."""
    try:
        return metadata.version("x-transformers")
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the peer benchmarks need x-transformers: pip install x-transformers=={PEER_VERSION} "
            f"(or pip install -e '.[test]'), or pass --no-peer"
        ) from None


def x_transformers_model(config: Config) -> nn.Module:
    """x-transformers' `TransformerWrapper(Decoder(...))` with `config`'s hyperparameters, in its
    own default initialisation: the model the seed's original `Andromeda` class built."""
    peer_version()
    return build_x_transformers(config)


def x_transformers_loss_model(net: nn.Module) -> nn.Module:
    """x-transformers' AutoregressiveWrapper: (B, T + 1) tokens -> mean next-token loss, the same
    contract as Andromeda's decoder."""
    import x_transformers

    return x_transformers.AutoregressiveWrapper(net)


def matched_pair(
    config: Config, *, device: torch.device | str = "cpu", seed: int = 0
) -> tuple[Andromeda, nn.Module]:
    """(Andromeda, x-transformers TransformerWrapper) computing the same function: the peer is
    built with its own init, and its weights are copied into Andromeda."""
    torch.manual_seed(seed)
    peer = x_transformers_model(config)
    ours = Andromeda.from_config(config)
    ours.load_x_transformers(peer.state_dict())
    return ours.to(device), peer.to(device)


# ----------------------------------------------------------------------------- reporting


def environment() -> str:
    """One line naming what produced the figures: hardware, threads and library versions."""
    try:
        peer = peer_version()
    except ModuleNotFoundError:
        peer = "not installed"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
    threads = torch.get_num_threads()
    return (f"{device}; {threads} thread{'s' if threads != 1 else ''}; torch {torch.__version__}; "
            f"x-transformers {peer}; Python {platform.python_version()}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are formatted with str()."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


def setup_logging(verbose: bool) -> None:
    """Progress to stderr (INFO with --verbose), results to stdout."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
