"""``engine bench churn`` on a tiny model: it measures every kind of step, keeps the long
rows running throughout and reports the ratios from its own medians."""

from __future__ import annotations

import json
import subprocess
import sys


def test_churn_bench_runs_and_reports_consistent_ratios():
    cmd = [sys.executable, "-m", "engine.cli", "bench", "churn", "--hidden", "32", "--layers", "1", "--heads", "2",
           "--vocab", "256", "--rows", "3", "--prompt-tokens", "40", "--join-tokens", "8", "--cycles", "3",
           "--threads", "1", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    ms, ratios = report["step_ms"], report["ratios"]
    assert set(ms) == {"plain", "join", "leave", "alone"} and all(v > 0 for v in ms.values())
    assert abs(ratios["join_extra_over_alone"] - (ms["join"] - ms["plain"]) / ms["alone"]) < 1e-9
    assert abs(ratios["join_over_plain"] - ms["join"] / ms["plain"]) < 1e-9
    assert abs(ratios["leave_over_plain"] - ms["leave"] / ms["plain"]) < 1e-9
    assert "cycle" in result.stderr          # progress is shown
