"""Training: the config, the optimizer's groups, the schedule, learning, bit-for-bit resume after
Ctrl-C, and stopping on a non-finite loss. (Resume after kill -9 inside a save: test_checkpoint.py.)"""

import copy
import importlib
import json
import math
import os
import signal

import pytest
import torch

from andromeda import Andromeda, Transformer
from andromeda.checkpoint import (
    OPTIMIZER_DIR,
    latest_checkpoint,
    load_checkpoint_tokenizer,
    load_train_config,
    load_transformer,
    step_checkpoints,
)
from andromeda.parallel.dcp import load_optimizer
from andromeda.train import NonFiniteLossError, TrainConfig, train
from andromeda.train import loop as train_loop
from andromeda.train.optim import build_optimizer, decay_progress, lr_at, param_groups
from andromeda.train.step import train_step
from helpers import assert_loss_plot
from helpers import tiny_train_config as _config


def _weights(run_dir):
    return load_transformer(run_dir).state_dict()


def _optimizer_state(run_dir):
    """The AdamW state of a run's latest checkpoint, loaded as a resumed run loads it."""
    checkpoint = latest_checkpoint(run_dir)
    net = load_transformer(checkpoint)
    optimizer = build_optimizer(net, TrainConfig.from_dict(load_train_config(checkpoint)))
    load_optimizer(checkpoint / OPTIMIZER_DIR, net, optimizer)
    return optimizer.state_dict()["state"]


def _train_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"], e["lr"]) for e in map(json.loads, lines) if e["type"] == "train"]


# --------------------------------------------------------------------------- config


def test_train_config_round_trips_through_json(tmp_path, corpus):
    config = _config(tmp_path, corpus, time_budget=30.5, bf16=True, model_overrides={"depth": 3})
    again = TrainConfig.from_json(config.to_json())
    assert again == config
    assert again.data == (str(corpus),)  # lists from JSON become tuples again


@pytest.mark.parametrize("changes, error, message", [
    (dict(batch_size=6, grad_accum=4), ValueError, "batch size 6 is not divisible by grad accumulation 4"),
    (dict(preset="huge"), ValueError, "unknown preset 'huge'"),
    (dict(max_steps=None), ValueError, "give max_steps .* or time_budget"),
    (dict(min_lr=1.0), ValueError, r"min_lr \(1.0\) must not exceed lr"),
    (dict(seq_len=0), ValueError, "seq_len must be >= 1"),
    (dict(batch_size=4.0), TypeError, r"TrainConfig.batch_size must be of type int, got 4.0 \(float\)"),
    (dict(bf16=1), TypeError, "TrainConfig.bf16 must be of type bool"),
    (dict(data="corpus.txt"), TypeError, "TrainConfig.data must be of type a list of str or None"),
    (dict(weight_decay=math.nan), ValueError, "TrainConfig.weight_decay must be a finite number, got nan"),
    (dict(grad_clip=math.nan), ValueError, "TrainConfig.grad_clip must be a finite number, got nan"),
    (dict(qk_scale_lr_mult=math.nan), ValueError, "TrainConfig.qk_scale_lr_mult must be a finite number"),
    (dict(min_lr=math.nan), ValueError, "TrainConfig.min_lr must be a finite number"),
    (dict(lr=math.inf), ValueError, "TrainConfig.lr must be a finite number, got inf"),
    (dict(time_budget=-math.inf), ValueError, "TrainConfig.time_budget must be a finite number"),
    (dict(model_overrides={"width": 3}), ValueError, r"unknown model config fields \['width'\]"),
])
def test_train_config_rejects_bad_values(tmp_path, corpus, changes, error, message):
    with pytest.raises(error, match=message):
        _config(tmp_path, corpus, **changes)


def test_unknown_train_config_fields_are_rejected():
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['epochs'\]"):
        TrainConfig.from_dict({"out": "x", "max_steps": 1, "epochs": 3})


# --------------------------------------------------------------------------- optimizer, schedule


def test_weight_decay_only_on_linear_weights_and_qk_scales_get_their_multiplier():
    net = Andromeda.from_config("tiny").Andromeda
    names = {id(p): n for n, p in net.named_parameters()}
    decay, scales, other = param_groups(net, 0.1, qk_scale_lr_mult=10.0)
    assert (decay["weight_decay"], scales["weight_decay"], other["weight_decay"]) == (0.1, 0.0, 0.0)
    assert (decay["lr_mult"], scales["lr_mult"], other["lr_mult"]) == (1.0, 10.0, 1.0)
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n in names.values() if n.endswith(
        ("to_qkv.weight", "to_out.weight", "proj_in.weight", "proj_out.weight", "to_logits.weight"))}
    assert {names[id(p)] for p in scales["params"]} == {
        f"blocks.{i}.attn.{s}" for i in range(2) for s in ("q_scale", "k_scale")}
    kept = {names[id(p)] for p in other["params"]}
    assert kept == set(names.values()) - decayed - {names[id(p)] for p in scales["params"]}
    assert {"token_emb.weight", "final_norm.weight", "blocks.0.attn_norm.weight", "blocks.0.ff.proj_in.bias"} <= kept


