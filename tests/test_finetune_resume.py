"""A fine-tune (`train --init-from`) is a run like any other: preempted, it continues with
`--resume`, bit for bit, without needing the base checkpoint again; the run records where it started."""

from __future__ import annotations

import json
import shutil
import signal

import torch

from andromeda.checkpoint import latest_checkpoint, load_transformer, save_pretrained
from andromeda.tokenizers import ByteTokenizer
from andromeda.train import PREEMPTED_EXIT_CODE
from helpers import andromeda_command, random_net, run_andromeda
from test_preemption import losses, signal_when_paused


def finetune_args(out, base, corpus, cache, *extra):
    return ["train", "--out", str(out), "--init-from", str(base), "--data", str(corpus), "--batch-size", "8",
            "--seq-len", "32", "--max-steps", "6", "--save-every", "4", "--warmup-steps", "1", "--eval-batches", "0",
            "--log-every", "1", "--device", "cpu", "--no-progress", "--cache-dir", str(cache), *extra]


def test_a_preempted_fine_tune_resumes_bit_for_bit_without_its_base(tmp_path, corpus):
    base, cache = tmp_path / "base", tmp_path / "cache"
    save_pretrained(random_net(), base, tokenizer=ByteTokenizer())
    straight = run_andromeda(*finetune_args(tmp_path / "straight", base, corpus, cache))
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "run"
    code, err = signal_when_paused(andromeda_command(*finetune_args(run, base, corpus, cache)), "after-step:3",
                                   signal.SIGTERM)
    assert code == PREEMPTED_EXIT_CODE, err
    recorded = json.loads((latest_checkpoint(run) / "train_config.json").read_text())
    assert recorded["init_from"] == str(base)  # where the run started from
    shutil.move(base, tmp_path / "moved")  # the run holds its own weights now
    resumed = run_andromeda("train", "--out", str(run), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(tmp_path / "straight")
    a, b = load_transformer(run).state_dict(), load_transformer(tmp_path / "straight").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_init_from_is_refused_naming_the_run_s_base(tmp_path, corpus):
    base, cache = tmp_path / "base", tmp_path / "cache"
    save_pretrained(random_net(), base, tokenizer=ByteTokenizer())
    args = finetune_args(tmp_path / "run", base, corpus, cache)
    args[args.index("--max-steps") + 1] = "2"
    assert run_andromeda(*args).returncode == 0
    other = tmp_path / "other"
    shutil.copytree(base, other)
    result = run_andromeda("train", "--out", str(tmp_path / "run"), "--resume", "--init-from", str(other),
                           "--no-progress")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"started from {base}" in result.stderr and "drop --init-from" in result.stderr
