"""Checkpoints: exact round trips, the trainer's atomic writes surviving kill -9 at a known point
inside a save, and clear errors for missing, truncated or mismatched files."""

import json
import os
import shutil
import signal
import subprocess

import pytest
import torch

from andromeda import Andromeda
from andromeda.checkpoint import (
    CONFIG_FILE,
    LATEST_FILE,
    TRAINER_STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint_tokenizer,
    load_config,
    load_transformer,
    remove_incomplete,
    resolve_checkpoint,
    save_pretrained,
    step_checkpoints,
)
from andromeda.pause import TEST_PAUSE_ENV
from andromeda.tokenizers import ByteTokenizer, train_bpe
from andromeda.train import train
from andromeda.train.state import read_trainer_state
from helpers import andromeda_command, child_env, run_andromeda, tiny_train_config


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return Andromeda.from_config("tiny", max_seq_len=64).Andromeda


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_round_trip_weights_config_and_byte_tokenizer(tmp_path):
    net = _tiny()
    save_pretrained(net, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    loaded = Andromeda.from_pretrained(tmp_path / "ckpt")
    _assert_same_weights(net, loaded.Andromeda)
    assert loaded.config == net.config
    tokens = torch.randint(0, 258, (2, 16))
    assert torch.equal(loaded.Andromeda(tokens), net(tokens))
    assert isinstance(load_checkpoint_tokenizer(tmp_path / "ckpt"), ByteTokenizer)


def test_round_trip_bpe_tokenizer_and_dtype(tmp_path):
    bpe = train_bpe(["to be or not to be, that is the question"] * 20, vocab_size=300)
    net = _tiny()
    Andromeda.from_transformer(net).save_pretrained(tmp_path / "ckpt", tokenizer=bpe)
    loaded = load_checkpoint_tokenizer(tmp_path / "ckpt")
    text = "to be, or not to be"
    assert loaded.encode(text) == bpe.encode(text)
    assert loaded.vocab_size == bpe.vocab_size and loaded.eos_id == bpe.eos_id
    half = load_transformer(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert half.token_emb.weight.dtype == torch.bfloat16
    assert torch.equal(half.token_emb.weight, net.token_emb.weight.to(torch.bfloat16))


def test_save_pretrained_replaces_an_existing_folder(tmp_path):
    save_pretrained(_tiny(0), tmp_path / "ckpt")
    second = _tiny(1)
    save_pretrained(second, tmp_path / "ckpt")
    _assert_same_weights(second, load_transformer(tmp_path / "ckpt"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folders left behind


def test_a_run_keeps_the_last_k_and_points_latest_at_the_newest(tmp_path, corpus):
    train(tiny_train_config(tmp_path, corpus, keep=2, eval_batches=0))
    run = tmp_path / "run"
    assert [p.name for p in step_checkpoints(run)] == ["step_000004", "step_000006"]
    assert (run / LATEST_FILE).read_text().strip() == "checkpoints/step_000006"
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_000006"
    assert read_trainer_state(run).progress.step == 6
    # A latest pointer naming a missing folder falls back to the highest complete step.
    (run / LATEST_FILE).write_text("checkpoints/step_000009\n")
    assert latest_checkpoint(run).name == "step_000006"


def test_kill_9_inside_a_save_leaves_the_previous_checkpoint_and_resume_ends_bit_for_bit(tmp_path, corpus):
    """The trainer pauses inside the save of step 4 (fsynced, not yet renamed) under a test-only
    variable and is killed there: step 2 stays the run's checkpoint and loads; the staging folder
    is never taken for a checkpoint; the resumed run cleans it up and ends bit-for-bit where an
    uninterrupted run ends."""
    def args(out):
        return ["train", "--out", str(out), "--preset", "tiny", "--override", "max_seq_len=64", "--data",
                str(corpus), "--batch-size", "4", "--seq-len", "32", "--max-steps", "6", "--save-every", "2",
                "--warmup-steps", "2", "--eval-batches", "0", "--log-every", "1", "--device", "cpu",
                "--no-progress", "--cache-dir", str(tmp_path / "cache")]

    straight = run_andromeda(*args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(andromeda_command(*args(run)), stderr=subprocess.PIPE, text=True,
                            env=child_env(**{TEST_PAUSE_ENV: "before-rename:step_000004"}))
    try:
        lines = []
        for line in proc.stderr:  # ends if the process dies; the pause waits until it is killed
            lines.append(line)
            if "paused at before-rename:step_000004" in line:
                break
        assert lines and "paused at" in lines[-1], "".join(lines)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    staging = run / "checkpoints" / ".tmp-step_000004"
    assert (staging / WEIGHTS_FILE).is_file() and (staging / TRAINER_STATE_FILE).is_file()  # whole, unrenamed
    assert [p.name for p in step_checkpoints(run)] == ["step_000002"]
    assert latest_checkpoint(run).name == "step_000002"
    assert read_trainer_state(run).progress.step == 2
    load_transformer(run)

    resumed = run_andromeda("train", "--out", str(run), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert not staging.exists()
    assert [p.name for p in step_checkpoints(run)] == ["step_000004", "step_000006"]  # --keep 2
    _assert_same_weights(load_transformer(run), load_transformer(tmp_path / "straight"))
    assert _train_losses(run) == _train_losses(tmp_path / "straight")


def _train_losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"], e["lr"]) for e in map(json.loads, lines) if e["type"] == "train"]


def test_remove_incomplete_deletes_only_leftovers(tmp_path):
    save_pretrained(_tiny(), tmp_path / "checkpoints" / "step_000001")
    (tmp_path / "checkpoints" / ".tmp-step_000002").mkdir()
    (tmp_path / ".tmp-latest-xyz").write_text("checkpoints/step_000002")
    removed = remove_incomplete(tmp_path)
    assert {p.name for p in removed} == {".tmp-step_000002", ".tmp-latest-xyz"}
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_000001"]


def test_truncated_weights_raise_naming_the_file(tmp_path):
    save_pretrained(_tiny(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} has {len(data) // 2} bytes, its manifest says "
                                              rf"{len(data)}: truncated"):
        load_transformer(tmp_path / "ckpt")
    # Without the manifest check, safetensors' own reader names the file.
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} is not a readable safetensors file \(truncated"):
        load_transformer(tmp_path / "ckpt", verify=False)


def test_missing_files_raise_file_not_found(tmp_path):
    save_pretrained(_tiny(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"has no {WEIGHTS_FILE}"):
        load_transformer(tmp_path / "ckpt")
    save_pretrained(_tiny(), tmp_path / "ckpt2")
    (tmp_path / "ckpt2" / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"has no {CONFIG_FILE}"):
        load_transformer(tmp_path / "ckpt2")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_checkpoint_tokenizer(tmp_path / "ckpt2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_transformer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        load_transformer(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        load_transformer(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="cannot resume training"):
        read_trainer_state(tmp_path / "ckpt")


def test_config_not_matching_the_weights_raises_before_building(tmp_path):
    save_pretrained(_tiny(), tmp_path / "ckpt")
    config = load_config(tmp_path / "ckpt")
    config.replace(dim=128, depth=3).to_json(tmp_path / "ckpt" / CONFIG_FILE)
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE} (does not match its SHA-256|has \d+ bytes, its manifest says)"):
        load_transformer(tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as info:  # past the manifest, the shapes are checked too
        load_transformer(tmp_path / "ckpt", verify=False)
    message = str(info.value)
    assert f"{WEIGHTS_FILE} does not match" in message
    assert "missing tensors ['blocks.2." in message
    assert "blocks.0.ff.proj_in.weight: (256, 64) in the file, (512, 128) from config.json" in message


def test_corrupt_config_and_trainer_state_raise_checkpoint_errors(tmp_path, corpus):
    train(tiny_train_config(tmp_path, corpus, max_steps=2, eval_batches=0))
    folder = latest_checkpoint(tmp_path / "run")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    state = copy / TRAINER_STATE_FILE
    state.write_bytes(state.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=f"{TRAINER_STATE_FILE} cannot be read") as info:
        read_trainer_state(copy)
    assert "weights_only" not in str(info.value)
    (copy / CONFIG_FILE).write_text(json.dumps({"dim": "wide"}))
    with pytest.raises(CheckpointError, match="config.json is not a valid model config"):
        load_transformer(copy, verify=False)
