"""Named pause points, for tests that interrupt the program at a known moment.

A test sets ANDROMEDA_TEST_PAUSE_AT=<name> (or rank<R>:<name> for one process of a torchrun job;
several, separated by commas; <name>@<seconds> to just stall there that long, like a slow step);
the program announces "andromeda: paused at <name> (pid <P>)" on stderr when it reaches that
point and waits there: until killed, or, where the caller passes `until`, until that condition
holds (in training: a stop signal has been handled, so the run goes on having seen the signal at
exactly that point). So a test acts at a known point instead of after a guessed delay. Unset (always, in normal use), a
pause point does nothing. Standard library only: the command line pauses before PyTorch loads.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

TEST_PAUSE_ENV = "ANDROMEDA_TEST_PAUSE_AT"


def pause_point(name: str, until: Callable[[], bool] | None = None) -> None:
    for wanted in os.environ.get(TEST_PAUSE_ENV, "").split(","):
        wanted, _, seconds = wanted.partition("@")
        if _matches(wanted, name):
            print(f"andromeda: paused at {name} (pid {os.getpid()})", file=sys.stderr, flush=True)
            if seconds:  # a slow step, simulated: go on after that many seconds
                time.sleep(float(seconds))
                return
            while until is None or not until():  # polled: a signal handled before this line is not missed
                time.sleep(0.01)
            return


def _matches(wanted: str, name: str) -> bool:
    rank, _, point = wanted.partition(":") if wanted.startswith("rank") else ("", "", wanted)
    return point == name and (not rank or rank == f"rank{os.environ.get('RANK', '0')}")
