"""Fixtures shared by the test modules (plain helpers live in helpers.py)."""

import pytest
import torch

from helpers import CORPUS_TEXT


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy machine OpenMP threads waiting
    for each other make every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path):
    """A small, repetitive training text a tiny model learns within a few dozen steps."""
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS_TEXT)
    return path
