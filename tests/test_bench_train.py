"""benchmarks/bench_train.py: its MFU against the peak measured beside each step, and the profile's
ceilings, which can only lie above the step's measured rate."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import child_env

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
# benchmarks/common.py under a name of its own: the folder stays off sys.path for the other tests
_spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
common = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))  # its dataclasses look it up
_spec.loader.exec_module(common)


def test_each_step_gets_the_higher_of_the_peaks_just_before_and_after_it():
    # two warmup calls, then three timed ones: probes after every call
    probes = [900.0, 1000.0, 800.0, 1200.0, 700.0]
    assert common.peaks_beside(probes, 3) == [1000.0, 1200.0, 1200.0]
    # no warmup: the first timed call has only the measurement after it
    assert common.peaks_beside([800.0, 1200.0, 700.0], 3) == [800.0, 1200.0, 1200.0]
    assert common.peaks_beside([5.0], 1) == [5.0]
    with pytest.raises(ValueError, match="at least 3"):
        common.peaks_beside([1.0, 2.0], 3)


def _percent(pattern: str, text: str) -> list[float]:
    found = re.search(pattern, text)
    assert found, f"no match for {pattern!r} in:\n{text}"
    return [float(group) for group in found.groups()]


def test_the_quick_run_reports_mfu_beside_each_step_and_ceilings_above_the_step(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_train.py"), "--quick", "--modes", "bf16", "--no-peer",
         "--threads", "1", "--steps", "3", "--warmup", "1", "--profile"],
        env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    low, high = (float(x.replace(",", "")) for x in
                 re.search(r"bf16: the peak beside each step, ([\d,]+)-([\d,]+) GFLOP/s", out).groups())
    assert 0 < low <= high
    low, high = low - 0.5, high + 0.5  # printed to the GFLOP/s
    median_mfu, cpu_mfu = _percent(r"bf16 andromeda: MFU ([\d.]+)% \(median step\), ([\d.]+)% by CPU time", out)
    # each step's MFU lies between its FLOPs over its time at the highest and at the lowest peak, and
    # so does the median of three (the table's median step is printed to 10 ms)
    (mflops,) = _percent(r"= ([\d.]+) MFLOP/token", out)
    median_step = float(re.search(r"^\| bf16 \| andromeda \| ([\d.]+) s \|", out, re.M).group(1))
    flops = mflops * 1e6 * 2 * 256  # --quick: 2 x 256 tokens a step
    assert 100 * flops / ((median_step + 0.005) * high * 1e9) - 0.1 <= median_mfu
    assert median_mfu <= 100 * flops / ((median_step - 0.005) * low * 1e9) + 0.1
    # the best step by CPU time: the highest of the steps' CPU-time MFUs, bracketed by the best CPU time's
    cpu_best = float(re.search(r"\| ([\d.]+) s \([\d.]+x; MFU", out).group(1))
    assert 100 * flops / ((cpu_best + 0.005) * high * 1e9) - 0.1 <= cpu_mfu
    assert cpu_mfu <= 100 * flops / ((cpu_best - 0.005) * low * 1e9) + 0.1
    # the profiled step: its rate against its products', then the same with ops taken away
    (step,) = _percent(r"are \*\*([\d.]+)%\*\* of that rate", out)
    products_only, with_optimizer, others = _percent(
        r"would be ([\d.]+)% with only the products and attention taking time; ([\d.]+)% with only the "
        r"products, attention and the optimizer taking time \(the other ops take ([\d.]+)% of this step\)", out)
    assert step <= with_optimizer <= products_only
    shares = {name: float(share) for name, share in re.findall(r"^\| ([^|]+?) \| [\d,]+ ms \| ([\d.]+)% \|$",
                                                               out, re.M)}
    kept = shares["matrix products"] + shares["attention (kernels or SDPA)"] + shares["optimizer"]
    assert others == pytest.approx(100 - kept, abs=0.15)  # the table's shares are rounded to 0.1
    # the step's rate over the kept ops' rate is the kept ops' share of the step
    assert step == pytest.approx(with_optimizer * kept / 100, abs=0.3)  # three numbers rounded to 0.1
