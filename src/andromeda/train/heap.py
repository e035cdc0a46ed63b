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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Mapping

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
