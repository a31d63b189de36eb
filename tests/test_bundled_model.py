"""The bundled default model: complete, documented, and as accurate as its eval.json says.

The accuracy ``eval.json`` claims (measured by ``engine eval`` on the held-out
``test.json``) is measured again here over HTTP: the real server, started without
``--model`` (so on the bundled default), answers every held-out question, all of them
in flight at once, and the answers are compared with the gold answers as the reference
compares them (the text after the last ``#``, commas removed, stripped), and ``answer``
reads as the gold answer itself (``Tom is a yumpus.``, the question's wording). Questions
outside the model's language get a 422 that says what it reads, not a made-up answer.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from engine.models import REPO_MODELS_DIR, DEFAULT_MODEL_NAME
from tests.live_server import LiveServer

MODEL_DIR = REPO_MODELS_DIR / DEFAULT_MODEL_NAME
SYMBOLS = json.loads((MODEL_DIR / "coconut.json").read_text()).get("symbols") if MODEL_DIR.is_dir() else None


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


@pytest.fixture(scope="module")
def server():
    # No --model: the server must pick the bundled default by itself.
    with LiveServer(None, "--max-batch-size", "64", "--torch-threads", "1") as live:
        yield live


@pytest.mark.slow
def test_eval_json_accuracy_holds_over_http(server):
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

    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == DEFAULT_MODEL_NAME
    answers = asyncio.run(ask_all(server.url))
    in_wording = sum(a["answer"] == r["answer"] for a, r in zip(answers, records)) / len(records)
    correct = sum(a["text"].split("#")[-1].replace(",", "").strip() == g.replace(",", "").strip()
                  for a, g in zip(answers, gold))
    accuracy = correct / len(records)
    mean_tokens = sum(a["usage"]["completion_tokens"] for a in answers) / len(records)
    assert abs(accuracy - report["accuracy"]) <= 0.01, (accuracy, report["accuracy"])
    assert in_wording == accuracy    # a right answer is the gold sentence itself
    assert abs(mean_tokens - report["mean_generated_tokens"]) <= 0.5
    assert all(a["usage"]["latent_thoughts"] == thoughts for a in answers)


def _concept(i: int) -> str:
    return f"{chr(98 + i // 26)}{chr(97 + i % 26)}pus"


@pytest.mark.parametrize("question, says", [
    ("Is Tom a yumpus or a zumpus?", "states no facts"),
    ("Every wumpus is a yumpus. Tom is a wumpus.", "must end with 'Is X a A or B?'"),
    ("What is the capital of France?", "must end with 'Is X a A or B?'"),
    ("Zoë is a wumpus. Is Zoë a wumpus or zumpus?", "not a plain ASCII word"),
    ("Sam is a wumpus.\u0000 Is Sam a wumpus or zumpus?", "control character (U+0000"),
    # a model that renames every question to its symbols reads any word, up to so many names;
    # one that reads words as they are has a token for the words of its training data only
    (" ".join(f"Every {_concept(i)} is a {_concept(i + 1)}." for i in range(80))
     + f" Tom is a {_concept(0)}. Is Tom a {_concept(80)} or zumpus?",
     "reads ProsQA questions that name at most") if SYMBOLS else
    ("Tom is a wumpus. Is Tom a zorblaxpus or wumpus?", "no token for 'zorblaxpus'"),
    ("Tom is a wumpus. Is Sam a wumpus or zumpus?", "no fact mentions 'Sam'"),
])
def test_questions_the_model_cannot_read_get_a_422_that_says_what_it_reads(server, question, says):
    for route, body in (("/v1/reason", {"question": question}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": question}]})):
        r = httpx.post(server.url + route, json=body, timeout=60)
        assert r.status_code == 422, (route, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert says in message, message
        assert "Tom" in message or "ProsQA" in message   # it says what the model reads


def test_a_hand_written_question_gets_an_answer_in_its_wording_and_a_frontier_trace(server):
    r = httpx.post(server.url + "/v1/reason", timeout=60, json={
        "question": "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?",
        "return_latent_trace": True, "latent_trace_top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    # the answer is given in the question's wording (whether it is right is the model's accuracy,
    # measured above on held-out questions)
    assert re.fullmatch(r"Tom is a [a-z]+\.", body["answer"]), body["answer"]
    assert body["text"].split("#")[-1].split() == body["answer"].rstrip(".").replace(" is a", "").split()
    for k, thought in enumerate(body["latent_trace"], 1):
        f = thought["frontier"]
        assert f["hops"] == k
        hops = {n["concept"]: n.get("hops") for n in f["nodes"]}   # absent: unreachable
        assert hops == {"wumpus": 1, "yumpus": 2, "Tom": 0, "zumpus": None}
        assert f["frontier_mass"] == pytest.approx(sum(n["prob"] for n in f["nodes"]
                                                       if n.get("hops") is not None and n["hops"] <= k))