def test_the_optimizer_applies_the_scheduled_rate_times_each_groups_multiplier(tmp_path, corpus):
    config = _config(tmp_path, corpus, qk_scale_lr_mult=5.0)
    net = Andromeda.from_config("tiny", max_seq_len=64).Andromeda
    params = list(net.parameters())
    optimizer = build_optimizer(net, config)
    assert optimizer.defaults["fused"], "CPU training uses the fused AdamW kernel (4x the default's speed)"
    reference = copy.deepcopy(net)  # the same update by the default (foreach) implementation
    groups = [g for g in param_groups(reference, config.weight_decay, config.qk_scale_lr_mult) if g["params"]]
    reference_optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), foreach=True)
    batch = torch.randint(0, 258, (4, 33))
    train_step(net, params, (batch[:, :-1], batch[:, 1:]), optimizer, 2e-3, config, step=0)
    train_step(reference, list(reference.parameters()), (batch[:, :-1], batch[:, 1:]), reference_optimizer,
               2e-3, config, step=0)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-3, 1e-2, 2e-3]
    for (name, ours), theirs in zip(net.named_parameters(), reference.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6), name


def test_lr_schedule_warmup_then_cosine_to_min_lr(tmp_path, corpus):
    config = _config(tmp_path, corpus, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=111)
    lrs = [lr_at(s, config, decay_progress(s, config, 0.0, None)) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[4] == pytest.approx(5e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)  # decay starts at the peak
    assert lrs[60] == pytest.approx(5.5e-4)  # halfway: the mean of lr and min_lr
    assert lrs[110] == pytest.approx(1e-4)  # the last update runs at min_lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_time_budget_schedule_decays_over_the_budget(tmp_path, corpus):
    config = _config(tmp_path, corpus, max_steps=None, time_budget=100.0, warmup_steps=5)
    assert decay_progress(50, config, elapsed_s=30.0, warmup_end_s=None) == 0.0
    assert decay_progress(50, config, elapsed_s=10.0, warmup_end_s=10.0) == 0.0
    assert decay_progress(50, config, elapsed_s=55.0, warmup_end_s=10.0) == pytest.approx(0.5)
    assert decay_progress(50, config, elapsed_s=120.0, warmup_end_s=10.0) == 1.0
    assert lr_at(50, config, 1.0) == pytest.approx(config.min_lr)


# --------------------------------------------------------------------------- runs


def test_a_tiny_model_learns_a_repetitive_text(tmp_path, corpus):
    result = train(_config(tmp_path, corpus, max_steps=40, batch_size=8, eval_every=40, save_every=40,
                           log_every=10, eval_batches=2))
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    initial = next(e for e in entries if e["type"] == "eval" and e["step"] == 0)
    assert initial["loss"] > 0.9 * math.log(258)  # an untrained model is near uniform
    assert result.eval["loss"] < 0.4 * initial["loss"]
    assert result.train_loss < 0.4 * math.log(258)
    assert result.eval["bits_per_byte"] == pytest.approx(result.eval["loss"] / math.log(2), rel=1e-3)
    assert_loss_plot(tmp_path / "run" / "loss.png")
    assert result.step == 40 and result.stopped_by == "max_steps"


def test_resume_after_ctrl_c_ends_bit_for_bit_where_the_straight_run_ends(tmp_path, corpus, monkeypatch):
    straight = train(_config(tmp_path, corpus, out=str(tmp_path / "straight")))

    real_step = train_loop.train_step
    calls = []

    def interrupt_after_third(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; handled between steps
        return out

    monkeypatch.setattr(train_loop, "train_step", interrupt_after_third)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 3"):
        train(_config(tmp_path, corpus, out=str(tmp_path / "split")))
    monkeypatch.setattr(train_loop, "train_step", real_step)
    assert latest_checkpoint(tmp_path / "split").name == "step_000003"
    resumed = train(_config(tmp_path, corpus, out=str(tmp_path / "split"), resume=True))

    assert resumed.step == straight.step == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _train_losses(tmp_path / "split") == _train_losses(tmp_path / "straight")
    opt_a, opt_b = _optimizer_state(tmp_path / "straight"), _optimizer_state(tmp_path / "split")
    assert opt_a.keys() == opt_b.keys() and len(opt_a) == len(list(_weights(tmp_path / "straight")))
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    assert resumed.eval == straight.eval


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    real_forward = Transformer.forward
    calls = []

    def nan_at_fifth_step(self, tokens, *args, **kwargs):
        out = real_forward(self, tokens, *args, **kwargs)
        if self.training:
            calls.append(1)
            return out * float("nan") if len(calls) == 5 else out
        return out

    monkeypatch.setattr(Transformer, "forward", nan_at_fifth_step)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 5: training "
                                                 r"stopped; the last good checkpoint is .*step_000004"):
        train(_config(tmp_path, corpus))
    run = tmp_path / "run"
    assert [p.name for p in step_checkpoints(run)] == ["step_000002", "step_000004"]
    assert latest_checkpoint(run).name == "step_000004"
    assert all(torch.isfinite(t).all() for t in _weights(run).values())


def test_grad_accumulation_matches_one_big_batch(tmp_path, corpus):
    one = train(_config(tmp_path, corpus, out=str(tmp_path / "one"), max_steps=2, batch_size=8, eval_batches=0))
    two = train(_config(tmp_path, corpus, out=str(tmp_path / "two"), max_steps=2, batch_size=8, grad_accum=2,
                        eval_batches=0))
    assert one.eval is None and two.eval is None
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert _train_losses(tmp_path / "one")[0][1] == pytest.approx(_train_losses(tmp_path / "two")[0][1], rel=1e-6)


def test_bad_runs_fail_with_clear_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(_config(tmp_path, corpus, resume=True))
    with pytest.raises(ValueError, match="seq_len 128 exceeds the model's max_seq_len 64"):
        train(_config(tmp_path, corpus, seq_len=128))
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        train(_config(tmp_path, corpus, data=(str(tmp_path / "missing.txt"),)))
    train(_config(tmp_path, corpus, max_steps=2, eval_batches=0))
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(_config(tmp_path, corpus, max_steps=2))
    with pytest.raises(ValueError, match=r"different settings \(seq_len: 32 in the run, 16 now\)"):
        train(_config(tmp_path, corpus, max_steps=2, seq_len=16, resume=True))
    with pytest.raises(ValueError, match="model_overrides"):
        train(_config(tmp_path, corpus, max_steps=2, resume=True, model_overrides={"max_seq_len": 64, "depth": 1}))


def test_bpe_tokenizer_sets_num_tokens_and_is_saved(tmp_path, corpus):
    train(_config(tmp_path, corpus, tokenizer="bpe", bpe_vocab_size=300, max_steps=1, eval_batches=0))
    model = load_transformer(tmp_path / "run")
    tokenizer = load_checkpoint_tokenizer(tmp_path / "run")
    assert tokenizer.name == "bpe" and tokenizer.vocab_size <= 300
    assert model.config.num_tokens == 320  # the vocabulary rounded up to a multiple of 64


def test_only_this_processs_cuda_rng_is_saved_and_restored(monkeypatch, tmp_path):
    """A run saved with 8 GPUs visible resumes with 1: each process saves and restores its own
    device's RNG, never every visible GPU's (CUDA mocked: the calls and their devices are checked)."""
    from andromeda.train.state import read_trainer_state, rng_state, set_rng_state, write_trainer_state, Progress

    calls = []
    states = {3: torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or states[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state.tolist())))
    for every in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, every, lambda *a, **k: pytest.fail(f"{every} touches every visible GPU"))
    state = rng_state(torch.device("cuda", 3))
    write_trainer_state(tmp_path / "trainer_state.safetensors", Progress(step=5), state)
    (tmp_path / "config.json").write_text("{}")  # a checkpoint folder as far as resolving goes
    restored = read_trainer_state(tmp_path)
    set_rng_state(restored.rng, torch.device("cuda", 0))
    assert calls == [("get", torch.device("cuda", 3)), ("set", torch.device("cuda", 0), list(range(16)))]
    assert restored.progress.step == 5


