"""Compare training runs in one figure: validation accuracy and generated tokens against
training time, or (``--x samples``) against training samples seen.

    python -m engine.train.compare --run CoT=runs/recipes/prosqa_linear_cot \\
        --run no-CoT=runs/recipes/prosqa_linear_no_cot \\
        --run Coconut=runs/recipes/prosqa_linear_coconut@CoT:50 --out docs/recipe.png

``LABEL=RUN_DIR`` reads ``RUN_DIR/metrics.jsonl`` (its ``epoch`` lines). ``@OTHER:E``
says the run continues another run's checkpoint of epoch E (COCONUT's stages 1+ on top of
the CoT run's stage 0): its axis starts where OTHER's epoch E ended, and OTHER's epochs up
to E are drawn before it. The x axis is cumulative training seconds (validation excluded),
in minutes, or cumulative ``samples`` of the epoch lines (an epoch without the field counts
none). This module knows only the metrics format.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from engine.train.metrics import read_metrics


@dataclass
class Curve:
    label: str
    minutes: list[float]
    samples: list[int]
    accuracy: list[float | None]
    tokens: list[float | None]
    stages: list[int]


def load_curves(specs: list[str]) -> list[Curve]:
    parsed = []
    for spec in specs:
        label, sep, rest = spec.partition("=")
        if not sep or not label:
            raise ValueError(f"--run {spec!r}: expected LABEL=RUN_DIR or LABEL=RUN_DIR@OTHER:EPOCH")
        run, _, after = rest.partition("@")
        epochs = read_metrics(Path(run) / "metrics.jsonl", "epoch")
        if not epochs:
            raise ValueError(f"--run {spec!r}: no epoch lines in {Path(run) / 'metrics.jsonl'}")
        parsed.append((label, epochs, after))
    by_label = {label: epochs for label, epochs, _ in parsed}
    curves = []
    for label, epochs, after in parsed:
        start, prefix = 0.0, []
        if after:
            other, _, epoch = after.partition(":")
            if other not in by_label or not epoch.isdigit():
                raise ValueError(f"--run {label}: '@{after}' must name another --run label and an epoch")
            prefix = [e for e in by_label[other] if e["epoch"] <= int(epoch)]
            start = sum(e["train_seconds"] for e in prefix)
            seen_before = sum(e.get("samples", 0) for e in prefix)
        else:
            seen_before = 0
        elapsed, minutes, seen, samples = start, [], seen_before, []
        for e in epochs:
            elapsed += e["train_seconds"]
            seen += e.get("samples", 0)
            minutes.append(elapsed / 60)
            samples.append(seen)
        rows = list(epochs)
        if prefix:   # draw the shared stage 0 point at the hand-over
            minutes.insert(0, start / 60)
            samples.insert(0, seen_before)
            rows.insert(0, prefix[-1])
        curves.append(Curve(label, minutes, samples, [r.get("val_accuracy") for r in rows],
                            [r.get("val_mean_tokens") for r in rows], [r.get("stage", 0) for r in rows]))
    return curves


#: --x: the axis (a Curve field) and its label
AXES = {"minutes": ("minutes", "training minutes (one CPU core)"),
        "samples": ("samples", "training samples seen")}


def plot_curves(curves: list[Curve], out: Path, title: str = "", x: str = "minutes") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, tok_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for curve in curves:
        for ax, values in ((acc_ax, curve.accuracy), (tok_ax, curve.tokens)):
            points = [(m, v) for m, v in zip(getattr(curve, AXES[x][0]), values) if v is not None]
            if points:
                ax.plot([m for m, _ in points], [v for _, v in points], ".-", label=curve.label)
    acc_ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_ylabel("held-out accuracy")
    tok_ax.set_ylabel("generated tokens per answer")
    tok_ax.set_ylim(bottom=0)
    for ax in (acc_ax, tok_ax):
        ax.set_xlabel(AXES[x][1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "training runs")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR[@OTHER:EPOCH]")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--title", default="")
    parser.add_argument("--x", choices=sorted(AXES), default="minutes",
                        help="the x axis: training minutes (default) or samples seen")
    args = parser.parse_args(argv)
    try:
        curves = load_curves(args.run)
    except ValueError as e:
        parser.error(str(e))
    print(plot_curves(curves, args.out, args.title, args.x))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
