"""Summary statistics of a data set, to compare a generated file with the real split.

``record_stats`` returns plain numbers: the number of records; steps per record and
question length in words (min / mean / max, plus the steps histogram); and, for records
that carry a ProsQA graph (``idx_to_symbol`` and ``edges``), nodes, edges and people
(parentless nodes) per graph. ``format_stats`` lays several such summaries side by side.
It knows nothing of how the records were made.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from engine.data.records import Record


def _summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def record_stats(records: Sequence[Record]) -> dict[str, Any]:
    steps = [len(r.steps) for r in records]
    graphs = [r.extra for r in records if "idx_to_symbol" in r.extra and "edges" in r.extra]
    people = []
    for g in graphs:
        children = {e[1] for e in g["edges"]}
        people.append(sum(1 for i in range(len(g["idx_to_symbol"])) if i not in children))
    return {
        "records": len(records),
        "steps": _summary(steps),
        "steps_histogram": dict(sorted(Counter(steps).items())),
        "question_words": _summary([len(r.question.split()) for r in records]),
        "graphs": len(graphs),
        "nodes": _summary([len(g["idx_to_symbol"]) for g in graphs]),
        "edges": _summary([len(g["edges"]) for g in graphs]),
        "people": _summary(people),
    }


def format_stats(named: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A text table: one row per statistic, one column per (name, stats) pair."""
    rows: list[list[str]] = [["", *(name for name, _ in named)]]
    rows.append(["records", *(str(s["records"]) for _, s in named)])
    for key, label in (("nodes", "nodes"), ("edges", "edges"), ("people", "people"),
                       ("steps", "steps"), ("question_words", "question words")):
        cells = []
        for _, s in named:
            v = s[key]
            cells.append("-" if v is None else f"{v['min']:g} / {v['mean']:.2f} / {v['max']:g}")
        rows.append([f"{label} (min / mean / max)", *cells])
    all_steps = sorted({k for _, s in named for k in s["steps_histogram"]})
    for k in all_steps:
        cells = []
        for _, s in named:
            count = s["steps_histogram"].get(k, 0)
            cells.append(f"{count} ({100 * count / max(1, s['records']):.1f}%)")
        rows.append([f"  {k} steps", *cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
