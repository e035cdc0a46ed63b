"""`andromeda --help` and every command's --help, in fresh interpreters: they answer without
loading PyTorch (or any other heavy dependency), import only the chosen command's module, and
show clean defaults and the choices of enumerated options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from andromeda import cli

HEAVY = ("torch", "numpy", "safetensors", "tokenizers", "transformers", "fastapi")

# For each of the top level and every command: `main([..., "--help"])` in one fresh interpreter,
# then its exit code, the heavy packages and the andromeda.cli modules it loaded so far (modules
# accumulate, so the first command that loads a heavy one is the one that imports it).
PROBE = """
import json, sys
from andromeda.cli import COMMANDS, main

report = {}
for command in [None, *COMMANDS]:
    code = main([command, "--help"] if command else ["--help"])
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
    commands = sorted(name for name in sys.modules if name.startswith("andromeda.cli."))
    report[command or "andromeda"] = [code, loaded, commands]
print(json.dumps(report), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def help_report() -> dict[str, list]:
    probe = f"HEAVY = {HEAVY!r}\n" + PROBE
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stderr.strip().splitlines()[-1])


def test_every_help_answers_without_loading_pytorch(help_report):
    assert set(help_report) == {"andromeda", *cli.COMMANDS}
    for command, (code, loaded, _) in help_report.items():
        assert code == 0, command
        assert loaded == [], f"`andromeda {command} --help` loaded {loaded}"


def test_help_imports_only_the_chosen_commands_module(help_report):
    """The top level lists the commands from the table, importing none of their modules; each
    command's --help adds its own module (and the shared options), nothing else."""
    assert help_report["andromeda"][2] == []
    seen: set[str] = set()
    for command, (module, _) in cli.COMMANDS.items():
        added = set(help_report[command][2]) - seen
        assert f"andromeda.cli.{module}" in added, command
        others = {f"andromeda.cli.{m}" for name, (m, _) in cli.COMMANDS.items() if name != command}
        # plan reuses train's --override parser; that is the only import of another command.
        allowed = {"andromeda.cli.train"} if command == "plan" else set()
        assert added & others <= allowed, f"`{command} --help` imported {sorted(added & others)}"
        seen |= added


def test_the_command_table_names_every_command_module():
    modules = {p.stem for p in Path(cli.__file__).parent.glob("*.py")} - {"__init__", "common"}
    assert {module for module, _ in cli.COMMANDS.values()} == modules


def help_text(capsys, *command: str) -> str:
    assert cli.main([*command, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


def test_train_help_lists_the_objectives_and_shows_defaults_as_typed(capsys):
    text = help_text(capsys, "train")
    assert "--objective {lm,completion,chat}" in text and "--parallel {none,ddp,fsdp}" in text
    assert "WANDB_MODE says otherwise) (default none)" in text and "('none',)" not in text


def test_an_objective_not_listed_is_refused_by_the_parser(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--max-steps", "1", "--objective", "rl"]) == 2
    err = capsys.readouterr().err
    assert "argument --objective: invalid choice: 'rl'" in err and "lm" in err and "completion" in err


@pytest.mark.parametrize("command", ["generate", "eval", "serve"])
def test_group_size_help_says_how_int4_picks_one(capsys, command):
    text = help_text(capsys, command)
    assert ("int4 inputs per scale and zero: 32, 64, 128, 256 (default: an int4 checkpoint's own, else the largest "
            "of 128, 64, 32 that divides every layer's input width)") in text


def test_serve_help_says_where_to_install_the_extra(capsys):
    text = help_text(capsys, "serve")
    assert "pip install -e '.[serve]' in the andromeda checkout (PyPI's andromeda is an unrelated project)" in text


def test_generate_help_says_it_takes_a_hugging_face_export(capsys):
    assert "Hugging Face export" in help_text(capsys, "generate").partition("--checkpoint CHECKPOINT ")[2]
    assert "a Hugging Face export" in cli.__doc__
