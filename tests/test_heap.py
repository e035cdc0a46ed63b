"""`keep_freed_memory`: a large buffer freed and allocated again reuses its pages (no page faults)
where the process kept its freed memory, and faults them all in again under glibc's own policy.
Each case runs in a fresh process: the setting is process-wide."""

import json
import platform
import subprocess
import sys

import pytest

from andromeda.train import heap
from helpers import child_env, tiny_train_config

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc on Linux")

MIB = 1 << 20
BUFFER = 64 * MIB
SMALLER = 56 * MIB
ROUNDS, SLACK = 24, 128 * MIB  # the fragmenting probe's

# Allocates, touches and frees a 64 MiB buffer, then counts the minor page faults of touching a 56 MiB
# one (smaller, so a kept 64 MiB free chunk holds it whatever glibc's alignment asks).
# No transparent huge pages for the probing process (PR_SET_THP_DISABLE), whatever the machine's
# setting: its faults count 4 KiB pages.
NO_HUGE_PAGES = "import ctypes; assert ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) == 0"

PROBE = f"""
{NO_HUGE_PAGES}
import json, resource, sys
import torch
from andromeda.train.heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def touched(size):
    buffer = torch.empty(size, dtype=torch.uint8)
    buffer.fill_(1)
    return buffer
del_ = touched({BUFFER}); del del_
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
again = touched({SMALLER})
print(json.dumps({{"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


def _probe(mode: str, **env: str) -> dict:
    # 4 KiB pages (no huge-page allocations), so the 56 MiB faulted in anew counts 14,336 faults.
    environment = child_env() | {"THP_MEM_ALLOC_ENABLE": "0"} | env
    for name in (*heap.MALLOC_VARIABLES, "GLIBC_TUNABLES"):  # the suite's own settings, if any
        if name not in env:
            environment.pop(name, None)
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=environment, capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_freed_buffer_is_reused_without_page_faults():
    pages = SMALLER // 4096
    kept, default = _probe("keep"), _probe("default")
    assert kept["kept"] is True and default["kept"] is False
    assert default["faults"] >= pages * 0.9  # glibc unmapped it: every page faulted in again
    assert kept["faults"] < pages * 0.05  # the heap kept it


def test_the_users_malloc_settings_are_left_as_set():
    probe = _probe("keep", MALLOC_MMAP_MAX_="65536")  # glibc's default count, chosen explicitly
    assert probe["kept"] is False and probe["faults"] >= SMALLER // 4096 * 0.9


def test_unavailable_reason_names_the_setting():
    assert heap.unavailable_reason({}) is None
    assert "MALLOC_TRIM_THRESHOLD_" in heap.unavailable_reason({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert "GLIBC_TUNABLES" in heap.unavailable_reason({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert heap.unavailable_reason({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}) is None


def test_freed_memory_keeps_a_steady_heap_and_releases_growth():
    sizes, released = [], []
    guard = heap.FreedMemory(settle_steps=3, growth=1.25, slack=100, resident=lambda: sizes[-1],
                             release=lambda: released.append(sizes[-1]))

    def step(size: int) -> None:
        sizes.append(size)
        guard.after_step()

    for size in (800, 1000, 900):  # the first steps settle at their maximum, 1,000
        step(size)
    assert released == [800]  # the first call gives back what the set-up left
    for size in (1000, 1300, 1350):  # within 1.25 x 1,000 + 100
        step(size)
    assert released == [800]
    step(1351)  # past the bound: given back, then settles again
    assert released == [800, 1351] and guard.releases == 1
    for size in (700, 760, 720):
        step(size)
    step(1049)  # 1.25 x 760 + 100 = 1,050
    assert released == [800, 1351]
    step(1051)
    assert released == [800, 1351, 1051]
    with pytest.raises(ValueError, match="settle_steps >= 1"):
        heap.FreedMemory(settle_steps=0)


def test_the_training_loop_calls_after_step_after_every_step(tmp_path, corpus):
    from andromeda.train import train

    steps = []
    result = train(tiny_train_config(tmp_path, corpus, max_steps=5), after_step=lambda: steps.append(len(steps)))
    assert result.step == 5 and steps == [0, 1, 2, 3, 4]


# A heap that keeps what it frees and cannot reuse it, built from glibc's own rules so it grows the
# same way whatever the process allocated before: each round allocates a buffer larger than every
# free chunk (so it comes from the top of the heap), then a "pin" right after it (one byte larger
# still, so it comes from the top too), shrunk in place to 16 bytes (its tail goes back to the top),
# then frees the buffer: a hole bounded by a live pin, too small for the next round's buffer. Without
# FreedMemory the resident size grows one touched buffer a round; with it, it stays near its steady
# size. No torch: only the probe's own allocations between the rounds.
FRAGMENTING = f"""
{NO_HUGE_PAGES}
import ctypes, json, sys
from andromeda.train import heap
assert heap.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.realloc.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.realloc.argtypes = (ctypes.c_size_t,), (ctypes.c_void_p, ctypes.c_size_t)
libc.free.argtypes = (ctypes.c_void_p,)
class Recorded(heap.FreedMemory):  # each steady size it settled at
    steadies = []
    def after_step(self):
        super().after_step()
        if self.steps == self.settle_steps:
            self.steadies.append(self.steady)
guard = Recorded(slack={SLACK}) if sys.argv[1] == "guarded" else None
pins, largest = [], 0
for round in range({ROUNDS}):
    size = {BUFFER} + round * 65536
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    pin = libc.malloc(size + 1)
    assert libc.realloc(pin, 16) == pin  # shrunk in place
    pins.append(pin)
    libc.free(buffer)
    if guard is not None:
        guard.after_step()
    largest = max(largest, heap.resident_bytes())
print(json.dumps({{"largest": largest, "releases": guard.releases if guard else 0,
                  "steady": max(guard.steadies) if guard else 0}}))
"""


def test_freed_memory_bounds_a_fragmenting_heap():
    def run(mode: str) -> dict:
        environment = child_env() | {"THP_MEM_ALLOC_ENABLE": "0"}
        for name in (*heap.MALLOC_VARIABLES, "GLIBC_TUNABLES"):
            environment.pop(name, None)
        done = subprocess.run([sys.executable, "-c", FRAGMENTING, mode], env=environment, capture_output=True,
                              text=True, check=False, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    unguarded, guarded = run("unguarded"), run("guarded")
    assert unguarded["largest"] > ROUNDS * BUFFER * 0.9  # every round's buffer kept
    # released each time it passed 1.25 x its steady size + the slack: at most that and a buffer more
    assert guarded["releases"] >= 3 and guarded["largest"] <= guarded["steady"] * 1.25 + SLACK + 2 * BUFFER
    assert guarded["largest"] < unguarded["largest"] / 2
