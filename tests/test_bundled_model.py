"""The bundled default model: complete, documented, and as accurate as its eval.json says.

The accuracy ``eval.json`` claims (measured by ``engine eval`` on the held-out
``test.json``) is measured again here over HTTP: the real server, started without
``--model`` (so on the bundled default), answers every held-out question, all of them
in flight at once, and the answers are compared with the gold answers as the reference
compares them (the text after the last ``#``, commas removed, stripped).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine.models import REPO_MODELS_DIR, DEFAULT_MODEL_NAME
from tests.live_server import LiveServer

MODEL_DIR = REPO_MODELS_DIR / DEFAULT_MODEL_NAME


def test_bundled_model_directory_is_complete():
    assert MODEL_DIR.is_dir(), f"the bundled model is missing: {MODEL_DIR}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "coconut.json", "test.json",
                 "eval.json", "README.md", "metrics.jsonl"):
        assert (MODEL_DIR / name).is_file(), f"{MODEL_DIR / name} is missing"
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"the bundled model takes {size / 2**20:.1f} MiB; keep it to a few MB"
    report = json.loads((MODEL_DIR / "eval.json").read_text())
    # eval.json is what `engine eval --model . --data test.json --json` printed (models/*/README.md)
    for key, kind in (("accuracy", float), ("data", str), ("thoughts", int), ("mean_generated_tokens", float),
                      ("mean_thoughts", float), ("latent", str), ("max_tokens", int)):
        assert isinstance(report.get(key), kind), f"eval.json field {key!r} must be a {kind.__name__}"
    assert report["data"] == "test.json" and report["latent"].startswith("fixed:")
    records = json.loads((MODEL_DIR / "test.json").read_text())
    assert report["n"] == len(records) >= 200


@pytest.mark.slow
def test_eval_json_accuracy_holds_over_http():
    report = json.loads((MODEL_DIR / "eval.json").read_text())
    coconut = json.loads((MODEL_DIR / "coconut.json").read_text())
    records = json.loads((MODEL_DIR / "test.json").read_text())
    from engine.train.evaluate import gold_answer

    gold = [gold_answer(r["answer"], coconut.get("text_format", "reference")) for r in records]
    thoughts = report["thoughts"]

    async def ask_all(url: str) -> list[dict]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            async def ask(record):
                r = await client.post("/v1/reason", json={
                    "question": record["question"], "temperature": 0, "max_tokens": report["max_tokens"],
                    "latent": {"mode": "fixed", "thoughts": thoughts}})
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(ask(r) for r in records))

    # No --model: the server must pick the bundled default by itself.
    with LiveServer(None, "--max-batch-size", "64", "--torch-threads", "1") as server:
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == DEFAULT_MODEL_NAME
        answers = asyncio.run(ask_all(server.url))
    correct = sum(a["text"].split("#")[-1].replace(",", "").strip() == g.replace(",", "").strip()
                  for a, g in zip(answers, gold))
    accuracy = correct / len(records)
    mean_tokens = sum(a["usage"]["completion_tokens"] for a in answers) / len(records)
    assert abs(accuracy - report["accuracy"]) <= 0.01, (accuracy, report["accuracy"])
    assert abs(mean_tokens - report["mean_generated_tokens"]) <= 0.5
    assert all(a["usage"]["latent_thoughts"] == thoughts for a in answers)
