"""The README's marked examples run as written and print what the README shows.

A block marked `<!-- readme-check: exact -->` or `<!-- readme-check: shape -->` is a `console`
block of `$ andromeda ...` commands, each followed by the output it prints on stdout. The commands
run in order in one scratch folder (so a later command can use an earlier one's run), with the
Shakespeare corpus replaced by a small local stand-in. `exact` blocks must match line for line;
`shape` blocks must match with every number masked (times, losses and counts vary by machine).
A command with no output shown must only succeed. Long runs are shortened (SHORTER), which changes
numbers only.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import CORPUS_TEXT, child_env

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = re.compile(r"<!-- readme-check: (exact|shape) -->\n```console\n(.*?)```", re.S)
NUMBER = re.compile(r"\d[\d,.]*")
# Options replaced to keep the suite fast: the output keeps its shape.
SHORTER = {"--max-steps 300": "--max-steps 20"}


def blocks() -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """(mode, [(command, expected stdout lines)]) for each marked block of the README."""
    found = []
    for mode, body in MARK.findall(README.read_text()):
        steps: list[tuple[str, list[str]]] = []
        for line in body.rstrip("\n").split("\n"):
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                assert steps, f"output before any command in a readme-check block: {line!r}"
                steps[-1][1].append(line)
        found.append((mode, steps))
    return found


def masked(lines: list[str]) -> list[str]:
    return [NUMBER.sub("#", line.rstrip()) for line in lines]


def test_the_readme_has_checked_examples():
    modes = [mode for mode, _ in blocks()]
    assert "exact" in modes and "shape" in modes  # the quickstart and the plan output


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder to run in and an environment whose cache holds a stand-in Shakespeare corpus."""
    root = tmp_path_factory.mktemp("readme")
    corpus = root / "cache" / "shakespeare"
    for split, copies in (("train", 40), ("heldout", 10)):
        (corpus / split).mkdir(parents=True)
        (corpus / split / "play_gut.txt").write_text(CORPUS_TEXT * copies)
    return root, child_env(ANDROMEDA_CACHE=str(root / "cache"))


@pytest.mark.parametrize("index", range(len(blocks())))
def test_a_readme_example_prints_what_the_readme_shows(scratch, index):
    folder, env = scratch
    mode, steps = blocks()[index]
    for command, expected in steps:
        for long, short in SHORTER.items():
            command = command.replace(long, short)
        argv = shlex.split(command)
        assert argv[0] == "andromeda", f"readme-check commands run andromeda, got {command!r}"
        result = subprocess.run([sys.executable, "-m", "andromeda", *argv[1:]], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        if not expected:
            assert result.stdout.strip(), f"{command} printed nothing"
            continue
        printed = result.stdout.rstrip("\n").split("\n")
        if mode == "exact":
            assert [line.rstrip() for line in printed] == [line.rstrip() for line in expected], command
        else:
            assert masked(printed) == masked(expected), command
