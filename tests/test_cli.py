"""The command line, end to end and in process: train -> eval --json -> generate, and its errors."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from andromeda import Andromeda, Transformer, cli
from andromeda.checkpoint import UnsafeFileError, load_checkpoint_tokenizer, load_transformer, save_pretrained
from andromeda.data import TokenStore
from andromeda.evaluation import evaluate
from andromeda.tokenizers import ByteTokenizer
from helpers import andromeda_command, assert_loss_plot, child_env, free_port, train_cli_args


def _train_args(tmp_path, corpus, *extra):
    return train_cli_args(tmp_path / "run", corpus, tmp_path / "cache", *extra)


def test_train_eval_generate_end_to_end(tmp_path, corpus, capsys, kept_heap):
    assert cli.main(_train_args(tmp_path, corpus)) == 0
    assert kept_heap == []  # freed memory is kept only when asked for (--keep-freed-memory)
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
    # The run's own BPE, not bytes (258 ids, also rounded up to a 320-row embedding): it compresses.
    tokenizer, text = load_checkpoint_tokenizer(tmp_path / "run"), corpus.read_text()
    assert 258 < tokenizer.vocab_size <= 300 and len(tokenizer.encode(text)) < 0.8 * len(text.encode())
    assert load_transformer(tmp_path / "run").config.num_tokens >= tokenizer.vocab_size
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


def test_train_keeps_freed_memory_when_asked(tmp_path, corpus, capsys, kept_heap, monkeypatch):
    from andromeda.train import heap

    guards = []

    class Counted(heap.FreedMemory):  # the command's bound on the kept heap, its calls counted
        def __init__(self):
            super().__init__()
            guards.append(self)
            self.calls = 0

        def after_step(self):
            self.calls += 1
            super().after_step()

    monkeypatch.setattr(heap, "FreedMemory", Counted)
    assert cli.main(_train_args(tmp_path, corpus, "--keep-freed-memory")) == 0
    assert "trained 30 steps" in capsys.readouterr().out
    assert kept_heap == [None] and len(guards) == 1 and guards[0].calls == 30
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step_000030" / "train_config.json").read_text())
    assert saved["keep_freed_memory"] is True


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


@pytest.mark.parametrize("flag, value, expected", [
    ("--gpu-memory", "inf", "a positive, finite number of at most 1.67e+299 (GiB, e.g. 80), got 'inf'"),
    ("--gpu-memory", "1e300", "got '1e300'"),
    ("--gpu-memory", "0", "got '0'"),
    ("--peak-tflops", "0", "a positive, finite number of at most 1.8e+296 (TFLOP/s, e.g. 989), got '0'"),
    ("--peak-tflops", "nan", "got 'nan'"),
    ("--peak-tflops", "-1", "got '-1'"),
    ("--gpus", "0", "a positive integer (e.g. 8), got '0'"),
    ("--seq-len", "-5", "a positive integer (e.g. 8), got '-5'"),
    ("--batch", "1.5", "a positive integer (e.g. 8), got '1.5'"),
])
def test_plan_names_a_numeric_flag_out_of_range(capsys, flag, value, expected):
    """Each is a usage error naming the flag: none may crash (inf GiB, 0 TFLOP/s) or print
    "~nan tokens/s"."""
    assert cli.main(["plan", "--preset", "tiny", flag, value]) == 2
    captured = capsys.readouterr()
    assert f"argument {flag}: expected a positive" in captured.err and expected in captured.err
    assert captured.out == ""


def test_plan_takes_model_overrides_and_needs_a_model(capsys):
    assert cli.main(["plan", "--preset", "tiny", "--override", "depth=5", "--override", "dim=128"]) == 0
    assert "dim 128, depth 5" in capsys.readouterr().out
    assert cli.main(["plan", "--preset", "tiny", "--override", "depht=5"]) == 1
    assert "'depht' is not a model Config field" in capsys.readouterr().err
    assert cli.main(["plan"]) == 1
    assert "give --preset NAME or --config FILE" in capsys.readouterr().err


def _train_quickly(tmp_path, corpus, *extra):
    """One step, no periodic evaluation: a checkpoint for `eval` to read."""
    assert cli.main(_train_args(tmp_path, corpus, "--max-steps", "1", "--eval-batches", "0", *extra)) == 0


def _eval_args(tmp_path, *extra):
    return ["eval", "--checkpoint", str(tmp_path / "run"), "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--batch-size", "4", *extra]


def test_eval_defaults_to_the_runs_held_out_data_and_names_it(tmp_path, corpus, capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a held-out text the run never trained on. " * 20)
    _train_quickly(tmp_path, corpus, "--eval-data", str(held_out))
    capsys.readouterr()
    assert cli.main(_eval_args(tmp_path, "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] == [str(held_out)] and report["corpus_bytes"] == len(held_out.read_bytes())
    assert report["data"] == f"the run's held-out data (--eval-data {held_out})"
    assert cli.main(_eval_args(tmp_path)) == 0
    table = capsys.readouterr().out
    assert f"data       the run's held-out data (--eval-data {held_out}): {held_out};" in table


def test_eval_of_a_run_without_held_out_data_asks_for_data(tmp_path, corpus, capsys):
    """Not Shakespeare, which the run never saw, and not the training text."""
    _train_quickly(tmp_path, corpus)
    capsys.readouterr()
    run = tmp_path / "run"
    saved = json.loads((run / "checkpoints" / "step_000001" / "train_config.json").read_text())
    saved["eval_data"] = None  # a run given --data only
    (run / "checkpoints" / "step_000001" / "train_config.json").write_text(json.dumps(saved))
    assert cli.main(_eval_args(tmp_path, "--no-verify")) == 1
    err = capsys.readouterr().err
    assert f"was trained on {corpus} without held-out data (--eval-data)" in err and "give --data FILES" in err


def test_eval_marks_max_windows_results_as_estimates(tmp_path, corpus, capsys):
    _train_quickly(tmp_path, corpus)
    capsys.readouterr()
    assert cli.main(_eval_args(tmp_path, "--data", str(corpus), "--max-windows", "2", "--json")) == 0
    sampled = json.loads(capsys.readouterr().out)
    scored = sampled["results"]["32"]["tokens"]
    assert sampled["estimate"] is True and sampled["results"]["32"]["estimate"] is True
    assert cli.main(_eval_args(tmp_path, "--data", str(corpus), "--json")) == 0
    whole = json.loads(capsys.readouterr().out)
    predictions = whole["corpus_tokens"] - 1
    assert whole["estimate"] is False and whole["results"]["32"]["tokens"] == predictions > scored
    assert cli.main(_eval_args(tmp_path, "--data", str(corpus), "--max-windows", "2")) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("      32 "))
    assert row.endswith(f"estimate: --max-windows 2 scored {scored:,} of {predictions:,} tokens")


def test_eval_progress_bar_goes_to_stderr_on_request(tmp_path, corpus, capsys):
    _train_quickly(tmp_path, corpus)
    capsys.readouterr()
    assert cli.main(_eval_args(tmp_path, "--data", str(corpus), "--progress", "--json")) == 0
    shown = capsys.readouterr()
    assert "eval seq_len 32" in shown.err and "batch" in shown.err
    json.loads(shown.out)  # stdout stays one JSON object
    assert cli.main(_eval_args(tmp_path, "--data", str(corpus), "--no-progress", "--json")) == 0
    assert "eval seq_len" not in capsys.readouterr().err


def test_eval_bf16_is_a_deprecated_spelling_of_dtype_bf16(tmp_path, corpus, capsys, caplog):
    """The Makefile's `eval --bf16` keeps working, as --dtype bf16, with a warning."""
    _train_quickly(tmp_path, corpus)
    capsys.readouterr()
    assert cli.main(_eval_args(tmp_path, "--data", str(corpus), "--dtype", "bf16", "--json")) == 0
    with_dtype = json.loads(capsys.readouterr().out)
    caplog.clear()
    assert cli.main(_eval_args(tmp_path, "--data", str(corpus), "--bf16", "--json")) == 0
    assert json.loads(capsys.readouterr().out) == with_dtype
    assert "--bf16 is deprecated: use --dtype bf16" in caplog.text
    assert cli.main(_eval_args(tmp_path, "--data", str(corpus), "--bf16", "--dtype", "fp32")) == 1
    assert "--bf16 means --dtype bf16, which contradicts --dtype fp32" in capsys.readouterr().err


