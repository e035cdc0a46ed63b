"""Held-out evaluation: mean loss, perplexity and bits per byte over a token array.

Bits per byte (total nats / ln 2 / bytes of text) is the tokenizer-independent number: a byte
model and a BPE model of the same text are compared on it directly (as in Gao et al. 2020,
"The Pile", section 5). Every token except the first is predicted exactly once, in windows of
`seq_len` that each start without context (`andromeda.data.eval_windows`), so a longer `seq_len`
gives each prediction more context on average; evaluating beyond the training length shows how
well the positions extrapolate (ALiBi: Press et al. 2022). Models with relative positions only
(ALiBi, xPos) are evaluated at any length, past max_seq_len too; learned absolute positions end
at max_seq_len. `plot_bits_per_byte` draws bits per byte against the evaluation length.

`kv_cache_dtype` scores the text through a KV cache stored that way ("int8": what decoding with
an int8 cache costs in quality): each window is fed into a fresh cache in as few passes as it
takes, and every query reads the keys and values as the cache stores them, its own included,
exactly as token-by-token decoding would (the int8 scales are per token, so the chunking does not
change what is stored).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import EvalWindow, eval_windows
from .model import KVCache, Transformer
from .model.cache import resolve_kv_dtype
from .parallel.environment import DistEnv, all_reduce_sum


def _selected_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None) -> Iterator[EvalWindow]:
    """All windows, or `max_windows` of them spread evenly over the array (a quick estimate
    that samples every document instead of only the first)."""
    total = -(-(len(tokens) - 1) // seq_len)  # ceil, as in eval_windows
    if max_windows is None or max_windows >= total:
        yield from eval_windows(tokens, seq_len)
        return
    keep = {int(i) for i in np.linspace(0, total - 1, max_windows).round()}
    for index, window in enumerate(eval_windows(tokens, seq_len)):
        if index in keep:
            yield window


def _batches(windows: Iterator[EvalWindow], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack windows into (B, T + 1) batches; a window of another length (the last, shorter one)
    starts a batch of its own."""
    pending: list[torch.Tensor] = []
    for window in windows:
        if pending and (len(pending) == batch_size or len(window.tokens) != len(pending[0])):
            yield torch.stack(pending)
            pending = []
        pending.append(window.tokens)
    if pending:
        yield torch.stack(pending)


