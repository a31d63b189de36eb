"""Noisy soft thoughts and Mixture of Inputs through the server: ``/v1/reason``, the OpenAI
routes' extras, the SDK, the server's defaults (``--feedback-noise``, ``--mixture``), and
clear 422s for bad values.

The oracle of each HTTP answer is the offline engine given the same parameters (its own
exactness against the reference is ``tests/test_randomness.py``'s): the server must pass
them through and apply its defaults, no more.
"""

from __future__ import annotations

import httpx
import pytest

from engine import Engine, LatentPolicy, SamplingParams
from engine.params import FeedbackNoise, InputMixture
from tests.test_server_harness import InProcessServer

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
NOISE = {"type": "gumbel", "tau": 0.5}
MIXTURE = {"type": "moi", "beta": 1.0, "top_k": 5}
SOFT = {"type": "soft_embedding", "top_k": 5}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="module")
def offline(checkpoint):
    return Engine.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint):
    """A server whose defaults are a Dirichlet noise and a MoI with top-k 4."""
    with InProcessServer(checkpoint, engine_process=False, max_batch_size=8,
                         feedback_noise='{"type": "dirichlet", "alpha": 2.0}',
                         mixture='{"type": "moi", "top_k": 4}') as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _engine_text(engine, sampling: dict, feedback: dict | None, thoughts: int = 3) -> str:
    [out] = engine.generate(QUESTION, SamplingParams(**sampling), LatentPolicy(mode="fixed", thoughts=thoughts,
                                                                              feedback=feedback))
    return out.text


def test_reason_passes_noise_and_mixture_through(http, offline):
    body = {"question": QUESTION, "max_tokens": 8, "temperature": 1.0, "seed": 9, "mixture": MIXTURE,
            "latent": {"mode": "fixed", "thoughts": 3, "feedback": {**SOFT, "noise": NOISE}}}
    r = http.post("/v1/reason", json=body)
    assert r.status_code == 200, r.text
    want = _engine_text(offline, {"max_tokens": 8, "temperature": 1.0, "seed": 9, "mixture": MIXTURE},
                        {**SOFT, "noise": NOISE})
    assert r.json()["text"] == want
    assert http.post("/v1/reason", json=body).json()["text"] == want            # the seed fixes the thoughts


def test_the_servers_defaults_apply_and_a_request_turns_them_off(http, offline):
    base = {"question": QUESTION, "max_tokens": 8, "temperature": 1.0, "seed": 4,
            "latent": {"mode": "fixed", "thoughts": 3, "feedback": SOFT}}
    r = http.post("/v1/reason", json=base)
    assert r.status_code == 200, r.text
    defaults = _engine_text(offline, {"max_tokens": 8, "temperature": 1.0, "seed": 4,
                                      "mixture": {"type": "moi", "top_k": 4}},
                            {**SOFT, "noise": {"type": "dirichlet", "alpha": 2.0}})
    assert r.json()["text"] == defaults
    off = dict(base, mixture={"type": "none"}, latent={"mode": "fixed", "thoughts": 3,
                                                       "feedback": {**SOFT, "noise": {"type": "none"}}})
    r = http.post("/v1/reason", json=off)
    assert r.json()["text"] == _engine_text(offline, {"max_tokens": 8, "temperature": 1.0, "seed": 4}, SOFT)


def test_n_noisy_answers_over_http(http):
    body = {"question": QUESTION, "max_tokens": 6, "seed": 21, "n": 3, "return_latent_trace": True,
            "latent": {"mode": "fixed", "thoughts": 2, "feedback": {**SOFT, "noise": NOISE}}}
    r = http.post("/v1/reason", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["samples"]) == 3 and r.json()["usage"]["latent_thoughts"] == 2


def test_openai_routes_take_noise_and_mixture_as_extras(http, offline):
    extras = {"mixture": MIXTURE, "latent": {"mode": "fixed", "thoughts": 3, "feedback": {**SOFT, "noise": NOISE}}}
    want = _engine_text(offline, {"max_tokens": 6, "temperature": 1.0, "seed": 3, "mixture": MIXTURE},
                        {**SOFT, "noise": NOISE})
    r = http.post("/v1/completions", json={"prompt": QUESTION, "max_tokens": 6, "seed": 3, **extras})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                "max_tokens": 6, "seed": 3, **extras})
    assert r.status_code == 200, r.text