@pytest.mark.parametrize("bf16, rel", [(False, 1e-5), (True, 2e-4)])
def test_compiled_training_computes_the_eager_losses(tmp_path, corpus, monkeypatch, bf16, rel):
    """--compile compiles from outside the model, each block, in fp32 and under bf16
    (`TRAIN_COMPILE_SCOPE`); the run computes the losses eager training does. The bf16 run's heads
    of 32 take the CPU kernels, attention and its prologue, inside the compiled blocks."""
    scopes = []
    # The module, not the function andromeda.parallel exports under the same name.
    parallelize_module = importlib.import_module("andromeda.parallel.parallelize")
    real_apply_compile = parallelize_module.apply_compile
    monkeypatch.setattr(parallelize_module, "apply_compile",
                        lambda net, scope: scopes.append(scope) or real_apply_compile(net, scope))
    model = {"max_seq_len": 64, "dim_head": 32} if bf16 else {"max_seq_len": 64}
    eager = train(_config(tmp_path, corpus, out=str(tmp_path / "eager"), max_steps=2, eval_batches=0, bf16=bf16,
                          model_overrides=model))
    compiled = train(_config(tmp_path, corpus, out=str(tmp_path / "compiled"), max_steps=2, eval_batches=0,
                             bf16=bf16, compile=True, model_overrides=model))
    assert scopes == ["blocks"]
    assert [l for _, l, _ in _train_losses(tmp_path / "compiled")] == pytest.approx(
        [l for _, l, _ in _train_losses(tmp_path / "eager")], rel=rel)
    assert compiled.step == eager.step == 2
