"""The chart of ``engine bench peers``: per level, each server's output tok/s, TTFT median
and ITL p99, closed-loop levels on the left of each panel, Poisson rates on the right."""

from __future__ import annotations


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = report["servers"]
    names = list(servers)
    if not names:
        return
    levels = servers[names[0]]["levels"]
    labels = [f"c={r['concurrency']:g}" if "concurrency" in r else f"{r['rate']:g}/s" for r in levels]
    panels = [("output tokens/s", lambda r: r["output_throughput"]),
              ("TTFT median (ms)", lambda r: r["ttft_ms"]["median"] or 0),
              ("ITL p99 (ms)", lambda r: r["itl_ms"]["p99"] or 0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    width = 0.8 / len(names)
    for ax, (title, value) in zip(axes, panels):
        for k, name in enumerate(names):
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(levels))]
            ax.bar(xs, [value(r) for r in servers[name]["levels"]], width, label=name, color=f"C{k}")
        ax.set_xticks(range(len(levels)), labels, rotation=45, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['model'].rsplit('/', 1)[-1]} ({report['dtype']}), {report['max_tokens']} answer tokens, "
                 f"streamed greedy chat; {report['machine']['cpu']}, {report['machine']['cores']} cores",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
