"""`metrics.jsonl` (one JSON object per logged step or evaluation) and the loss plot."""

from __future__ import annotations

import json
import os
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


# --------------------------------------------------------------------------- experiment trackers


class Trackers:
    """The experiment trackers of a run (`--report-to`), fed what metrics.jsonl gets; rank 0 only.

    tensorboard: event files in RUN/tensorboard (torch.utils.tensorboard; the `track` extra).
    wandb: a Weights & Biases run in RUN/wandb, offline unless WANDB_MODE says otherwise (sync it
    later with `wandb sync RUN/wandb/offline-run-*`); resumed runs continue the same wandb run.
    """

    def __init__(self, names: tuple[str, ...], run_dir: Path, config: Mapping[str, Any], run_id: str) -> None:
        self.writer = None
        self.wandb = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--report-to tensorboard needs TensorBoard: pip install -e '.[track]' in the "
                                  "andromeda checkout (PyPI's andromeda is an unrelated project)") from err
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.writer.add_text("config", "```\n" + json.dumps(dict(config), indent=2) + "\n```")
        if "wandb" in names:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--report-to wandb needs Weights & Biases: pip install -e '.[track]' in the "
                                  "andromeda checkout (PyPI's andromeda is an unrelated project)") from err
            mode = os.environ.get("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "andromeda"), dir=str(run_dir),
                                    config=dict(config), id=run_id, resume="allow", mode=mode,
                                    name=run_dir.name, settings=wandb.Settings(silent=True))

    def log(self, entry: Mapping[str, Any]) -> None:
        """One metrics.jsonl entry: {"type": "train" | "eval", "step": ..., numbers...}."""
        kind, step = entry["type"], entry["step"]
        numbers = {f"{kind}/{k}": v for k, v in entry.items()
                   if k not in ("type", "step") and isinstance(v, (int, float))}
        if self.writer is not None:
            for name, value in numbers.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def finish(self, plot: Path | None) -> None:
        if self.writer is not None:
            if plot is not None and plot.is_file():
                from matplotlib.image import imread

                self.writer.add_image("loss", imread(plot)[..., :3], dataformats="HWC")
            self.writer.close()
        if self.wandb is not None:
            if plot is not None and plot.is_file():
                import wandb

                self.wandb.log({"loss_plot": wandb.Image(str(plot))})
            self.wandb.finish()

    def close(self) -> None:
        """Flush and close without the final plot (an interrupted or failed run)."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)
