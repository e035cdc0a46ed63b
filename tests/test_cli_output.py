"""What the commands print: each summary once (on stdout), whatever the log level."""

from __future__ import annotations

import json

import pytest

from andromeda.train.sft import load_completion_examples
from andromeda.tokenizers import ByteTokenizer
from helpers import run_andromeda, train_cli_args


def test_tokenize_prints_its_summary_once(tmp_path, corpus):
    result = run_andromeda("tokenize", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                           "--no-progress", "--num-proc", "1")
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary and (result.stdout + result.stderr).count(summary) == 1


def test_train_prints_its_summary_once(tmp_path, corpus):
    args = train_cli_args(tmp_path / "run", corpus, tmp_path / "cache")
    args[args.index("--max-steps") + 1] = "2"
    result = run_andromeda(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("trained 2 steps") == 1
    assert "finished at step" not in result.stderr  # the same facts, logged a second time before


def test_a_completion_line_nested_too_deeply_names_file_and_line(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"sft.jsonl:2: not a JSON object"):
        load_completion_examples([data], ByteTokenizer())
