"""Merge several servers' Prometheus text expositions into one, each sample labelled with
the replica it came from.

    merged = merge_expositions({"r1": text_of_r1, "r2": text_of_r2})

Every sample gets a ``replica="<name>"`` label (it replaces one of that name if present);
each metric family's ``# HELP`` / ``# TYPE`` lines appear once, followed by the samples of
every replica in the order given. The input is the text ``prometheus_client`` writes
(``generate_latest``); this module knows that format, nothing of Ray or of the server.
"""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() or abs(value) >= 1e16 else f"{value:.1f}"


def _sample_line(name: str, labels: dict[str, str], value: float, timestamp) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    line = f"{name}{{{inner}}} {_number(value)}"
    if timestamp is not None:
        line += f" {int(float(timestamp) * 1000)}"
    return line


def merge_expositions(by_replica: dict[str, str]) -> str:
    """One exposition holding every replica's samples (see the module docstring)."""
    families: dict[str, tuple[str, str, list[str]]] = {}   # name -> (type, help, sample lines)
    for replica, text in by_replica.items():
        for family in text_string_to_metric_families(text):
            kind = family.type
            # the parser reads a counter "x_total" as family "x"; prometheus_client writes the
            # TYPE line under the family name, so the merged text does the same
            entry = families.setdefault(family.name, (kind, family.documentation, []))
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != REPLICA_LABEL}
                labels[REPLICA_LABEL] = replica
                entry[2].append(_sample_line(sample.name, labels, sample.value, sample.timestamp))
    lines: list[str] = []
    for name, (kind, documentation, samples) in families.items():
        lines.append(f"# HELP {name} {_help(documentation)}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)
    return "\n".join(lines) + "\n" if lines else ""
