"""Reliability, tried as a user would: `andromeda` in subprocesses, real signals, a real full
filesystem. Nothing runs from a checkpoint; one run per folder; a resumed run refuses changed data;
every failure is a one-line error that names the problem, and loses nothing."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from andromeda import Config
from andromeda.checkpoint import (
    MANIFEST_FILE,
    OPTIMIZER_DIR,
    WEIGHTS_FILE,
    latest_checkpoint,
    load_transformer,
    step_checkpoints,
    write_manifest,
)
from andromeda.pause import TEST_PAUSE_ENV
from helpers import CORPUS_TEXT, andromeda_command, child_env, default_sigint, run_andromeda

DEADLINE_S = 60


def train_args(out: Path, data: Path | str, cache: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--preset", "tiny", "--override", "max_seq_len=64", "--data", str(data),
            "--batch-size", "4", "--seq-len", "32", "--max-steps", "4", "--save-every", "2", "--warmup-steps", "1",
            "--eval-batches", "0", "--log-every", "1", "--device", "cpu", "--no-progress", "--cache-dir",
            str(cache), *extra]


def one_line_error(result: subprocess.CompletedProcess, command: str = "train") -> str:
    """The error of a failed command: exit 1, one `andromeda CMD: error: ...` line, no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"andromeda {command}: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4), trained once for the module."""
    folder = tmp_path_factory.mktemp("finished")
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS_TEXT)
    result = run_andromeda(*train_args(folder / "run", corpus, folder / "cache"))
    assert result.returncode == 0, result.stderr
    return folder / "run"


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished run of this test's own (tests damage and resume it)."""
    return Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))


class Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_optimizer_index_is_refused_and_runs_nothing(run, tmp_path):
    checkpoint = latest_checkpoint(run)
    marker = tmp_path / "pwned"
    (checkpoint / OPTIMIZER_DIR / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    write_manifest(checkpoint)  # an attacker rewrites the manifest too
    error = one_line_error(run_andromeda("train", "--out", str(run), "--resume", "--max-steps", "6"))
    assert "optimizer/.metadata is not a valid optimizer-state index" in error
    assert "refusing to load posix.system" in error
    assert not marker.exists()


def test_a_crafted_optimizer_item_is_refused_and_runs_nothing(run, tmp_path):
    """A byte item (where DCP keeps non-tensor values) holding an object that runs code."""
    checkpoint = latest_checkpoint(run)
    marker = tmp_path / "pwned"
    folder = checkpoint / OPTIMIZER_DIR
    shutil.rmtree(folder)
    # Same keys as an AdamW state dict, with a malicious object where the hyperparameters go.
    net = load_transformer(run, verify=False)
    from andromeda.train import TrainConfig
    from andromeda.train.optim import build_optimizer
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optimizer = build_optimizer(net, TrainConfig(out=str(run), max_steps=1))
    optimizer.zero_grad(set_to_none=True)
    template = get_optimizer_state_dict(net, optimizer)
    template["param_groups"][0]["lr"] = Exploit(marker)
    dcp.save(template, checkpoint_id=folder, no_dist=True)
    write_manifest(checkpoint)
    error = one_line_error(run_andromeda("train", "--out", str(run), "--resume", "--max-steps", "6"))
    assert "holds something other than plain data" in error
    assert not marker.exists()


def test_a_second_run_on_the_same_folder_stops_at_once_and_a_killed_holder_never_blocks(tmp_path, corpus):
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = subprocess.Popen(andromeda_command(*train_args(out, corpus, cache)), stderr=subprocess.PIPE, text=True,
                             env=child_env(**{TEST_PAUSE_ENV: "before-rename:step_000002"}))
    try:
        for line in first.stderr:  # holds the lock while paused inside its first save
            if "paused at" in line:
                break
        started = time.monotonic()
        second = run_andromeda(*train_args(out, corpus, cache, "--seed", "1"))
        assert time.monotonic() - started < DEADLINE_S
        error = one_line_error(second)
        assert f"{out} is in use by another training process (PID {first.pid})" in error
        assert not step_checkpoints(out)  # the second run wrote nothing
    finally:
        first.kill()  # SIGKILL: the kernel releases its lock
        first.wait(timeout=30)
    third = run_andromeda(*train_args(out, corpus, cache))
    assert third.returncode == 0, third.stderr
    assert [p.name for p in step_checkpoints(out)] == ["step_000002", "step_000004"]


def test_relative_data_is_stored_absolute_and_changed_data_is_refused(tmp_path):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    (here / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    (elsewhere / "corpus.txt").write_text("a completely different text about something else. " * 100)
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = train_args(out, "corpus.txt", cache, "--max-steps", "2")
    first = subprocess.run(andromeda_command(*args), cwd=here, env=child_env(), capture_output=True, text=True,
                           timeout=DEADLINE_S * 2)
    assert first.returncode == 0, first.stderr
    saved = json.loads((latest_checkpoint(out) / "train_config.json").read_text())
    assert saved["data"] == [str(here / "corpus.txt")]
    # Resumed from another folder holding a file of the same name: the run's own file is used.
    resume = ["train", "--out", str(out), "--resume", "--max-steps", "4", "--no-progress"]
    second = subprocess.run(andromeda_command(*resume), cwd=elsewhere, env=child_env(), capture_output=True,
                            text=True, timeout=DEADLINE_S * 2)
    assert second.returncode == 0, second.stderr
    # The run's file changes: resuming is refused, naming it, unless the change is accepted.
    (here / "corpus.txt").write_text("the quick brown fox jumps over the lazy cat. " * 100)
    error = one_line_error(run_andromeda(*resume[:-1], "--max-steps", "6"))
    assert f"train file {here / 'corpus.txt'} has different contents from when the run started" in error
    assert "--allow-data-change" in error
    accepted = run_andromeda(*resume[:-1], "--max-steps", "6", "--allow-data-change")
    assert accepted.returncode == 0, accepted.stderr
    assert "resuming on changed data" in accepted.stderr
    (here / "corpus.txt").unlink()
    error = one_line_error(run_andromeda(*resume[:-1], "--max-steps", "8"))
    assert "matches nothing" in error and "corpus.txt" in error


@pytest.mark.parametrize("victim", ["optimizer/__0_0.distcp", "optimizer/.metadata"])
def test_a_truncated_optimizer_file_is_named(run, victim):
    checkpoint = latest_checkpoint(run)
    path = checkpoint / victim
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    error = one_line_error(run_andromeda("train", "--out", str(run), "--resume", "--max-steps", "6"))
    assert f"{path} has {len(data) // 2} bytes, its manifest says {len(data)}: truncated" in error
    # Even without a manifest (an older checkpoint), the reader names the folder, no traceback.
    (checkpoint / MANIFEST_FILE).unlink()
    error = one_line_error(run_andromeda("train", "--out", str(run), "--resume", "--max-steps", "6"))
    assert f"{checkpoint / OPTIMIZER_DIR}" in error and ("cannot be read" in error or "not a valid" in error)


def test_flipped_bytes_in_the_weights_are_caught_and_can_be_skipped(run, tmp_path, corpus):
    weights = latest_checkpoint(run) / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 2000, len(data) - 1800):  # inside the last tensor's values
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    common = ["--checkpoint", str(run), "--data", str(corpus), "--device", "cpu", "--cache-dir",
              str(tmp_path / "cache"), "--json"]
    error = one_line_error(run_andromeda("eval", *common), "eval")
    assert f"{weights} does not match its SHA-256" in error and "--no-verify" in error
    skipped = run_andromeda("eval", *common, "--no-verify")
    assert skipped.returncode == 0, skipped.stderr  # what the user asked for: loaded as it is
    error = one_line_error(run_andromeda("train", "--out", str(run), "--resume", "--max-steps", "6"))
    assert "does not match its SHA-256" in error


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_a_full_disk_stops_the_run_naming_the_file_and_keeps_earlier_checkpoints(tmp_path, corpus):
    disk = tmp_path / "disk"
    disk.mkdir()
    # Big enough for the first checkpoint (about 1.5 MB for this model) and not for two.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "run"
        result = run_andromeda(*train_args(out, corpus, tmp_path / "cache", "--keep", "5"))
        error = one_line_error(result)
        assert "no space left on device while writing" in error and "step 4 was not saved" in error
        assert f"earlier checkpoints are intact (latest: {out / 'checkpoints' / 'step_000002'})" in error
        assert [p.name for p in step_checkpoints(out)] == ["step_000002"]
        assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial save was removed
        load_transformer(out)  # and the earlier one verifies and loads
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_latest_pointer_outside_the_run_is_ignored(run, tmp_path, caplog):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    (run / "latest").write_text(f"../{other.name}/checkpoints/step_000002\n")
    assert latest_checkpoint(run) == run / "checkpoints" / "step_000004"
    (run / "latest").write_text(f"{other}/checkpoints/step_000002\n")
    assert latest_checkpoint(run) == run / "checkpoints" / "step_000004"


def test_resuming_a_finished_run_changes_nothing_and_a_larger_max_steps_extends_it(run):
    metrics = (run / "metrics.jsonl").read_text()
    again = run_andromeda("train", "--out", str(run), "--resume", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "already finished at step 4" in again.stderr
    assert (run / "metrics.jsonl").read_text() == metrics  # no second eval or train entry
    longer = run_andromeda("train", "--out", str(run), "--resume", "--max-steps", "7", "--no-progress")
    assert longer.returncode == 0, longer.stderr
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in entries if e["type"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 8))
    min_lr = json.loads((latest_checkpoint(run) / "train_config.json").read_text())["min_lr"]
    assert [e["lr"] for e in train[4:]] == pytest.approx([min_lr] * 3)  # past the schedule: min_lr
    assert latest_checkpoint(run).name == "step_000007"


def test_files_follow_the_umask(run):
    checkpoint = latest_checkpoint(run)
    assert (checkpoint / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644  # umask 022 in tests' env
    assert checkpoint.stat().st_mode & 0o777 == 0o755


def test_generate_rejects_bad_arguments_before_printing(run):
    result = run_andromeda("generate", "--checkpoint", str(run), "--prompt", "The", "--top-p", "2",
                           "--device", "cpu")
    error = one_line_error(result, "generate")
    assert "top_p must be in (0, 1]" in error
    assert result.stdout == ""


def test_ctrl_c_during_start_up_and_a_double_ctrl_c_exit_cleanly(tmp_path, corpus):
    proc = subprocess.Popen(andromeda_command("plan", "--preset", "tiny"), stderr=subprocess.PIPE, text=True,
                            env=child_env(**{TEST_PAUSE_ENV: "startup"}), preexec_fn=default_sigint)
    assert "paused at startup" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 130 and "Traceback" not in err and "andromeda: interrupted" in err

    out = tmp_path / "run"
    proc = subprocess.Popen(andromeda_command(*train_args(out, corpus, tmp_path / "cache", "--max-steps", "1000")),
                            stderr=subprocess.PIPE, text=True,
                            env=child_env(**{TEST_PAUSE_ENV: "after-step:1,before-rename:step_000001"}),
                            preexec_fn=default_sigint)
    for line in proc.stderr:
        if "paused at after-step:1" in line:
            proc.send_signal(signal.SIGINT)  # the first asks for a checkpoint after this step...
        if "paused at before-rename:step_000001" in line:
            proc.send_signal(signal.SIGINT)  # ...the second, during that save, interrupts at once
            break
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "andromeda train: interrupted"


@pytest.mark.parametrize("field", ["norm_eps", "rotary_base", "xpos_scale_base"])
def test_nan_and_inf_are_rejected_by_the_model_config(field):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"Config.{field} must be a finite number"):
            Config.from_preset("tiny", **{field: bad})


def test_load_x_transformers_rejects_what_is_not_a_state_dict():
    from andromeda import Andromeda

    model = Andromeda.from_config("tiny")
    with pytest.raises(TypeError, match="expects an x-transformers state dict .* got str"):
        model.load_x_transformers("nope")


def test_eval_rejects_max_windows_below_one(run, tmp_path, corpus):
    for bad in ("0", "-1"):
        result = run_andromeda("eval", "--checkpoint", str(run), "--data", str(corpus), "--max-windows", bad,
                               "--device", "cpu", "--cache-dir", str(tmp_path / "cache"))
        assert f"max_windows must be at least 1 (or None to score every window), got {bad}" in one_line_error(
            result, "eval")


def _rewrite_optimizer_index(checkpoint: Path, change) -> None:
    """Apply `change(storage_info)` to every storage entry of the optimizer index, as an attacker
    holding only DCP's own (allow-listed) classes would, and rewrite the manifest to match."""
    from andromeda.parallel.dcp import _MetadataUnpickler

    index = checkpoint / OPTIMIZER_DIR / ".metadata"
    with open(index, "rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    for info in metadata.storage_data.values():
        change(info)
    index.write_bytes(pickle.dumps(metadata))
    write_manifest(checkpoint)


@pytest.mark.parametrize("attack,message", [
    ("outside", "points outside the folder"),
    ("dev-zero", "points outside the folder"),
    ("past-the-end", "truncated or crafted"),
    ("transform", "asks for transforms"),
])
def test_a_crafted_optimizer_index_reads_nothing_outside_its_files(run, tmp_path, attack, message):
    checkpoint = latest_checkpoint(run)
    outside = tmp_path / "outside.bin"
    shutil.copyfile(next((checkpoint / OPTIMIZER_DIR).glob("*.distcp")), outside)

    def change(info):
        if attack == "outside":
            info.relative_path = os.path.relpath(outside, checkpoint / OPTIMIZER_DIR)
        elif attack == "dev-zero":
            info.relative_path, info.length = "/dev/zero", 2**31
        elif attack == "past-the-end":
            info.length = 2**31
        else:
            info.transform_descriptors = ["zstd"]

    _rewrite_optimizer_index(checkpoint, change)
    error = one_line_error(run_andromeda("train", "--out", str(run), "--resume", "--max-steps", "6"))
    assert "optimizer/.metadata: storage entry" in error and message in error
