"""`keep_freed_memory`: a large buffer freed and allocated again reuses its pages (no page faults)
where the process kept its freed memory, and faults them all in again under glibc's own policy.
Each case runs in a fresh process: the setting is process-wide."""

import json
import platform
import subprocess
import sys

import pytest

from andromeda.train import heap
from helpers import child_env

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc on Linux")

MIB = 1 << 20
BUFFER = 64 * MIB

# Allocates, touches and frees a 64 MiB buffer three times and counts the minor page faults of the
# third (the second may still fault: glibc grows its heap in the first rounds, as a training run's
# first steps do).
PROBE = f"""
import json, resource, sys
import torch
from andromeda.train.heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def touched():
    buffer = torch.empty({BUFFER}, dtype=torch.uint8)
    buffer.fill_(1)
    return buffer
for _ in range(2):
    del_ = touched(); del del_
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
again = touched()
print(json.dumps({{"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


def _probe(mode: str, **env: str) -> dict:
    # 4 KiB pages (no huge-page allocations), so a buffer faulted in again counts 16,384 faults.
    environment = child_env() | {"THP_MEM_ALLOC_ENABLE": "0"} | env
    for name in (*heap.MALLOC_VARIABLES, "GLIBC_TUNABLES"):  # the suite's own settings, if any
        if name not in env:
            environment.pop(name, None)
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=environment, capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_freed_buffer_is_reused_without_page_faults():
    pages = BUFFER // 4096
    kept, default = _probe("keep"), _probe("default")
    assert kept["kept"] is True and default["kept"] is False
    assert default["faults"] >= pages * 0.9  # glibc unmapped it: every page faulted in again
    assert kept["faults"] < pages * 0.05  # the heap kept it


def test_the_users_malloc_settings_are_left_as_set():
    probe = _probe("keep", MALLOC_MMAP_MAX_="65536")  # glibc's default count, chosen explicitly
    assert probe["kept"] is False and probe["faults"] >= BUFFER // 4096 * 0.9


def test_unavailable_reason_names_the_setting():
    assert heap.unavailable_reason({}) is None
    assert "MALLOC_TRIM_THRESHOLD_" in heap.unavailable_reason({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert "GLIBC_TUNABLES" in heap.unavailable_reason({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert heap.unavailable_reason({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}) is None
