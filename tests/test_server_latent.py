"""The ``auto`` latent policy over HTTP, with a checkpoint that has a stop classifier: the
answer equals the engine's for the same policy, the mode is inferred from the fields
given, and the stop-classifier early exits and thoughts per request reach /metrics.

The classifier is a linear head with zero weights and bias +5: its stop probability is
sigmoid(5) ~ 0.993 after every thought, so threshold 0.5 stops after the first thought
(an early exit) and threshold 1.0 never stops before the cap.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.test_server_harness import InProcessServer, read_metrics

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
CAP = 6


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    from engine.checkpoint import StopClassifierSpec
    from engine.stop_classifier import StopClassifier

    head = StopClassifier(64, 0)
    with torch.no_grad():
        head.net[0].weight.zero_()
        head.net[0].bias.fill_(5.0)
    spec = StopClassifierSpec(path="stop.safetensors", threshold=0.5, max_thoughts=CAP)
    # seed/max_positions make this fixture's cache key unique (a module's repr hides its weights)
    return tiny_checkpoint("gpt2", stop_classifier=head, stop_spec=spec, seed=5, max_positions=256)


@pytest.fixture(scope="module")
def server(checkpoint):
    from engine.sync_engine import Engine

    with InProcessServer(checkpoint, engine=Engine.from_pretrained(checkpoint)) as live:
        yield live


def test_auto_policy_answers_like_the_engine_and_counts_early_exits(server, checkpoint):
    from engine.sync_engine import Engine
    from engine.params import LatentPolicy, SamplingParams

    oracle = Engine.from_pretrained(checkpoint)
    before = read_metrics(server.url)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        cases = [({"max_thoughts": 4}, LatentPolicy(mode="auto", max_thoughts=4), 1),      # auto inferred
                 ({"mode": "auto", "threshold": 1.0}, LatentPolicy(mode="auto", threshold=1.0), CAP)]
        for latent, policy, thoughts in cases:
            r = http.post("/v1/reason", json={"question": QUESTION, "max_tokens": 8, "latent": latent})
            assert r.status_code == 200, r.text
            want = oracle.generate(QUESTION, SamplingParams(max_tokens=8), policy)[0]
            assert r.json()["usage"]["latent_thoughts"] == want.num_thoughts == thoughts
            assert r.json()["text"] == want.text
        models = http.get("/v1/models").json()["data"][0]
        assert models["coconut"]["stop_classifier"] is True
    after = read_metrics(server.url)
    assert after["coconut_stop_classifier_early_exits_total"] - before["coconut_stop_classifier_early_exits_total"] == 1
    assert after["coconut_thoughts_per_request_sum"] - before["coconut_thoughts_per_request_sum"] == 1 + CAP
    assert after["coconut_latent_thoughts_total"] - before["coconut_latent_thoughts_total"] == 1 + CAP