def test_eval_help_documents_the_json_of_several_checkpoints(capsys):
    assert cli.main(["eval", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert '{"checkpoints": [one such object per checkpoint, in the order given, each with "train_seq_len"]}' \
        in help_text
    assert '"estimate"' in help_text


def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    """Exit 77 (skipped), one line naming why, no traceback; on a GPU machine too (CUDA hidden)."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 77
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [f"no GPU: nothing to check (PyTorch {torch.__version__} sees no CUDA device)"]


# ----------------------------------------------------------------------------- --quantize int4, 192 wide


@pytest.fixture
def demo_192(tmp_path) -> Path:
    """A one-block demo model: every Linear is 192 (or 64) inputs wide, which 128 does not divide."""
    torch.manual_seed(0)
    folder = tmp_path / "demo"
    save_pretrained(Andromeda.from_config("demo", depth=1).Andromeda, folder, tokenizer=ByteTokenizer())
    return folder


def test_eval_quantize_int4_picks_a_group_size_that_divides_the_model(demo_192, corpus, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="andromeda")
    args = ["eval", "--checkpoint", str(demo_192), "--data", str(corpus), "--seq-len", "32", "--max-windows", "2",
            "--batch-size", "2", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--json",
            "--quantize", "int4"]
    assert cli.main(args) == 0, capsys.readouterr().err
    picked = json.loads(capsys.readouterr().out)
    assert "int4-quantized (group size 64)" in caplog.text  # the largest of 128, 64, 32 dividing 192
    assert cli.main([*args, "--group-size", "64"]) == 0
    assert json.loads(capsys.readouterr().out) == picked
    assert cli.main([*args, "--group-size", "128"]) == 1  # a size given is kept, and refused if it does not fit
    assert "int4 group size 128 does not divide the input width 192" in capsys.readouterr().err


def test_serve_quantize_int4_loads_a_192_wide_model_and_answers(demo_192, tmp_path):
    """A real server process with --quantize int4 and no --group-size: it loads (health 200) and
    completes a request. With a group size of 128 it would refuse the model at start-up."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(andromeda_command("serve", "--checkpoint", str(demo_192), "--port", str(port),
                                                    "--threads", "1", "--device", "cpu", "--quantize", "int4"),
                                  stdout=out, stderr=subprocess.STDOUT, env=child_env(PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert server.poll() is None, f"the server exited with {server.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server was not ready in time:\n{log.read_text()}"
            time.sleep(0.2)
        body = json.dumps({"prompt": "To be", "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["completion_tokens"] >= 1 and isinstance(answer["choices"][0]["text"], str)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    assert "int4-quantized (group size 64)" in log.read_text()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:  # refused, not yet listening, or 503 while the engine loads
        return False


# ----------------------------------------------------------------------------- Hugging Face exports


def test_export_hf_says_how_to_load_the_tokenizer_without_remote_code(tmp_path, capsys):
    """transformers 5 asks about custom code when AutoTokenizer is called without trust_remote_code."""
    save_pretrained(Andromeda.from_config("tiny").Andromeda, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    assert cli.main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert f"AutoTokenizer.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=False)" in out


def test_an_exports_chat_template_is_read_without_a_manifest_warning(tmp_path, caplog):
    """A Hugging Face export has no manifest: its template is read as it is (no "written by an older
    version" warning), and a link out of it is refused as in a checkpoint."""
    from andromeda.interop.hf import export_hf
    from andromeda.serve.chat_template import TEMPLATE_FILE, find_chat_template

    folder = export_hf(Andromeda.from_config("tiny").Andromeda, ByteTokenizer(), tmp_path / "hf")
    (folder / TEMPLATE_FILE).write_text("{{ messages }}")
    caplog.clear()
    assert find_chat_template(folder) == "{{ messages }}"
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    (tmp_path / "secret.txt").write_text("API_KEY=hunter2")
    (folder / TEMPLATE_FILE).unlink()
    (folder / TEMPLATE_FILE).symlink_to(tmp_path / "secret.txt")
    with pytest.raises(UnsafeFileError, match="outside"):
        find_chat_template(folder)
