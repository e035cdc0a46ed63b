"""The folders commands read and write (`andromeda.folders`): a command deletes nothing the user did
not name, a checkpoint or Hugging Face folder contributes only its own regular files, configs too
large to build are refused before anything is built, and malformed JSON files get errors that name
them. Tried through the command line, as a user meets them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from andromeda import cli
from andromeda.checkpoint import (
    CheckpointError,
    load_checkpoint_tokenizer,
    load_config,
    resolve_checkpoint,
    save_pretrained,
    write_manifest,
)
from andromeda.config import MAX_LAYERS_ENV, Config, check_size
from andromeda.folders import UnsafeFileError, member
from andromeda.interop.hf import export_hf, import_hf
from andromeda.serve.chat_template import find_chat_template
from andromeda.tokenizers import ByteTokenizer
from helpers import random_net

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("folders") / "ckpt"
    save_pretrained(random_net(), folder, tokenizer=TOKENIZER)
    return folder


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("folders") / "hf"
    assert cli.main(["export-hf", "--checkpoint", str(checkpoint), "--out", str(folder)]) == 0
    return folder


@pytest.fixture
def run_folder(tmp_path, checkpoint) -> Path:
    """A training run's layout: checkpoints/step_*, latest, metrics.jsonl."""
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "checkpoints" / "step_000002")
    (run / "latest").write_text("checkpoints/step_000002\n")
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
    return run


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(capsys, argv: list[str]) -> str:
    """The one-line error of a command that must fail with exit 1."""
    assert cli.main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------- nothing deleted


