"""Checkpoints: exact round trips, atomic writes that survive kill -9, and clear errors for
missing, truncated or mismatched files."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from andromeda import Andromeda
from andromeda.checkpoint import (
    CONFIG_FILE,
    LATEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint_tokenizer,
    load_config,
    load_pretrained,
    load_trainer_state,
    remove_incomplete,
    resolve_checkpoint,
    save_checkpoint,
    save_pretrained,
    step_checkpoints,
)
from andromeda.tokenizers import ByteTokenizer, train_bpe


def _tiny(seed: int = 0) -> Andromeda:
    torch.manual_seed(seed)
    return Andromeda.from_config("tiny", max_seq_len=64)


def _assert_same_weights(a: Andromeda, b: Andromeda) -> None:
    sa, sb = a.Andromeda.state_dict(), b.Andromeda.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_round_trip_weights_config_and_byte_tokenizer(tmp_path):
    model = _tiny()
    save_pretrained(model, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    loaded = Andromeda.from_pretrained(tmp_path / "ckpt")
    _assert_same_weights(model, loaded)
    assert loaded.config == model.config
    tokens = torch.randint(0, 258, (2, 16))
    assert torch.equal(loaded.Andromeda(tokens), model.Andromeda(tokens))
    tokenizer = load_checkpoint_tokenizer(tmp_path / "ckpt")
    assert isinstance(tokenizer, ByteTokenizer)


def test_round_trip_bpe_tokenizer_and_dtype(tmp_path):
    bpe = train_bpe(["to be or not to be, that is the question"] * 20, vocab_size=300)
    model = _tiny()
    save_pretrained(model, tmp_path / "ckpt", tokenizer=bpe)
    loaded = load_checkpoint_tokenizer(tmp_path / "ckpt")
    text = "to be, or not to be"
    assert loaded.encode(text) == bpe.encode(text)
    assert loaded.vocab_size == bpe.vocab_size and loaded.eos_id == bpe.eos_id
    half = load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    weight = model.Andromeda.token_emb.weight
    assert half.Andromeda.token_emb.weight.dtype == torch.bfloat16
    assert torch.equal(half.Andromeda.token_emb.weight, weight.to(torch.bfloat16))


def test_save_pretrained_replaces_an_existing_folder(tmp_path):
    save_pretrained(_tiny(0), tmp_path / "ckpt")
    second = _tiny(1)
    save_pretrained(second, tmp_path / "ckpt")
    _assert_same_weights(second, load_pretrained(tmp_path / "ckpt"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folders left behind


def test_run_folder_keeps_the_last_k_and_points_latest_at_the_newest(tmp_path):
    models = {step: _tiny(step) for step in (1, 2, 3)}
    for step, model in models.items():
        save_checkpoint(tmp_path, step, model, tokenizer=ByteTokenizer(), trainer_state={"step": step}, keep=2)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert (tmp_path / LATEST_FILE).read_text().strip() == "checkpoints/step_000003"
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000003"
    _assert_same_weights(models[3], load_pretrained(tmp_path))  # a run folder means its latest
    assert load_trainer_state(tmp_path)["step"] == 3
    # A latest pointer naming a missing folder falls back to the highest complete step.
    (tmp_path / LATEST_FILE).write_text("checkpoints/step_000009\n")
    assert latest_checkpoint(tmp_path).name == "step_000003"


def test_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    """What kill -9 during a save leaves: a staging folder with a half-written weights file."""
    model = _tiny()
    save_checkpoint(tmp_path, 1, model, tokenizer=ByteTokenizer(), keep=2)
    staging = tmp_path / "checkpoints" / ".tmp-abc123"
    staging.mkdir()
    full = (tmp_path / "checkpoints" / "step_000001" / WEIGHTS_FILE).read_bytes()
    (staging / WEIGHTS_FILE).write_bytes(full[: len(full) // 2])
    (tmp_path / ".tmp-latest-xyz").write_text("checkpoints/step_000002")
    assert latest_checkpoint(tmp_path).name == "step_000001"
    _assert_same_weights(model, load_pretrained(tmp_path))
    removed = remove_incomplete(tmp_path)
    assert {p.name for p in removed} == {".tmp-abc123", ".tmp-latest-xyz"}
    assert not staging.exists()


def test_kill_9_while_saving_never_leaves_a_broken_checkpoint(tmp_path):
    """A process saving in a loop is killed at an arbitrary moment; every complete-looking
    checkpoint must load, and the newest must be one of the saved models."""
    script = textwrap.dedent(f"""
        import sys, torch
        from andromeda import Andromeda
        from andromeda.checkpoint import save_checkpoint
        torch.manual_seed(0)
        model = Andromeda.from_config("tiny", max_seq_len=64, dim=128)
        step = 0
        while True:
            step += 1
            with torch.no_grad():
                model.Andromeda.token_emb.weight.fill_(step)
            save_checkpoint({str(tmp_path)!r}, step, model, trainer_state={{"step": step}}, keep=2)
            if step == 3:
                print("saving", flush=True)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(0.37)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    checkpoints = step_checkpoints(tmp_path)
    assert checkpoints, "at least the first checkpoints were complete before the kill"
    for folder in checkpoints:
        step = int(folder.name.split("_")[1])
        model = load_pretrained(folder)
        assert torch.all(model.Andromeda.token_emb.weight == step)
        assert load_trainer_state(folder)["step"] == step
    latest = latest_checkpoint(tmp_path)
    assert latest in checkpoints
    remove_incomplete(tmp_path)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_truncated_weights_raise_naming_the_file(tmp_path):
    save_pretrained(_tiny(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} is not a readable safetensors file \(truncated"):
        load_pretrained(tmp_path / "ckpt")


def test_missing_files_raise_file_not_found(tmp_path):
    save_pretrained(_tiny(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"has no {WEIGHTS_FILE}"):
        load_pretrained(tmp_path / "ckpt")
    save_pretrained(_tiny(), tmp_path / "ckpt2")
    (tmp_path / "ckpt2" / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"has no {CONFIG_FILE}"):
        load_pretrained(tmp_path / "ckpt2")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_checkpoint_tokenizer(tmp_path / "ckpt2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        load_pretrained(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="cannot resume training"):
        load_trainer_state(tmp_path / "ckpt")


def test_config_not_matching_the_weights_raises_before_building(tmp_path):
    save_pretrained(_tiny(), tmp_path / "ckpt")
    config = load_config(tmp_path / "ckpt")
    config.replace(dim=128, depth=3).to_json(tmp_path / "ckpt" / CONFIG_FILE)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "ckpt")
    message = str(info.value)
    assert f"{WEIGHTS_FILE} does not match" in message
    assert "missing tensors ['blocks.2." in message
    assert "blocks.0.ff.proj_in.weight: (256, 64) in the file, (512, 128) from config.json" in message


def test_corrupt_config_and_trainer_state_raise_checkpoint_errors(tmp_path):
    save_checkpoint(tmp_path, 1, _tiny(), trainer_state={"step": 1})
    folder = latest_checkpoint(tmp_path)
    state = folder / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="trainer_state.pt cannot be read"):
        load_trainer_state(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"dim": "wide"}))
    with pytest.raises(CheckpointError, match="config.json is not a valid model config"):
        load_pretrained(folder)


def test_save_checkpoint_rejects_keep_zero(tmp_path):
    with pytest.raises(ValueError, match="keep must be at least 1"):
        save_checkpoint(tmp_path, 1, _tiny(), keep=0)
