"""Experiment tracking: TensorBoard event files and an offline Weights & Biases run hold the same
numbers as metrics.jsonl, read back with the trackers' own readers."""

from __future__ import annotations

import json
import time

import pytest

from andromeda.train import TrainConfig, train
from helpers import tiny_train_config


def metrics(run, kind):
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e for e in entries if e["type"] == kind}


def test_tensorboard_events_hold_the_logged_metrics(tmp_path, corpus):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train(tiny_train_config(tmp_path, corpus, report_to=("tensorboard",)))
    run = tmp_path / "run"
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {step: entry["loss"] for step, entry in metrics(run, "train").items()}
    assert logged.keys() == expected.keys() == set(range(1, 7))
    assert list(logged.values()) == pytest.approx(list(expected.values()), rel=1e-6)
    held_out = {e.step: e.value for e in events.Scalars("eval/bits_per_byte")}
    assert held_out == pytest.approx({s: e["bits_per_byte"] for s, e in metrics(run, "eval").items()}, rel=1e-6)
    assert {e.step for e in events.Scalars("train/lr")} == set(range(1, 7))
    assert "loss" in events.Tags()["images"]  # the final loss plot


def test_wandb_writes_an_offline_run_with_config_and_summary(tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default: no network here
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_train_config(tmp_path, corpus, report_to=("wandb", "tensorboard")))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb keeps an offline run as protobuf records (synced later with `wandb sync`); logged
    # values are stored as JSON text in them, so each one can be found in the file.
    file = next(runs[0].glob("run-*.wandb"))
    last = json.dumps(metrics(tmp_path / "run", "eval")[6]["bits_per_byte"]).encode()
    for _ in range(600):  # wandb's service process may still be flushing: up to 60 s on a loaded machine
        if last in (record := file.read_bytes()):
            break
        time.sleep(0.1)
    for entry in metrics(tmp_path / "run", "train").values():
        assert json.dumps(entry["loss"]).encode() in record, entry
    for entry in metrics(tmp_path / "run", "eval").values():
        assert json.dumps(entry["bits_per_byte"]).encode() in record, entry
    assert b"train/loss" in record and b"seq_len" in record and b"loss_plot" in record


def test_unknown_trackers_are_named(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"report_to must name trackers among none, tensorboard, wandb, got \['mlflow'\]"):
        TrainConfig(out=str(tmp_path), max_steps=1, report_to=("mlflow",))
