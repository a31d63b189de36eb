"""``engine bench replicas`` end to end on the bundled model, a few requests per server:
it starts the single server and a Ray replica set, drives them, and reports figures for
each (the figures themselves are the benchmark's business, not this test's)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve", reason='the Ray Serve extra is not installed (pip install -e ".[ray]")')


@pytest.mark.timeout(900)
def test_bench_replicas_reports_every_server(tmp_path):
    out = tmp_path / "replicas.json"
    subprocess.run([sys.executable, "-m", "engine.cli", "bench", "replicas", "--num-prompts", "6",
                    "--concurrency", "1,4", "--max-tokens", "4", "--ingress", "haproxy", "--output", str(out)],
                   check=True, timeout=840, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["runs"]] == ["single", "haproxy x1", "haproxy x2"]
    assert [r["replicas_seen"] for r in report["runs"]] == [1, 1, 2]
    for run in report["runs"]:
        for level in ("1", "4"):
            row = run["levels"][level]
            assert row["completed"] == 6 and row["failed"] == 0
            assert row["total_output_tokens"] == 6 * 4
    assert set(report["proxy_added_ms"]) == {"haproxy"}
