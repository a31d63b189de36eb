"""A picture of an ``engine eval`` report (or several): accuracy per hop count, and for a model
that thinks, each thought's mean mass on the frontier, one hop past it and the rest.

``plot_eval_reports({"COCONUT": report, "CoT": report, ...}, out)``: the left panel draws
every report's per-hop accuracy side by side; the right panel stacks the first report with a
frontier view (``EvalReport.frontier``) per thought. Reports are the dicts ``engine eval
--json`` prints. This module knows the report's fields, nothing of models.
"""

from __future__ import annotations

from pathlib import Path


def plot_eval_reports(reports: dict[str, dict], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_frontier = next(((name, r) for name, r in reports.items() if r.get("frontier")), None)
    fig, axes = plt.subplots(1, 2 if with_frontier else 1, figsize=(11 if with_frontier else 6, 4))
    axes = list(axes) if with_frontier else [axes]
    ax = axes[0]
    hops = sorted({int(h) for r in reports.values() for h in r.get("per_hops", {})})
    width = 0.8 / max(1, len(reports))
    for i, (name, r) in enumerate(reports.items()):
        xs = [h + (i - (len(reports) - 1) / 2) * width for h in hops]
        ys = [r.get("per_hops", {}).get(str(h), {}).get("accuracy", 0.0) for h in hops]
        ax.bar(xs, ys, width=width, label=f"{name} ({r['accuracy']:.3f}, {r['mean_generated_tokens']:.1f} tok)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(hops)
    ax.set_xlabel("hops from the asked name to the right option")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("accuracy per hop count (chance 0.5)")
    if with_frontier:
        name, r = with_frontier
        ax = axes[1]
        thoughts = [f["thought"] for f in r["frontier"]]
        bottom = [0.0] * len(thoughts)
        for key, label, color in (("frontier_mass", "within k hops (frontier)", "tab:green"),
                                  ("next_mass", "exactly k+1 hops", "tab:orange"),
                                  ("rest_mass", "everything else", "tab:gray")):
            vals = [f[key] for f in r["frontier"]]
            ax.bar(thoughts, vals, bottom=bottom, label=label, color=color)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(thoughts)
        ax.set_xlabel("thought k")
        ax.set_ylabel("mean probability mass (softmax of the LM head)")
        ax.set_ylim(0, 1.0)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"{name}: where each thought's mass lies")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.train.eval_plot OUT.png NAME=REPORT.json ...``"""
    import argparse
    import json

    p = argparse.ArgumentParser(description="plot engine eval --json reports side by side")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("reports", nargs="+", metavar="NAME=REPORT.json", help="a label and an engine eval --json file")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(argv)
    reports = {}
    for item in args.reports:
        name, _, path = item.partition("=")
        if not path:
            p.error(f"{item!r}: expected NAME=REPORT.json")
        reports[name] = json.loads(Path(path).read_text())
    print(plot_eval_reports(reports, Path(args.out), args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
