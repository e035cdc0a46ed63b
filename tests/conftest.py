"""Fixtures shared by the test modules (plain helpers live in helpers.py)."""

import os

import pytest
import torch

from andromeda.train import heap
from helpers import CORPUS_TEXT

# Devices the tests that take a `device` run on: "cpu" by default; benchmarks/gpu_check.sh runs
# them with ANDROMEDA_TEST_DEVICES=cpu,cuda.
DEVICES = os.environ.get("ANDROMEDA_TEST_DEVICES", "cpu").split(",")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy machine OpenMP threads waiting
    for each other make every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def kept_heap(monkeypatch) -> list:
    """`andromeda train --keep-freed-memory` makes its process keep freed memory for good
    (`andromeda.train.heap`); a test running the command in this process records the call (and
    answers that it applied) instead of changing the whole test process's allocator.
    tests/test_heap.py runs the real one in processes of its own."""
    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda environ=None: calls.append(environ) is None)
    return calls


@pytest.fixture
def corpus(tmp_path):
    """A small, repetitive training text a tiny model learns within a few dozen steps."""
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS_TEXT)
    return path


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a test runs its model on (each of ANDROMEDA_TEST_DEVICES)."""
    device = torch.device(request.param)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA was asked for but is not available")
    return device
