"""Preemption: SIGTERM or SIGUSR1 (what clusters and SLURM send before killing a job) finish the
current step, save a checkpoint and exit with PREEMPTED_EXIT_CODE; `--resume` then continues
bit-for-bit. Under torchrun the processes agree on the step, even when only one got the signal.
Real signals, sent at a known step through the test-only pause point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from andromeda.checkpoint import latest_checkpoint, load_transformer, step_checkpoints
from andromeda.pause import TEST_PAUSE_ENV, TOKENIZE_PAUSE_ENV
from andromeda.train import PREEMPTED_EXIT_CODE
from helpers import andromeda_command, child_env, run_andromeda

DEADLINE_S = 120


def args(out, corpus, cache, *extra):
    return ["train", "--out", str(out), "--preset", "tiny", "--override", "max_seq_len=64", "--data", str(corpus),
            "--batch-size", "8", "--seq-len", "32", "--max-steps", "6", "--save-every", "4", "--warmup-steps", "1",
            "--eval-batches", "0", "--log-every", "1", "--device", "cpu", "--no-progress", "--cache-dir", str(cache),
            *extra]


def losses(run):
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"], e["lr"]) for e in entries if e["type"] == "train"]


def signal_when_paused(command, pause, sig, pid_of=lambda line: int(line.rsplit("pid ", 1)[1].rstrip(")\n"))):
    """Run `command` with a pause point; send `sig` to the process that reports the pause; return
    (exit code, stderr)."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=child_env(**{TEST_PAUSE_ENV: pause}))
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "paused at" in line:
                os.kill(pid_of(line), sig)
                break
        rest = proc.communicate(timeout=DEADLINE_S)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines) + rest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_at_the_current_step_and_resume_is_bit_for_bit(tmp_path, corpus, sig):
    cache = tmp_path / "cache"
    straight = run_andromeda(*args(tmp_path / "straight", corpus, cache))
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "run"
    code, err = signal_when_paused(andromeda_command(*args(run, corpus, cache)), "after-step:3", sig)
    assert code == PREEMPTED_EXIT_CODE, err
    assert "preempted (SIGTERM/SIGUSR1) at step 3; saved a checkpoint" in err and "Traceback" not in err
    assert latest_checkpoint(run).name == "step_000003"
    resumed = run_andromeda("train", "--out", str(run), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(tmp_path / "straight")
    a, b = load_transformer(run).state_dict(), load_transformer(tmp_path / "straight").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_processes_agree_on_the_step_when_one_is_signalled(tmp_path, corpus):
    cache = tmp_path / "cache"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "andromeda"]
    extra = ("--parallel", "ddp", "--dist-timeout", "60")
    straight = subprocess.run(launcher + args(tmp_path / "straight", corpus, cache, *extra), env=child_env(),
                              capture_output=True, text=True, timeout=DEADLINE_S)
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "run"
    # Only rank 1 pauses after step 3 and gets SIGUSR1; rank 0 waits for it in the step's agreement.
    code, err = signal_when_paused(launcher + args(run, corpus, cache, *extra), "rank1:after-step:3", signal.SIGUSR1)
    assert code != 0, err  # torchrun reports its workers' exit (75) as a failure: the scheduler requeues
    assert err.count("preempted (SIGTERM/SIGUSR1) at step 3; saved a checkpoint") == 2, err  # both ranks
    assert [p.name for p in step_checkpoints(run)] == ["step_000003"]  # both processes stopped at step 3
    resumed = subprocess.run(launcher + ["train", "--out", str(run), "--resume", "--no-progress"], env=child_env(),
                             capture_output=True, text=True, timeout=DEADLINE_S)
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _, _ in losses(run)] == [s for s, _, _ in losses(tmp_path / "straight")]
    assert [loss for _, loss, _ in losses(run)] == pytest.approx([loss for _, loss, _ in losses(tmp_path / "straight")],
                                                                 rel=1e-6)


def signal_when_tokenizing(command, marker, sig):
    """Run `command` with the tokenizer's test pause (it stops after its first document, that
    document's tokens flushed to a temporary file); send `sig` then; return (exit code, stderr)."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                            env=child_env(**{TOKENIZE_PAUSE_ENV: f"1:{marker}"}))
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not marker.exists():
            assert proc.poll() is None, f"train ended before it tokenized: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "the tokenizer never paused"
            time.sleep(0.05)
        proc.send_signal(sig)
        err = proc.communicate(timeout=DEADLINE_S)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("where", ["prepare-data", "tokenizing"])
def test_a_signal_while_preparing_the_data_exits_for_a_requeue(tmp_path, corpus, where):
    """Before the first step there is nothing to save: the run stops at once, with the exit code and
    message of a preempted run, and the token cache holds nothing half-written."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    command = andromeda_command(*args(run, corpus, cache))
    if where == "prepare-data":
        code, err = signal_when_paused(command, "prepare-data", signal.SIGTERM)
    else:
        code, err = signal_when_tokenizing(command, tmp_path / "paused", signal.SIGTERM)
    assert code == PREEMPTED_EXIT_CODE, err
    assert "andromeda train: preempted (SIGTERM/SIGUSR1) while preparing the run, before it took a step" in err, err
    assert "Traceback" not in err
    assert not step_checkpoints(run)
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.json"))  # nothing half-done cached
