"""A run written down as a file: `train --config FILE` runs it, `plan --config FILE` prices it, the
command line overrides it, and a key that is no field is an error naming the key and the file."""

from __future__ import annotations

import pytest

from andromeda import Config, cli
from andromeda.checkpoint import load_config, load_train_config
from andromeda.plan import format_plan, plan
from andromeda.train.config import read_config_file

RUN_TOML = """
preset = "tiny"
seq-len = 16
batch_size = 4
max_steps = 1
eval_batches = 0
lr = 1e-3
device = "cpu"
progress = false
[model_overrides]
max_seq_len = 64
depth = 3
"""


def _write(path, text):
    path.write_text(text)
    return str(path)


def _run_toml(tmp_path, corpus, *lines: str) -> str:
    """RUN_TOML over `corpus`, with more top-level `lines` (before its [model_overrides] table)."""
    top = [f'data = "{corpus}"', f'cache_dir = "{tmp_path / "cache"}"', *lines]
    return "\n".join(top) + "\n" + RUN_TOML


def test_train_runs_the_file_and_the_command_line_overrides_it(tmp_path, corpus):
    config = _write(tmp_path / "run.toml", _run_toml(tmp_path, corpus))
    run = tmp_path / "run"
    assert cli.main(["train", "--config", config, "--out", str(run), "--seq-len", "32", "--override", "dim=32"]) == 0
    saved = load_train_config(run)
    assert saved["seq_len"] == 32 and saved["lr"] == 1e-3 and saved["batch_size"] == 4  # flag over file; file
    assert saved["data"] == [str(corpus)]  # one path where a list is expected
    assert saved["model_overrides"] == {"max_seq_len": 64, "depth": 3, "dim": 32}  # merged, key by key
    model = load_config(run)
    assert (model.depth, model.dim, model.max_seq_len) == (3, 32, 64)


def test_the_file_may_name_the_run_folder_else_out_is_required(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    with_out = _write(tmp_path / "with_out.toml", _run_toml(tmp_path, corpus, f'out = "{run}"'))
    assert cli.main(["train", "--config", with_out]) == 0
    assert load_train_config(run)["out"] == str(run)
    without_out = _write(tmp_path / "without_out.toml", _run_toml(tmp_path, corpus))
    assert cli.main(["train", "--config", without_out]) == 2
    assert "the following arguments are required: --out (or out in the --config file)" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ('preset = "tiny"\nbatchsize = 4\n', "unknown key 'batchsize' in config file {path} (did you mean batch_size?)"),
    ('[model_overrides]\ndepht = 4\n', "unknown key 'model_overrides.depht' in config file {path}"),
    ('seq_len = 32\nseq-len = 64\n', "config file {path} sets seq_len twice"),
    ('preset = "tiny\n', "config file {path} is not valid TOML"),
])
def test_bad_files_are_errors_naming_the_key_and_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    for command in (["train", "--config", str(path), "--out", str(tmp_path / "run")],
                    ["plan", "--config", str(path)]):
        assert cli.main(command) == 1
        assert message.format(path=path) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_file_of_another_kind_or_missing_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"config file .*run.json must end in .toml, .yaml, .yml"):
        read_config_file(tmp_path / "run.json")
    with pytest.raises(FileNotFoundError, match=r"config file .*absent.toml does not exist"):
        read_config_file(tmp_path / "absent.toml")


def test_yaml_reads_as_toml_does(tmp_path):
    pytest.importorskip("yaml")
    toml = read_config_file(_write(tmp_path / "run.toml", 'report_to = ["tensorboard"]\n' + RUN_TOML))
    yaml = read_config_file(_write(tmp_path / "run.yaml", """
preset: tiny
seq-len: 16
batch_size: 4
max_steps: 1
eval_batches: 0
lr: 1.0e-3
device: cpu
progress: false
model_overrides: {max_seq_len: 64, depth: 3}
report_to: [tensorboard]
"""))
    assert yaml == toml
    assert toml["seq_len"] == 16 and toml["report_to"] == ["tensorboard"]


PLAN_TOML = """
preset = "tiny"
seq_len = 128
batch_size = 16
grad_accum = 2
time_budget = 60
[model_overrides]
depth = 3
max_seq_len = 256
"""


def test_plan_prices_the_run_the_file_describes(tmp_path, capsys):
    config = _write(tmp_path / "run.toml", PLAN_TOML)
    assert cli.main(["plan", "--config", config, "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    # 16 sequences per step in 2 micro-steps over 2 GPUs: 4 per GPU per micro-step.
    model = Config.from_preset("tiny", depth=3, max_seq_len=256)
    assert out.strip() == format_plan(plan(model, gpus=2, seq_len=128, batch=4))
    assert "2 GPUs x batch 4 x seq 128" in out and "depth 3" in out


def test_plan_sizes_the_vocabulary_as_training_will(tmp_path, capsys):
    """A BPE of at most 1000 tokens: the embedding padded to 1024 rows, as model_config does."""
    config = _write(tmp_path / "run.toml", 'tokenizer = "bpe"\nbpe_vocab_size = 1000\n' + PLAN_TOML)
    assert cli.main(["plan", "--config", config]) == 0
    assert "vocab 1024" in capsys.readouterr().out


def test_plan_options_override_the_file(tmp_path, capsys):
    config = _write(tmp_path / "run.toml", "bf16 = false\n" + PLAN_TOML)
    assert cli.main(["plan", "--config", config, "--seq-len", "64", "--batch", "3", "--override", "depth=5",
                     "--override", "dim=128"]) == 0
    out = capsys.readouterr().out
    assert "dim 128, depth 5" in out and "1 GPU x batch 3 x seq 64" in out and "one process, fp32" in out


def test_plan_names_a_batch_that_does_not_split_over_the_gpus(tmp_path, capsys):
    config = _write(tmp_path / "run.toml", PLAN_TOML)
    assert cli.main(["plan", "--config", config, "--gpus", "3"]) == 1
    assert ("batch_size 16 / grad_accum 2 = 8 sequences per micro-step do not split over 3 GPUs"
            in capsys.readouterr().err)