def test_the_sdk_sends_the_mixture(server, offline):
    from coconut_client import CoconutClient, Mixture

    with CoconutClient(base_url=server.url, max_retries=0) as client:
        typed = client.reason(QUESTION, max_tokens=6, seed=5, temperature=1.0, mixture=Mixture(beta=1.0, top_k=5),
                              latent={"mode": "fixed", "thoughts": 3, "feedback": {**SOFT, "noise": NOISE}})
        plain = client.reason(QUESTION, max_tokens=6, seed=5, temperature=1.0, mixture=MIXTURE,
                              latent={"mode": "fixed", "thoughts": 3, "feedback": {**SOFT, "noise": NOISE}})
    want = _engine_text(offline, {"max_tokens": 6, "temperature": 1.0, "seed": 5, "mixture": MIXTURE},
                        {**SOFT, "noise": NOISE})
    assert typed.text == plain.text == want


@pytest.mark.parametrize("patch, param, words", [
    ({"mixture": {"type": "moi", "top_k": 1}}, "mixture.top_k", "greater than or equal to 2"),
    ({"mixture": {"type": "moi", "beta": -1.0}}, "mixture.beta", "greater than or equal to 0"),
    ({"mixture": {"type": "mix"}}, "mixture.type", "'moi' or 'none'"),
    ({"mixture": {"type": "moi", "alpha": 1.0}}, "mixture.alpha", "Extra inputs"),
    ({"latent": {"feedback": {"type": "soft_embedding", "noise": {"type": "gumbel", "tau": 0.0}}}},
     "latent.feedback.noise.tau", "greater than 0"),
    ({"latent": {"feedback": {"type": "soft_embedding", "noise": {"type": "dirichlet", "alpha": "x"}}}},
     "latent.feedback.noise.alpha", "valid number"),
    ({"latent": {"feedback": {"type": "soft_embedding", "noise": {"tau": 1.0}}}},
     "latent.feedback.noise.type", "Field required"),
    ({"latent": {"feedback": {"type": "hidden", "noise": {"type": "gumbel"}}}}, None,
     "latent.feedback.noise is only meaningful with type 'soft_embedding'"),
    ({"latent": {"feedback": {"type": "soft_embedding", "noise": {"type": "gumbel", "alpha": 2.0}}}}, None,
     "latent.feedback.noise.alpha is only meaningful with type 'dirichlet'"),
])
def test_bad_values_are_clear_422s(http, patch, param, words):
    for route, body in (("/v1/reason", {"question": QUESTION}), ("/v1/completions", {"prompt": QUESTION})):
        r = http.post(route, json={**body, "max_tokens": 2, **patch})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert words in error["message"], error
        if param:
            assert error["param"] == param


def test_server_flags_are_checked_at_start_up_and_reach_the_engine(checkpoint):
    from pydantic import ValidationError

    from server.app import engine_options
    from server.settings import ServerSettings

    settings = ServerSettings(model=str(checkpoint), feedback_noise='{"type": "gumbel", "tau": 0.3}',
                              mixture='{"type": "moi"}')
    options = engine_options(settings)
    assert options["feedback_noise"] == {"type": "gumbel", "tau": 0.3} and options["mixture"] == {"type": "moi"}
    assert engine_options(ServerSettings(model=str(checkpoint)))["mixture"] is None
    for field, value, words in (("feedback_noise", '{"type": "gumbel", "tau": -1}', "tau=-1 is invalid"),
                                ("feedback_noise", '{"tau": 1}', "needs a type"),
                                ("feedback_noise", "gumbel", "is not JSON"),
                                ("mixture", '{"type": "moi", "top_k": 1}', "mixture.top_k=1 is invalid"),
                                ("mixture", '{"type": "moi", "k": 3}', "unknown fields ['k']")):
        with pytest.raises(ValidationError, match=words.replace("[", r"\[").replace("]", r"\]")):
            ServerSettings(model=str(checkpoint), **{field: value})
    # the engine process's frontend (which makes the requests) applies the same defaults
    frontend = Engine.frontend(checkpoint, feedback_noise=options["feedback_noise"], mixture=options["mixture"])
    request = frontend.make_request(QUESTION, latent=LatentPolicy(mode="fixed", thoughts=2, feedback=SOFT))
    assert request.latent.feedback.noise == FeedbackNoise("gumbel", tau=0.3)
    assert request.sampling.mixture == InputMixture()


def test_the_serve_help_lists_the_flags():
    from server.cli import register
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--feedback-noise" in text and "--mixture" in text
