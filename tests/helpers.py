"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from andromeda import Andromeda
from andromeda.train import TrainConfig

CORPUS_TEXT = "the quick brown fox jumps over the lazy dog. " * 200

# The feature mixes of the parity tests against x-transformers and Hugging Face.
FEATURE_MIXES = {
    "seed": {},
    "reference-attention": dict(attn_flash=False),
    "no-alibi": dict(alibi_pos_bias=False),
    "no-xpos": dict(rotary_xpos=False),
    "no-qk-norm": dict(qk_norm=False, attn_qk_norm=False),
    "qk-norm-fixed-scale": dict(attn_qk_norm_dim_scale=False),
    "only-attn_qk_norm": dict(qk_norm=False),
    "multi-head-kv": dict(attn_kv_heads=4),
    "one-kv-head-3-alibi": dict(heads=6, attn_kv_heads=1, alibi_num_heads=3),
    "5-of-8-alibi": dict(heads=8, attn_kv_heads=2, alibi_num_heads=5),
    "all-alibi": dict(alibi_num_heads=4),
    "abs-pos-only": dict(use_abs_pos_emb=True, rotary_xpos=False, alibi_pos_bias=False),
    "abs-pos-with-rotary": dict(use_abs_pos_emb=True),
    "odd-head-size": dict(dim_head=17),
    "odd-head-size-no-qk-norm": dict(dim_head=17, qk_norm=False, attn_qk_norm=False),
}

# Single features switched on or off against the tiny preset (the seed's feature mix).
FEATURES = {
    "seed": {},
    "alibi_only": dict(rotary_xpos=False),
    "xpos_only": dict(alibi_pos_bias=False),
    "alibi_all_heads": dict(alibi_num_heads=4, rotary_xpos=False),
    "abs_pos_emb_only": dict(use_abs_pos_emb=True, alibi_pos_bias=False, rotary_xpos=False),
    "abs_pos_emb_with_seed": dict(use_abs_pos_emb=True),
    "no_positions": dict(alibi_pos_bias=False, rotary_xpos=False),
    "no_qk_norm": dict(qk_norm=False, attn_qk_norm=False),
    "qk_norm_fixed_scale": dict(attn_qk_norm_dim_scale=False),
    "reference_attention": dict(attn_flash=False),
    "kv_heads_eq_heads": dict(attn_kv_heads=4),
    "multi_query": dict(attn_kv_heads=1),
}


def random_net(seed: int = 0, **overrides):
    """A tiny Transformer with weights scaled up from the 0.02-std init, whose nearly flat logits
    would make greedy comparisons weak: here greedy choices depend on the context."""
    torch.manual_seed(seed)
    net = Andromeda.from_config("tiny", **overrides).Andromeda
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.ndim == 2:
                parameter.mul_(3.0)
    return net


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_train_config(tmp_path: Path, corpus: Path, **changes) -> TrainConfig:
    """A tiny run over `corpus`: 6 steps of 4 x 32 tokens, checkpoints every 2 steps."""
    base = dict(out=str(tmp_path / "run"), preset="tiny", model_overrides={"max_seq_len": 64},
                data=(str(corpus),), eval_data=(str(corpus),), batch_size=4, seq_len=32, max_steps=6,
                warmup_steps=2, lr=3e-3, save_every=2, eval_every=3, eval_batches=1, log_every=1,
                device="cpu", progress=False, cache_dir=str(tmp_path / "cache"), keep=10)
    return TrainConfig(**{**base, **changes})


def train_cli_args(out: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    """`andromeda train` arguments for a tiny run over `corpus` (30 steps of 8 x 32 tokens)."""
    return ["train", "--preset", "tiny", "--override", "max_seq_len=64", "--data", str(corpus),
            "--eval-data", str(corpus), "--out", str(out), "--max-steps", "30", "--batch-size", "8",
            "--seq-len", "32", "--warmup-steps", "3", "--lr", "3e-3", "--eval-every", "15", "--eval-batches", "1",
            "--save-every", "15", "--device", "cpu", "--no-progress", "--cache-dir", str(cache), *extra]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for an `andromeda` subprocess: one OpenMP thread, plus `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def default_sigint() -> None:
    """`preexec_fn` for a child that a test interrupts with SIGINT: Ctrl-C's default action,
    even when the suite itself runs with SIGINT ignored (a background job of a shell without job
    control), which the child would inherit and, as Unix programs should, keep ignoring."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def andromeda_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "andromeda", *args]


def run_andromeda(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m andromeda ARGS` to completion (bounded by `timeout`)."""
    return subprocess.run(andromeda_command(*args), env=child_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def assert_loss_plot(path: Path) -> None:
    """`path` is the trainer's loss plot: a 700 x 450 PNG with curves drawn on it, not a blank."""
    from matplotlib.image import imread

    image = imread(path)  # (H, W, RGBA) floats in [0, 1]
    assert image.shape[:2] == (450, 700)
    colours = {tuple(pixel) for pixel in image[::5, ::5, :3].reshape(-1, 3).round(2).tolist()}
    assert len(colours) > 20, "the plot has almost no colours: nothing was drawn"


def autocast_step(model, tokens):
    """One bf16 CPU autocast loss and backward of `model` on `tokens` (B, T + 1): the loss and every
    parameter's gradient."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same_step(got, expected):
    """Two `autocast_step` results agree to bf16 rounding: the loss to 1e-3, the gradients as a whole
    to 1% of their norm."""
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-3)
    total = sum(g.norm() ** 2 for g in expected[1]) ** 0.5
    difference = sum((a - b).norm() ** 2 for a, b in zip(got[1], expected[1])) ** 0.5
    assert difference / total < 1e-2


class Counted:
    """`function`, counting its calls: a path that silently skipped a kernel would agree trivially."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)
