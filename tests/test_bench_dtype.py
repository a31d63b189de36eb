"""``engine bench dtype`` end to end on a tiny random model: float32 and bfloat16 each run the
same questions, the report has every arm's timings, the share of greedy outputs equal to
float32's (float32 against itself: all of them) and each arm's accuracy on a records file
(scored by engine eval, so equal to an ``evaluate`` run of the same checkpoint here)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_dtype_reports_speed_and_answers_per_arm(tmp_path, tiny_checkpoint):
    from engine.data.prosqa import generate
    from engine.sync_engine import Engine
    from engine.train.evaluate import evaluate
    from engine.data.records import load_records

    model = tiny_checkpoint("gpt2")
    data = tmp_path / "test.json"
    data.write_text(json.dumps(generate(6, seed=3, size="mini")))
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "dtype", "--model", str(model), "--batch", "3",
         "--max-tokens", "3", "--thoughts", "2", "--rounds", "1", "--threads", "1", "--data", str(data), "--json"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert set(report["arms"]) == {"float32", "bfloat16"}
    assert report["arms"]["float32"]["same_tokens_as_float32"] == 1.0
    assert 0.0 <= report["arms"]["bfloat16"]["same_tokens_as_float32"] <= 1.0
    assert set(report["ratios"]["bfloat16"]) == {"prefill_s", "step_ms_b3", "step_ms_b1"}
    expected = evaluate(Engine.from_pretrained(model), load_records(data), max_tokens=16).accuracy
    assert report["accuracy"]["float32"] == expected
