"""``engine generate`` prints what the Python API returns for the same question."""

from __future__ import annotations

import json
import subprocess
import sys

from engine import Engine, LatentPolicy, SamplingParams


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120)


def test_generate_json_matches_python_api(gpt2_checkpoint):
    question = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zumpus?"
    proc = run_cli("generate", "--model", str(gpt2_checkpoint), question, "--thoughts", "3",
                   "--max-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    [expected] = Engine.from_pretrained(gpt2_checkpoint).generate(
        [question], SamplingParams(max_tokens=6), LatentPolicy(mode="fixed", thoughts=3))
    assert printed["token_ids"] == expected.token_ids
    assert printed["text"] == expected.text and printed["num_thoughts"] == 3


def test_generate_reports_bad_input_without_traceback(gpt2_checkpoint, tmp_path):
    proc = run_cli("generate", "--model", str(gpt2_checkpoint), "Is Tom a wumpus?", "--latent", "auto")
    assert proc.returncode == 2
    assert "needs a stop classifier" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("generate", "--model", str(tmp_path), "Is Tom a wumpus?")
    assert proc.returncode == 2 and "missing config.json" in proc.stderr and "Traceback" not in proc.stderr
