"""Keep the C heap's freed memory in the process for the next training step (glibc's malloc).

A training step allocates and frees large buffers every step: activations, the loss's logits, each
weight's gradient. glibc hands every freed block of 32 MiB or more (its largest dynamic mmap
threshold) back to the kernel and trims the top of its heap (`M_TRIM_THRESHOLD`), so each step
page-faults them all in again and the kernel zeroes every page first. At the 2.5 B default's width
on one thread that is 20,000-30,000 page faults and 0.5 s of system time in a step of ~8.5 s (two
layers; 6% of the step's CPU time, measured with `getrusage` on an Intel Xeon, Emerald Rapids).

`keep_freed_memory` tells glibc to serve the main thread's allocations from its heap (`M_MMAP_MAX`
0) and never to give the heap back (`M_TRIM_THRESHOLD` -1), so a step reuses the pages of the last:
no page faults and no system time once the heap has settled. It is opt-in (`andromeda train
--keep-freed-memory` on the CPU; `bench_train.py --keep-freed-memory`), a process-wide setting that
lasts the process's life, made by the process's owner, never by the library on its own.

The cost is the resident size. PyTorch allocates with `posix_memalign`, whose aligned requests a
freed block of the same size often cannot serve again, so the heap keeps more than the live peak:
+10-15% in the training runs measured (7.3 -> 8.4 GB at two layers, 12.4 -> 13.9 GB at six; 8.26
GB flat over 12 steps), but 1.6x in a probe whose step's sizes did not fit their freed blocks, and
2.3 GB for 393 MB live with random sizes. `FreedMemory`, called after every step, bounds the
drift: it gives back what the set-up left free, takes the anonymous resident size the first steps
settle at and gives the free pages back (`malloc_trim`) whenever the process grows past it by a
quarter and 256 MiB, then settles again. Growth inside one step is not checked: a run near the
machine's memory should leave the option off.

Where the environment sets one of glibc's malloc variables (MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_,
MALLOC_MMAP_THRESHOLD_, MALLOC_TOP_PAD_) or a glibc.malloc tunable, the user chose a policy and it is
left as set; so it is where malloc is not glibc's (a preloaded jemalloc or tcmalloc).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_MAX = -4
# glibc's environment settings of malloc: where one is set, the user chose a policy.
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return libc


def _glibc_malloc() -> bool:
    """Whether this process's malloc is glibc's (not a preloaded allocator's)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    return address == ctypes.cast(_libc().malloc, ctypes.c_void_p).value


def unavailable_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """Why `keep_freed_memory` would leave the allocator alone, or None."""
    environ = os.environ if environ is None else environ
    if not _glibc_malloc():
        return "malloc is not glibc's"
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
        # Trimming off first: alone it changes nothing for blocks glibc maps on their own.
        if _libc().mallopt(M_TRIM_THRESHOLD, -1) == 1 and _libc().mallopt(M_MMAP_MAX, 0) == 1:
            return True
        reason = "glibc's mallopt refused the settings"
    log.info("freed memory goes back to the system as glibc decides: %s", reason)
    return False


def resident_bytes() -> int:
    """The process's anonymous resident memory (RssAnon in /proc/self/status), in bytes: the heap
    and the other private memory, not the files mapped in (a token store read at random). Kernels
    before 4.5 have no RssAnon: there, the whole resident size (/proc/self/statm)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_pages() -> None:
    """Give every whole free page of glibc's heaps back to the system (malloc_trim(0))."""
    _libc().malloc_trim(0)


class FreedMemory:
    """Keeps a process that keeps freed memory (`keep_freed_memory`) near its steady size.

    `after_step()` after every training step: the first call gives back what the set-up left free;
    the resident size's (`resident_bytes`) maximum over the first `settle_steps` steps is the
    steady size; a later step that ends more than `growth` times it plus `slack` bytes above gives
    the heap's free pages back, and the next steps settle again (the step after a release faults
    its buffers in once more, as every step did before)."""

    def __init__(self, *, settle_steps: int = 3, growth: float = 1.25, slack: int = 256 << 20,
                 resident: Callable[[], int] = resident_bytes, release: Callable[[], None] = release_free_pages):
        if settle_steps < 1 or growth < 1 or slack < 0:
            raise ValueError(f"FreedMemory needs settle_steps >= 1, growth >= 1 and slack >= 0; got {settle_steps}, "
                             f"{growth} and {slack}")
        self.settle_steps, self.growth, self.slack = settle_steps, growth, slack
        self.resident, self.release = resident, release
        self.steps, self.steady, self.releases, self.first = 0, 0, 0, True

    def after_step(self) -> None:
        if self.first:  # what building the model and the first evaluation left free: not steady
            self.first = False
            self.release()
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
