"""Test hooks of the command line: named pause points, and the tokenizer's pause, for tests that
interrupt the program at a known moment.

The library reads no test setting: its functions take these hooks as arguments (`train(...,
pause=, tokenizer_pause=)`, `commit_checkpoint(..., pause=)`, `tokenize_corpus(...,
tokenizer_pause=)`), doing nothing without them. The command line, the application's edge, is the
one place that reads the environment variables below and passes the hooks in. This module sits
in the cli layer (tests/test_layout.py): nothing below it may import it.

ANDROMEDA_TEST_PAUSE_AT=<name> (or rank<R>:<name> for one process of a torchrun job; several,
separated by commas; <name>@<seconds> to just stall there that long, like a slow step): the
program announces "andromeda: paused at <name> (pid <P>)" on stderr when it reaches that point and
waits there: until killed, or, where the caller passes `until`, until that condition holds (in
training: a stop signal has been handled, so the run goes on having seen the signal at exactly
that point). So a test acts at a known point instead of after a guessed delay.

ANDROMEDA_TOKENIZE_TEST_PAUSE=<N>:<PATH>: each tokenizing process stops after its N-th document
(its tokens flushed to the part's temporary file), creates PATH and sleeps, so a test can kill it
there (`data.worker.DocumentPause`; worker processes get the setting as a plain string).

Unset (always, in normal use), neither does anything. Standard library only: the command line
pauses at "startup" before PyTorch loads.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

TEST_PAUSE_ENV = "ANDROMEDA_TEST_PAUSE_AT"
TOKENIZE_PAUSE_ENV = "ANDROMEDA_TOKENIZE_TEST_PAUSE"


def pause_point(name: str, until: Callable[[], bool] | None = None) -> None:
    """Pause here if ANDROMEDA_TEST_PAUSE_AT names `name` (see the module's docstring)."""
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


def pause_hook() -> Callable[..., None] | None:
    """The `pause` callback to pass to the library: `pause_point` when a test asks for pause
    points, else None (the library's default, which does nothing)."""
    return pause_point if os.environ.get(TEST_PAUSE_ENV) else None


def tokenizer_pause() -> str | None:
    """The `tokenizer_pause` setting to pass to the library ("N:PATH"), or None."""
    return os.environ.get(TOKENIZE_PAUSE_ENV) or None


def _matches(wanted: str, name: str) -> bool:
    rank, _, point = wanted.partition(":") if wanted.startswith("rank") else ("", "", wanted)
    return point == name and (not rank or rank == f"rank{os.environ.get('RANK', '0')}")