@pytest.fixture
def unrelated(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    return folder


def test_quantize_never_replaces_an_unrelated_folder_or_a_run(capsys, checkpoint, unrelated, run_folder):
    before = tree(unrelated)
    error = cli_error(capsys, ["quantize", "--checkpoint", str(checkpoint), "--out", str(unrelated), "--scheme", "int8"])
    assert str(unrelated) in error and "--out" in error
    assert tree(unrelated) == before
    run_before = tree(run_folder)
    error = cli_error(capsys, ["quantize", "--checkpoint", str(run_folder), "--out", str(run_folder),
                               "--scheme", "int8"])
    assert "training run folder" in error and "--out" in error
    assert tree(run_folder) == run_before


def test_quantize_replaces_its_own_earlier_output_but_not_a_full_precision_checkpoint(capsys, tmp_path, checkpoint):
    out = tmp_path / "q"
    args = ["quantize", "--checkpoint", str(checkpoint), "--scheme", "int8", "--out", str(out)]
    assert cli.main(args) == 0 and cli.main(args) == 0  # the second run replaces the first
    assert load_config(out) == load_config(checkpoint)
    full = tmp_path / "full"
    shutil.copytree(checkpoint, full)
    error = cli_error(capsys, [*args[:-1], str(full)])
    assert "is not a quantized checkpoint" in error
    assert tree(full) == tree(checkpoint)
    # A quantized checkpoint with a file of the user's in it is not replaced either.
    (out / "notes.txt").write_text("mine")
    assert "is not a quantized checkpoint" in cli_error(capsys, args)
    assert (out / "notes.txt").read_text() == "mine"


def test_import_hf_never_replaces_an_unrelated_folder_a_run_or_another_kind(capsys, tmp_path, hf_export, unrelated,
                                                                           run_folder):
    before = tree(unrelated)
    assert str(unrelated) in cli_error(capsys, ["import-hf", "--hf", str(hf_export), "--out", str(unrelated)])
    assert tree(unrelated) == before
    run_before = tree(run_folder)
    assert "training run folder" in cli_error(capsys, ["import-hf", "--hf", str(hf_export), "--out", str(run_folder)])
    assert tree(run_folder) == run_before
    out = tmp_path / "imported"
    assert cli.main(["import-hf", "--hf", str(hf_export), "--out", str(out)]) == 0
    assert cli.main(["import-hf", "--hf", str(hf_export), "--out", str(out)]) == 0  # its own output: replaced
    # The export itself is not a checkpoint this command writes.
    export_before = tree(hf_export)
    assert "is not a full-precision checkpoint" in cli_error(capsys, ["import-hf", "--hf", str(hf_export), "--out",
                                                                      str(hf_export)])
    assert tree(hf_export) == export_before


def test_export_hf_never_replaces_a_run_or_an_export_holding_other_files(capsys, tmp_path, checkpoint, run_folder):
    run_before = tree(run_folder)
    assert "training run folder" in cli_error(capsys, ["export-hf", "--checkpoint", str(checkpoint), "--out",
                                                       str(run_folder)])
    assert tree(run_folder) == run_before
    out = tmp_path / "hf"
    args = ["export-hf", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert cli.main(args) == 0 and cli.main(args) == 0
    (out / "README.md").write_text("my model card")
    assert "is not a Hugging Face export" in cli_error(capsys, args)
    assert (out / "README.md").read_text() == "my model card"


def test_export_hf_writes_files_by_the_umask(hf_export):
    assert {(p.name, p.stat().st_mode & 0o777) for p in hf_export.iterdir()} == {
        (p.name, 0o644) for p in hf_export.iterdir()}  # umask 022 in tests' environment


def test_save_pretrained_in_python_follows_the_same_rule(tmp_path, unrelated):
    with pytest.raises(FileExistsError, match="choose another directory"):
        save_pretrained(random_net(), unrelated)
    assert (unrelated / "holiday.jpg").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(random_net(), empty)  # an empty folder is as good as a new one
    save_pretrained(random_net(), empty)  # and its own checkpoint is replaced


# --------------------------------------------------------------------------- reading inside the folder


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("API_KEY=hunter2")
    return path


def test_a_chat_template_linked_out_of_the_checkpoint_is_refused(tmp_path, checkpoint, secret):
    crafted = tmp_path / "crafted"
    shutil.copytree(checkpoint, crafted)
    (crafted / "chat_template.jinja").symlink_to(secret)
    write_manifest(crafted)  # an attacker rewrites the manifest too
    with pytest.raises(UnsafeFileError, match="outside"):
        find_chat_template(crafted)
    with pytest.raises(UnsafeFileError, match="chat_template.jinja is a symbolic link"):
        resolve_checkpoint(crafted)


def test_serve_refuses_a_checkpoint_linking_out_and_publishes_nothing(tmp_path, checkpoint, secret):
    crafted = tmp_path / "crafted"
    shutil.copytree(checkpoint, crafted)
    (crafted / "chat_template.jinja").symlink_to(secret)
    write_manifest(crafted)
    result = subprocess.run([*cli_command(), "serve", "--checkpoint", str(crafted), "--port", "9"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr
    assert "is a symbolic link" in result.stderr and "hunter2" not in result.stderr + result.stdout


def cli_command() -> list[str]:
    import sys

    return [sys.executable, "-m", "andromeda"]


def test_a_chat_template_not_in_the_manifest_is_refused_naming_the_flag(tmp_path, checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    (folder / "chat_template.jinja").write_text("{{ messages }}")  # dropped in after writing
    with pytest.raises(CheckpointError, match="--chat-template FILE"):
        find_chat_template(folder)
    write_manifest(folder)  # listed: served
    assert find_chat_template(folder) == "{{ messages }}"


def test_a_fifo_or_a_link_out_for_the_tokenizer_is_refused(tmp_path, checkpoint, secret):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    (folder / "tokenizer_config.json").unlink()
    os.mkfifo(folder / "tokenizer_config.json")  # reading it would block forever
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        load_checkpoint_tokenizer(folder, verify=False)
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(UnsafeFileError, match="outside"):
        load_checkpoint_tokenizer(folder, verify=False)
    # A link that stays inside the folder is a file of the folder.
    (folder / "tokenizer_config.json").unlink()
    (folder / "tok.json").write_text('{"type": "byte"}')
    (folder / "tokenizer_config.json").symlink_to(folder / "tok.json")
    assert isinstance(load_checkpoint_tokenizer(folder, verify=False), ByteTokenizer)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", ""])
def test_member_refuses_names_that_leave_the_folder(tmp_path, name):
    with pytest.raises(UnsafeFileError):
        member(tmp_path, name)


def test_a_manifest_naming_a_file_outside_is_refused(tmp_path, checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../etc/hostname"] = {"size": 1, "sha256": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeFileError, match="points outside the folder"):
        load_config(folder) and load_checkpoint_tokenizer(folder)


def test_a_weight_map_pointing_outside_the_hf_folder_is_refused(tmp_path, hf_export):
    folder = tmp_path / "hf"
    shutil.copytree(hf_export, folder)
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    index = {"weight_map": {"model.embed_tokens.weight": f"../{outside.name}"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeFileError, match="points outside the folder"):
        import_hf(folder)
    index["weight_map"]["model.embed_tokens.weight"] = str(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeFileError, match="points outside the folder"):
        import_hf(folder)


# --------------------------------------------------------------------------- size limits


def test_a_config_with_ten_million_layers_is_refused_before_anything_is_built(capsys, tmp_path, hf_export):
    folder = tmp_path / "hf"
    shutil.copytree(hf_export, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 10_000_000
    (folder / "config.json").write_text(json.dumps(config))
    error = cli_error(capsys, ["import-hf", "--hf", str(folder), "--out", str(tmp_path / "out")])
    assert "10,000,000 layers exceed the limit of 10,000" in error and MAX_LAYERS_ENV in error


def test_a_checkpoint_with_absurd_dims_is_refused_and_the_limit_can_be_raised(tmp_path, checkpoint, monkeypatch):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    data = json.loads((folder / "config.json").read_text())
    data["dim"] = 2**26
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="parameters exceed the limit of 1e\\+12"):
        load_config(folder)
    giant = Config(depth=20_000, dim=64, dim_head=16, heads=4, alibi_num_heads=2, num_tokens=258)
    with pytest.raises(ValueError, match="20,000 layers"):
        check_size(giant)
    monkeypatch.setenv(MAX_LAYERS_ENV, "100000")
    check_size(giant)  # a real giant: allowed when asked


def test_the_parameter_count_from_the_config_matches_the_built_model():
    for overrides in [{}, dict(use_abs_pos_emb=True), dict(attn_qk_norm_dim_scale=False), dict(qk_norm=False,
                                                                                               attn_qk_norm=False)]:
        net = random_net(**overrides)
        assert net.config.num_parameters == net.num_parameters()


# --------------------------------------------------------------------------- JSON shapes


@pytest.mark.parametrize("content", ["[1, 2]", "\"byte\"", "[" * 100_000 + "]" * 100_000, "{not json"])
def test_a_tokenizer_config_that_is_not_an_object_is_named(capsys, tmp_path, checkpoint, hf_export, content):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    (folder / "tokenizer_config.json").write_text(content)
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_checkpoint_tokenizer(folder, verify=False)
    hf = tmp_path / "hf"
    shutil.copytree(hf_export, hf)
    (hf / "tokenizer_config.json").write_text(content)
    error = cli_error(capsys, ["import-hf", "--hf", str(hf), "--out", str(tmp_path / "out")])
    assert "tokenizer_config.json" in error and "expected" in error


# --------------------------------------------------------------------------- a full disk


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_export_hf_onto_a_full_disk_is_one_clear_error_and_keeps_the_earlier_export(tmp_path, checkpoint):
    disk = tmp_path / "disk"
    disk.mkdir()
    # Room for one export of the tiny model (about 0.5 MB of weights), not for two.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "hf"
        first = subprocess.run([*cli_command(), "export-hf", "--checkpoint", str(checkpoint), "--out", str(out)],
                               capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        before = tree(out)
        again = subprocess.run([*cli_command(), "export-hf", "--checkpoint", str(checkpoint), "--out", str(out)],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
        assert "no space left on device while writing" in again.stderr
        assert tree(out) == before and not list(disk.glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_export_hf_writes_nothing_half_done_when_it_fails(tmp_path, checkpoint, monkeypatch):
    import andromeda.interop.hf as hf

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "save_file", broken)
    from andromeda.checkpoint import load_transformer

    with pytest.raises(OSError, match="no space left on device while writing"):
        export_hf(load_transformer(checkpoint), TOKENIZER, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
