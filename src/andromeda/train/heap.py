"""Keep the C heap's freed memory in the process for the next training step (glibc's malloc).

A training step allocates and frees the same large buffers every step: activations, the loss's
logits, each weight's gradient. glibc hands every allocation of 32 MiB or more (its largest
dynamic mmap threshold) back to the kernel when it is freed, and returns the top of its heap
too (`M_TRIM_THRESHOLD`), so each step page-faults all of them in again and the kernel zeroes
every page first. At the 2.5 B default's width on one thread that is 20,000-30,000 page faults and
0.5 s of system time in a step of ~8.5 s (two layers; 6% of the step's CPU time, measured with
`getrusage` on an Intel Xeon, Emerald Rapids).

`keep_freed_memory` tells glibc to serve every allocation from its heap (`M_MMAP_MAX` 0) and never
to give the heap back (`M_TRIM_THRESHOLD` -1), so a step reuses the pages of the last: no page
faults and no system time after the first steps. The cost is the resident size: the heap keeps
its high-water mark, 12-15% more than the live peak in those runs (7.3 -> 8.4 GB at two layers,
12.4 -> 13.9 GB at six). The process's owner calls it (`andromeda train` on the CPU, the training
benchmark), as it sets the number of threads: it is a process-wide setting, never made by the
library on its own. Where the environment sets one of glibc's MALLOC_*_ variables or a glibc.malloc
tunable, the user chose a policy, and it is left as set (any of them also fixes glibc's mmap
threshold at 128 KiB, which costs more than either policy: half the demo recipe's steps with
MALLOC_MMAP_MAX_=65536).

A heap that never gives memory back can fragment without bound where the sizes do not repeat: 64 MiB
buffers freed between small allocations that stay grew a process to 4.2 GB in 60 rounds, buffers of
random sizes (393 MB live at most) to 2.3 GB. A training step repeats its allocations exactly, so
its heap settles after the first steps (8.26 GB flat over 12 steps above); evaluations, checkpoint
saves and other code do not. `FreedMemory` bounds it: called after every step, it takes the
resident size the first steps settle at and gives the free pages back (`malloc_trim`) whenever the
process grows past it by a quarter and 256 MiB, then settles again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_MAX = -4
# glibc's environment settings of malloc: where one is set, the user chose a policy.
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def unavailable_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """Why `keep_freed_memory` would leave the allocator alone, or None."""
    environ = os.environ if environ is None else environ
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    chosen = [name for name in MALLOC_VARIABLES if name in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"the environment sets glibc's malloc ({', '.join(chosen)}): left as set"
    return None


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Make glibc keep freed memory for reuse (see the module's text); True where it now does.
    A no-op, logged, where `unavailable_reason` gives a reason."""
    reason = unavailable_reason(environ)
    if reason is None:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        # Order matters little: both only change where later allocations come from.
        if mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1:
            return True
        reason = "glibc's mallopt refused the settings"
    log.info("freed memory goes back to the system as glibc decides: %s", reason)
    return False


def resident_bytes() -> int:
    """The process's resident size (Linux's /proc/self/statm), in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_pages() -> None:
    """Give every whole free page of glibc's heap back to the system (malloc_trim(0))."""
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


class FreedMemory:
    """Keeps a process that keeps freed memory (`keep_freed_memory`) near its steady size.

    `after_step()` after every training step: the resident size's maximum over the first
    `settle_steps` steps is the steady size; a later step that ends more than `growth` times it
    plus `slack` bytes above gives the heap's free pages back, and the next steps settle again (the
    step after a release faults its buffers in once more, as every step did before)."""

    def __init__(self, *, settle_steps: int = 3, growth: float = 1.25, slack: int = 256 << 20,
                 resident: Callable[[], int] = resident_bytes, release: Callable[[], None] = release_free_pages):
        if settle_steps < 1 or growth < 1 or slack < 0:
            raise ValueError(f"FreedMemory needs settle_steps >= 1, growth >= 1 and slack >= 0; got {settle_steps}, "
                             f"{growth} and {slack}")
        self.settle_steps, self.growth, self.slack = settle_steps, growth, slack
        self.resident, self.release = resident, release
        self.steps, self.steady, self.releases = 0, 0, 0

    def after_step(self) -> None:
        size = self.resident()
        self.steps += 1
        if self.steps <= self.settle_steps:
            self.steady = max(self.steady, size)
        elif size > self.steady * self.growth + self.slack:
            self.release()
            self.releases += 1
            log.info("the heap grew to %.2f GB against %.2f GB steady: free pages given back", size / 1e9,
                     self.steady / 1e9)
            self.steps, self.steady = 0, 0
