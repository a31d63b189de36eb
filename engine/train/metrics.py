"""The run's metrics: a JSONL log and a plot of loss and validation accuracy per epoch.

Every line of ``metrics.jsonl`` is one JSON object with a ``kind``: ``step`` (every few
optimizer steps: loss, lr, samples/s), ``epoch`` (train loss, validation loss and
accuracy, generated tokens, thoughts, timings), ``stop_classifier`` and ``summary``.
``plot_metrics`` draws ``metrics.png`` from the epoch lines (matplotlib, Agg backend).
This module knows nothing of models.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, **fields}) + "\n")

    def read(self, kind: str | None = None) -> list[dict]:
        return read_metrics(self.path, kind)


def read_metrics(path: Path, kind: str | None = None) -> list[dict]:
    if not Path(path).is_file():
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def truncate_after(path: Path, epoch: int) -> None:
    """On resume, drop log lines of epochs after ``epoch`` (they will be rerun)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
    path.write_text("".join(line + "\n" for line in keep))


def plot_metrics(epochs: list[dict], out: Path, title: str = "") -> Path | None:
    """Train/validation loss (left axis) and validation accuracy (right) per epoch."""
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e["epoch"] for e in epochs]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [e.get("train_loss") for e in epochs], "o-", label="train loss", color="tab:blue")
    if any(e.get("val_loss") is not None for e in epochs):
        ax.plot(x, [e.get("val_loss") for e in epochs], "s--", label="val loss", color="tab:cyan")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    acc = [(e["epoch"], e["val_accuracy"]) for e in epochs if e.get("val_accuracy") is not None]
    if acc:
        ax2.plot([a for a, _ in acc], [b for _, b in acc], "^-", label="val accuracy", color="tab:red")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("validation accuracy")
    stages = [(e["epoch"], e.get("stage")) for e in epochs]
    for (_, s0), (e1, s1) in zip(stages, stages[1:]):
        if s1 != s0:
            ax.axvline(e1 - 0.5, color="grey", lw=0.5, ls=":")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title(title or "training")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(run_dir: Path, title: str) -> None:
    """Draw a run directory's metrics.png from its metrics.jsonl."""
    plot_metrics(MetricsLog(run_dir / "metrics.jsonl").read("epoch"), run_dir / "metrics.png", title)
