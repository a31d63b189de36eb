"""``engine bench arrivals`` on a tiny model: every request completes with the length it
drew, every gap between two of a request's tokens is counted once, and the reported ratio
is the one its own figures give."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.bench.arrivals import parse_budgets


def test_arrivals_bench_counts_every_token_gap_per_budget():
    cmd = [sys.executable, "-m", "engine.cli", "bench", "arrivals", "--hidden", "32", "--layers", "1", "--heads", "2",
           "--vocab", "256", "--concurrency", "4", "--num-requests", "10", "--prompt-tokens", "30",
           "--max-tokens", "6", "--thoughts", "2", "--budgets", "0,8", "--rounds", "1", "--threads", "1", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [arm["budget"] for arm in report["arms"]] == [0, 8]
    expected_tokens = round(report["max_tokens_mean"] * 10)
    for arm in report["arms"]:
        assert arm["completed"] == 10 and arm["failed"] == 0
        assert arm["total_output_tokens"] == expected_tokens          # ignore_eos: each its drawn length
        assert arm["itl_count"] == expected_tokens - 10                # one gap between consecutive tokens
        itl = arm["itl_ms"]
        assert abs(arm["itl_p99_over_median"] - itl["p99"] / itl["median"]) < 1e-9
    assert "budget unbounded" in result.stderr and "budget 8" in result.stderr   # progress is shown


def test_arrivals_bench_takes_its_questions_from_a_records_file(tmp_path, gpt2_checkpoint):
    from tests.engine_helpers import QUESTIONS

    data = tmp_path / "records.json"
    data.write_text(json.dumps([{"question": q, "steps": [], "answer": "x"} for q in QUESTIONS[:3]]))
    cmd = [sys.executable, "-m", "engine.cli", "bench", "arrivals", "--model", str(gpt2_checkpoint),
           "--data", str(data), "--concurrency", "2", "--num-requests", "5", "--max-tokens", "4",
           "--thoughts", "1", "--budgets", "16", "--rounds", "1", "--threads", "1", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data"] == str(data) and report["arms"][0]["completed"] == 5
    assert 5 < report["prompt_tokens"] < 60        # the records' questions, not generated ~250-token ones


@pytest.mark.parametrize("text", ["", "a,b", "-1", "64,-2"])
def test_bad_budgets_are_refused_with_the_expected_form(text):
    with pytest.raises(ValueError, match="expected integers >= 0"):
        parse_budgets(text)
