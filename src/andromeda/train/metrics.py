"""`metrics.jsonl` (one JSON object per logged step or evaluation) and the loss plot."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, {"type": "train" | "eval", "step": ..., ...}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entry: Mapping[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(dict(entry)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        return entries

    def truncate_after(self, step: int) -> None:
        """Drop entries past `step` (logged after the checkpoint a resumed run starts from)."""
        kept = [e for e in self.read() if e.get("step", 0) <= step]
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text("".join(json.dumps(e) + "\n" for e in kept))
        staging.replace(self.path)  # a crash now leaves either the old or the new file


def plot_losses(entries: list[dict[str, Any]], path: Path) -> None:
    """Training and held-out loss against step, written as a PNG (matplotlib's Agg canvas, so no
    display or global backend is involved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for kind, label, style in (("train", "train", "-"), ("eval", "held-out", "o-")):
        points = [(e["step"], e["loss"]) for e in entries if e.get("type") == kind]
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
