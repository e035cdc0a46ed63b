"""Named pause points, for tests that interrupt the program at a known moment.

A test sets ANDROMEDA_TEST_PAUSE_AT=<name>; the program announces "andromeda: paused at <name>"
on stderr when it reaches that point and waits there, so the test kills it or sends it a signal
exactly then, instead of after a guessed delay. Unset (always, in normal use), a pause point
does nothing. Standard library only: the command line pauses before PyTorch is imported.
"""

from __future__ import annotations

import os
import sys
import time

TEST_PAUSE_ENV = "ANDROMEDA_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    if os.environ.get(TEST_PAUSE_ENV) == name:
        print(f"andromeda: paused at {name}", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
