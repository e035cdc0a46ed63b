"""The command line, end to end and in process: train -> eval --json -> generate, and its errors."""

import json

import pytest
import torch

from andromeda import Transformer, cli
from andromeda.checkpoint import load_checkpoint_tokenizer, load_transformer
from andromeda.data import TokenStore
from andromeda.evaluation import evaluate
from helpers import assert_loss_plot, train_cli_args


def _train_args(tmp_path, corpus, *extra):
    return train_cli_args(tmp_path / "run", corpus, tmp_path / "cache", *extra)


def test_train_eval_generate_end_to_end(tmp_path, corpus, capsys):
    assert cli.main(_train_args(tmp_path, corpus)) == 0
    out = capsys.readouterr().out
    assert "trained 30 steps" in out and "held-out loss" in out
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_000030" / "model.safetensors").is_file()
    assert_loss_plot(run / "loss.png")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(metrics[1]) and metrics[1]["type"] == "train"

    args = ["eval", "--checkpoint", str(run), "--data", str(corpus), "--seq-len", "32", "64", "--batch-size", "4",
            "--json", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"32", "64"}
    assert report["seq_len"] == 32 and report["loss"] == report["results"]["32"]["loss"]
    model, tokenizer = load_transformer(run), load_checkpoint_tokenizer(run)
    store = TokenStore([corpus], tokenizer, cache_dir=tmp_path / "cache")
    direct = evaluate(model, store.tokens, 64, 4, store.num_bytes)
    assert report["results"]["64"]["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-9)
    assert report["bits_per_byte"] < 4.0  # learned: uniform over 258 ids is 8 bits per byte

    assert cli.main(["eval", "--checkpoint", str(run), "--data", str(corpus), "--device", "cpu",
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    table = capsys.readouterr().out
    assert "bits/byte" in table and "\n      32 " in table  # defaults to the training seq_len

    generate = ["generate", "--checkpoint", str(run), "--prompt", "To be", "--max-new-tokens", "20",
                "--temperature", "0.8", "--top-k", "10", "--seed", "3", "--device", "cpu"]
    assert cli.main(generate) == 0
    first = capsys.readouterr().out
    assert cli.main(generate) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert first.startswith("To be") and len(first) > len("To be\n")


def test_resume_takes_the_runs_settings(tmp_path, corpus, capsys):
    assert cli.main(_train_args(tmp_path, corpus, "--max-steps", "4", "--eval-batches", "0")) == 0
    capsys.readouterr()
    run = str(tmp_path / "run")
    assert cli.main(["train", "--out", run, "--resume", "--no-progress"]) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert cli.main(["train", "--out", run, "--resume", "--seq-len", "16"]) == 1
    assert "seq_len: 32 in the run, 16 now" in capsys.readouterr().err


def test_bpe_run_needs_only_the_checkpoint_afterwards(tmp_path, corpus, capsys):
    args = _train_args(tmp_path, corpus, "--tokenizer", "bpe", "--bpe-vocab-size", "300", "--max-steps", "2",
                       "--eval-batches", "0")
    assert cli.main(args) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "tokenizer.json").is_file()
    assert load_transformer(tmp_path / "run").config.num_tokens == 320
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus), "--json",
                     "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_byte"] > 0


def test_non_finite_loss_exits_non_zero_with_the_message(tmp_path, corpus, capsys, monkeypatch):
    real_forward = Transformer.forward
    monkeypatch.setattr(Transformer, "forward",
                        lambda self, *args, **kw: real_forward(self, *args, **kw) * torch.tensor(float("inf")))
    assert cli.main(_train_args(tmp_path, corpus, "--max-steps", "3")) == 1
    err = capsys.readouterr().err
    assert "andromeda train: error: non-finite training loss (inf) at step 1" in err
    assert "no checkpoint was saved yet" in err


@pytest.mark.parametrize("args, code, message", [
    (["train", "--out", "X", "--preset", "huge", "--max-steps", "1"], 1, "unknown preset 'huge'"),
    (["train", "--out", "X", "--max-steps", "1", "--batch-size", "6", "--grad-accum", "4"], 1,
     "batch size 6 is not divisible by grad accumulation 4"),
    (["train", "--out", "X"], 1, "give max_steps (--max-steps) or time_budget"),
    (["train", "--out", "X", "--resume"], 1, "nothing to resume: X has no checkpoint"),
    (["train", "--out", "X", "--max-steps", "1", "--override", "depth"], 1, "--override expects KEY=VALUE"),
    (["train", "--max-steps", "1"], 2, "the following arguments are required: --out"),
    (["eval", "--checkpoint", "nowhere"], 1, "checkpoint nowhere does not exist"),
    (["generate", "--checkpoint", "nowhere", "--prompt", "x"], 1, "checkpoint nowhere does not exist"),
])
def test_bad_input_gives_a_clear_error(tmp_path, monkeypatch, capsys, args, code, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == code
    assert message in capsys.readouterr().err


def test_eval_rejects_seq_len_beyond_the_model(tmp_path, corpus, capsys):
    """Past learned absolute positions; relative ones extrapolate (test_long_context.py)."""
    assert cli.main(_train_args(tmp_path, corpus, "--max-steps", "1", "--eval-batches", "0", "--override",
                                "max_seq_len=64", "use_abs_pos_emb=true")) == 0
    capsys.readouterr()
    args = ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus), "--seq-len", "128",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert cli.main(args) == 1
    assert "--seq-len 128 is outside 1..64 (the model's max_seq_len)" in capsys.readouterr().err


def test_plan_prints_the_capacity_plan(capsys):
    assert cli.main(["plan", "--preset", "1b", "--gpus", "2", "--seq-len", "2048", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 GPUs x batch 1 x seq 2048" in out and "recommendation:" in out


def test_plan_takes_the_card_and_prices_one_gpu_as_one_process(capsys):
    assert cli.main(["plan", "--preset", "1b", "--gpus", "1", "--seq-len", "2048", "--gpu-memory", "40",
                     "--peak-tflops", "312"]) == 0
    out = capsys.readouterr().out
    assert "one process, bf16 autocast over fp32 weights, gradients and AdamW" in out
    assert "usable of 40.0 GiB card" in out and "of 312 TFLOP/s" in out
    assert "bf16 weight copies (autocast)" in out


def test_tokenize_builds_the_cache_that_train_then_reads(tmp_path, corpus, capsys, caplog):
    cache = tmp_path / "cache"
    assert cli.main(["tokenize", "--data", str(corpus), "--cache-dir", str(cache), "--num-proc", "1",
                     "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "1 files" in summary and f"{len(corpus.read_bytes()):,} bytes" in summary
    caplog.clear()
    with caplog.at_level("INFO"):
        assert cli.main(train_cli_args(tmp_path / "run", corpus, cache, "--max-steps", "1", "--eval-batches", "0")) == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("tokenising")], \
        "train tokenised again instead of reading the cache"