def check_eval_length(seq_len: int, config) -> None:
    """Raise a ValueError naming the problem unless windows of `seq_len` tokens fit the model:
    any positive length, or up to max_seq_len with learned absolute positions."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, Integral) or seq_len < 1:
        raise ValueError(f"evaluation seq_len must be a positive integer, got {seq_len!r}")
    if config.use_abs_pos_emb and seq_len > config.max_seq_len:
        raise ValueError(
            f"evaluation seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}, where its "
            f"learned absolute positions end (use_abs_pos_emb); use --seq-len <= {config.max_seq_len}"
        )


@torch.no_grad()
def evaluate(
    net: Transformer,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    num_bytes: int,
    *,
    max_windows: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    env: DistEnv | None = None,
    progress: bool | None = False,
    kv_cache_dtype: str | None = None,
) -> dict[str, float | int]:
    """Loss (nats/token), perplexity and bits per byte of `net` on the 1-D array `tokens`.

    `num_bytes` is the UTF-8 size of the text `tokens` encode (`TokenStore.num_bytes`). With
    `max_windows`, only that many windows (evenly spread) are scored and the byte count is
    scaled by the fraction of tokens scored: an estimate for periodic evaluation during training.
    Returns {"loss", "perplexity", "bits_per_byte", "tokens" (predictions scored), "bytes"}.

    With `env` over several processes (every one of them calls it), each scores every W-th
    window, `batch_size` of them per forward, and the sums are added up: the result is one
    process's. Every process runs the same number of forwards (a sharded model needs all of
    them in each); one with fewer windows repeats its last batch, uncounted.

    kv_cache_dtype: None scores each window in one pass without a cache; "auto" or "int8" feeds it
    through a `KVCache` of that `kv_dtype` (see the module docstring).
    """
    check_eval_length(seq_len, net.config)
    scorer = _CachedScorer(net, kv_cache_dtype, autocast_dtype) if kv_cache_dtype is not None else None
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 (or None to score every window), got {max_windows}")
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive (the size of the evaluated text), got {num_bytes}")
    device = next(net.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None else contextlib.nullcontext()
    )
    was_training = net.training
    net.eval()
    env = env or DistEnv()
    windows = list(_selected_windows(tokens, seq_len, max_windows))
    batches = list(_batches(iter(windows[env.rank :: env.world_size]), batch_size))
    rounds = max(len(list(_batches(iter(windows[r :: env.world_size]), batch_size))) for r in range(env.world_size))
    filler = batches[-1] if batches else torch.stack([windows[0].tokens])  # repeated, never counted
    totals = torch.zeros(2, dtype=torch.float64)  # nats, predictions
    # tqdm's disable=None: shown only when stderr is a terminal; only rank 0 draws it.
    disable = True if env.rank else (None if progress is None else not progress)
    bar = tqdm(range(rounds), desc=f"eval seq_len {seq_len}", unit="batch", leave=False, dynamic_ncols=True,
               disable=disable)
    try:
        for index in bar:
            batch = (batches[index] if index < len(batches) else filler).to(device)  # (B, T + 1)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with autocast:
                nats = scorer(inputs, targets) if scorer else net(inputs, targets=targets, reduction="sum")
            if index < len(batches):
                totals += torch.tensor([float(nats), targets.numel()], dtype=torch.float64)
    finally:
        bar.close()
        net.train(was_training)
    total_nats, count = all_reduce_sum(totals, env).tolist() if env.distributed else totals.tolist()
    count = int(count)
    scored_bytes = num_bytes * count / (len(tokens) - 1)
    loss = total_nats / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nats / math.log(2) / scored_bytes,
        "tokens": count,
        "bytes": round(scored_bytes),
    }


class _CachedScorer:
    """Summed nats of (B, T) windows fed through a KV cache of `kv_dtype`, one cache reused for
    every batch of the same shape."""

    def __init__(self, net: Transformer, kv_dtype: str, autocast_dtype: torch.dtype | None) -> None:
        self.net, self.kv_dtype = net, kv_dtype
        self.dtype = autocast_dtype or net.token_emb.weight.dtype  # that of the keys attention reads
        self.cache: KVCache | None = None
        resolve_kv_dtype(kv_dtype, self.dtype)  # a bad name fails before any work

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = inputs.shape
        if self.cache is None or self.cache.num_slots != B or self.cache.capacity != T:
            self.cache = KVCache(self.net.config, B, T, dtype=self.dtype, device=inputs.device,
                                 kv_dtype=self.kv_dtype)
        self.cache.reset()
        chunk = self.cache.max_new_positions
        return sum(self.net(inputs[:, i : i + chunk], cache=self.cache, targets=targets[:, i : i + chunk],
                            reduction="sum") for i in range(0, T, chunk))


def check_plot_path(path: str | Path) -> Path:
    """The path a plot will be written to, checked before any work: its folder must exist and
    its suffix name a format matplotlib writes."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"plot folder {path.parent} does not exist (for --plot {path}); create it first")
    if path.suffix.lower() not in PLOT_FORMATS:
        raise ValueError(f"plot file {path} must end in one of {', '.join(PLOT_FORMATS)}")
    return path


PLOT_FORMATS = (".png", ".svg", ".pdf")


def plot_bits_per_byte(curves: Sequence[dict], path: str | Path, *, title: str | None = None) -> None:
    """Bits per byte against evaluation length (log scale), one line per curve, each curve's
    training length marked by a dotted vertical line and a ring, written as an image (700 x 450
    pixels for .png). curves: [{"label": str, "results": {seq_len: bits_per_byte},
    "train_seq_len": int | None}]. Uses matplotlib's Agg canvas, so no display or global backend
    is involved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = check_plot_path(path)
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    draw_bits_per_byte(figure.add_subplot(), curves, title=title)
    figure.tight_layout()
    figure.savefig(path)


def draw_bits_per_byte(axes, curves: Sequence[dict], *, title: str | None = None) -> None:
    """`plot_bits_per_byte`'s drawing, onto matplotlib `axes` (for figures of several panels)."""
    lengths = sorted({int(n) for curve in curves for n in curve["results"]})
    shared = {curve.get("train_seq_len") for curve in curves}
    one_line = len(shared) == 1 and None not in shared
    if one_line:
        axes.axvline(next(iter(shared)), color="grey", linestyle=":")
    for curve in curves:
        points = sorted((int(n), float(b)) for n, b in curve["results"].items())
        (line,) = axes.plot(*zip(*points), "o-", markersize=3, label=curve["label"])
        trained = curve.get("train_seq_len")
        if trained:
            if not one_line:
                axes.axvline(trained, color=line.get_color(), linestyle=":", alpha=0.7)
            at = dict(points).get(int(trained))
            if at is not None:
                axes.plot([trained], [at], "o", markersize=9, markerfacecolor="none", color=line.get_color())
    axes.set_xscale("log", base=2)
    if lengths:
        axes.set_xticks(lengths, [str(n) for n in lengths], fontsize=8)
        axes.minorticks_off()
    axes.set_xlabel("evaluation length (tokens); dotted: training length")
    axes.set_ylabel("bits per byte")
    if title:
        axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)
