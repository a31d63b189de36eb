"""``engine bench models`` end to end on a tiny random checkpoint, in its smallest configuration
(no GGUF: ``--gguf none``): the loads run in fresh processes and report time and memory, the
engine's decode steps and transformers generate's are counted alike (the first token's prefill
excluded from both), each ratio is engine / transformers of the reported medians, and the JSON
carries the machine's facts with a plot beside it (timings themselves are the benchmark's
business, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_models_reports_loads_and_steps_side_by_side(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint("gpt2")
    out_json = tmp_path / "bench" / "models.json"
    new_tokens = 3
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "models", "--model", str(model), "--gguf", "none",
         "--repeats", "1", "--rounds", "1", "--batches", "1,2", "--max-tokens", str(new_tokens),
         "--prompt-tokens", "16", "--load-batch-size", "2", "--threads", "1", "--json", str(out_json)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert "b=2" in done.stdout and "transformers" in done.stdout   # the table

    machine = report["machine"]
    for key in ("cpu", "cores", "torch", "transformers", "threads", "date"):
        assert machine[key], key
    assert machine["threads"] == 1

    load = report["load"]
    assert load["conversion"] is None                       # --gguf none: no GGUF, no conversion
    assert set(load["kinds"]) == {"converted", "transformers"}
    for row in load["kinds"].values():
        assert len(row["runs"]) == 1 and row["runs"][0]["threads"] == 1   # the child took --threads
        assert 0 < row["seconds"] < row["process_s"]        # the load call, inside its whole process
        assert 0 < row["rss_before_load_bytes"] <= row["rss_after_load_bytes"] <= row["peak_rss_bytes"]
    engine_row = load["kinds"]["converted"]
    assert engine_row["kv_cache_slots"] == 2 and engine_row["kv_cache_bytes"] > 0
    assert 0 < engine_row["checkpoint_s"] <= engine_row["seconds"]
    assert load["ratios"]["converted_over_transformers_s"] == pytest.approx(
        engine_row["seconds"] / load["kinds"]["transformers"]["seconds"])

    assert set(report["steps"]) == {"1", "2"}
    for batch, row in report["steps"].items():
        assert row["requests"] == int(batch)
        # every new token after the first is one decode step, on both sides
        assert row["engine_steps_per_round"] == row["hf_steps_per_round"] == new_tokens - 1
        assert row["engine_step_ms"] > 0 and row["hf_step_ms"] > 0
        assert row["engine_over_hf_step"] == pytest.approx(row["engine_step_ms"] / row["hf_step_ms"])
        assert row["same_tokens"] == 1.0                    # greedy on the same weights
        assert 0 <= row["rows_reaching_eos"] <= int(batch)
    assert out_json.with_suffix(".png").stat().st_size > 1000
