"""``ProcessEngine``: the engine loop in a child process, driven like ``AsyncEngine``.

Answers are the naive reference's token for token; an abandoned stream frees its slot; bad
input is refused in the parent; a dead child fails every waiting caller and turns
``is_healthy`` false; and ``engine serve`` (the engine in its own process by default)
answers over HTTP, streamed and not, as the in-process server (``--no-engine-process``) does."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine.async_engine import EngineDeadError
from engine.core import RequestTooLongError
from engine.params import LatentPolicy, SamplingParams
from engine.process_engine import ProcessEngine
from tests.engine_helpers import QUESTIONS, reference
from tests.live_server import LiveServer


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=240))


async def collect(engine, question, sampling, latent):
    outs = [out async for out in engine.generate(question, sampling, latent)]
    return outs[-1]


def test_answers_match_the_reference_and_an_abandoned_stream_frees_its_slot(gpt2_checkpoint):
    from engine.sync_engine import Engine

    oracle = Engine.from_pretrained(gpt2_checkpoint)   # the reference needs weights: the frontend has none

    async def main():
        engine = ProcessEngine(gpt2_checkpoint, {"max_batch_size": 4, "max_prefill_tokens": 16})
        await engine.start()
        try:
            sampling = SamplingParams(max_tokens=6, ignore_eos=True)
            latent = LatentPolicy(mode="fixed", thoughts=2)
            finals = await asyncio.gather(*(collect(engine, q, sampling, latent) for q in QUESTIONS[:6]))
            for question, final in zip(QUESTIONS[:6], finals):
                expected = reference(oracle, question, 2, 6, ignore_eos=True)
                assert final.token_ids == expected.token_ids, question
                assert final.finished and final.finish_reason == "length" and final.num_thoughts == 2
                assert final.prompt_token_ids == engine.make_request(question, sampling, latent).prompt_token_ids
            # leave a stream after its first output: the child aborts it, the slot comes back
            stream = engine.generate(QUESTIONS[0], SamplingParams(max_tokens=50, ignore_eos=True), latent)
            first = await stream.__anext__()
            assert not first.finished
            await stream.aclose()
            for _ in range(200):
                if engine.num_running == 0 and engine.num_waiting == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.num_running == 0 and engine.num_waiting == 0
            again = await collect(engine, QUESTIONS[1], sampling, latent)
            assert again.token_ids == reference(oracle, QUESTIONS[1], 2, 6, ignore_eos=True).token_ids
            assert engine.engine.checkpoint.model.device.type == "meta"    # no second copy of the weights
        finally:
            await engine.shutdown()
        assert not engine.is_healthy

    run(main())


def test_text_stop_strings_and_traces_are_made_in_the_parent(gpt2_checkpoint):
    """The child sends token ids only: the parent's text, its stop strings (which end the
    request in the child), log-probabilities and latent traces equal the in-process engine's."""
    from engine.sync_engine import Engine

    oracle = Engine.from_pretrained(gpt2_checkpoint)
    latent = LatentPolicy(mode="fixed", thoughts=3, trace_top_k=3)
    full = oracle.generate(QUESTIONS[3], SamplingParams(max_tokens=12, ignore_eos=True), latent)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    sampling = SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop], logprobs=True)
    want = oracle.generate(QUESTIONS[3], sampling, latent)[0]
    assert want.finish_reason == "stop" and stop not in want.text

    async def main():
        engine = ProcessEngine(gpt2_checkpoint, {"max_batch_size": 2})
        await engine.start()
        try:
            outs = [out async for out in engine.generate(QUESTIONS[3], sampling, latent)]
            again = await collect(engine, QUESTIONS[3], SamplingParams(max_tokens=12, ignore_eos=True), latent)
            return outs, again, engine.num_running
        finally:
            await engine.shutdown()

    outs, again, _ = run(main())
    final = outs[-1]
    assert final.finish_reason == "stop" and final.text == want.text
    assert "".join(out.delta for out in outs) == want.text
    assert final.logprobs == pytest.approx(want.logprobs)
    assert [t["token_ids"] for t in final.latent_trace] == [t["token_ids"] for t in want.latent_trace]
    assert final.timings["total"] >= final.timings["decode"] > 0
    assert again.text == full.text and again.finish_reason == "length"


def test_bad_input_is_refused_in_the_parent_and_a_dead_child_fails_callers(gpt2_checkpoint):
    async def main():
        engine = ProcessEngine(gpt2_checkpoint, {"max_batch_size": 2})
        await engine.start()
        try:
            with pytest.raises(ValueError, match="non-empty"):
                engine.make_request("   ")
            with pytest.raises(RequestTooLongError, match="positions"):
                engine.make_request(QUESTIONS[0], SamplingParams(max_tokens=600))
            # 450 answer tokens: the child is still decoding when it is killed
            stream = engine.generate(QUESTIONS[0], SamplingParams(max_tokens=450, ignore_eos=True))
            await stream.__anext__()
            engine._process.kill()                      # the child dies mid-answer
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            assert not engine.is_healthy and not engine.accepting
            with pytest.raises(EngineDeadError):
                await collect(engine, QUESTIONS[1], SamplingParams(max_tokens=2), None)
        finally:
            await engine.shutdown()

    run(main())


def test_a_checkpoint_that_does_not_load_fails_the_start(tmp_path, gpt2_checkpoint):
    engine = ProcessEngine(gpt2_checkpoint, {"dtype": "float32", "device": "no-such-device"})
    with pytest.raises(EngineDeadError, match="did not start"):
        run(engine.start())


def test_engine_serve_with_the_engine_in_its_own_process(gpt2_checkpoint):
    from engine.sync_engine import Engine

    oracle = Engine.from_pretrained(gpt2_checkpoint)
    want = oracle.generate(QUESTIONS[2], SamplingParams(max_tokens=8), LatentPolicy(mode="fixed", thoughts=3))[0]
    with LiveServer(gpt2_checkpoint, "--max-batch-size", "4") as live:      # the default
        with httpx.Client(base_url=live.url, timeout=60) as http:
            body = {"question": QUESTIONS[2], "max_tokens": 8, "latent": {"mode": "fixed", "thoughts": 3}}
            r = http.post("/v1/reason", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["text"] == want.text and r.json()["usage"]["latent_thoughts"] == 3
            pieces = []
            with http.stream("POST", "/v1/reason", json={**body, "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        pieces.append(json.loads(line[6:]).get("delta") or "")
            assert "".join(pieces) == want.text
            assert http.post("/v1/reason", json={"question": ""}).status_code == 422
            assert http.get("/ready").status_code == 200
        assert "engine in its own process" in live.output()
    with LiveServer(gpt2_checkpoint, "--no-engine-process", "--max-batch-size", "4") as live:
        r = httpx.post(live.url + "/v1/reason", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["text"] == want.text
        assert "engine in its own process" not in live.output()


def test_the_engine_process_gets_its_threading_and_allocator_settings_unless_set(monkeypatch):
    """The child's OpenMP threads spin about 1 ms before sleeping and its freed blocks stay
    in the heap (``engine.process_engine._context``); values the user set are kept."""
    from engine import process_engine

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GLIBC_TUNABLES"):
        monkeypatch.setenv(name, "")          # records the original, restored after the test
        monkeypatch.delenv(name)
    process_engine._context()
    import os
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "100000"
    assert "glibc.malloc.mmap_threshold=33554432" in os.environ["GLIBC_TUNABLES"]
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    process_engine._context()
    assert os.environ["GOMP_SPINCOUNT"] == "0" and os.environ["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=0"


def test_the_engine_process_logs_as_the_server_does(capfd):
    """The child gets the parent's root level and formatter (the server's JSON lines), so
    the engine's start-up lines (KV cache, why the step is not compiled) reach its log."""
    import json
    import logging

    from engine.process_engine import _log_like_parent, _logging_of_this_process
    from server.access_log import JsonFormatter

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers[:] = [logging.StreamHandler()]
        root.handlers[0].setFormatter(JsonFormatter())
        root.setLevel(logging.INFO)
        setup = _logging_of_this_process()
        assert setup[0] == logging.INFO and isinstance(setup[1], JsonFormatter)
        root.handlers[:] = []
        root.setLevel(logging.WARNING)                     # a fresh child: nothing at INFO
        _log_like_parent(setup)
        logging.getLogger("engine.sync_engine").info("KV cache: %d slots", 4)
        line = capfd.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line) == {**json.loads(line), "level": "info", "logger": "engine.sync_engine",
                                    "message": "KV cache: 4 slots"}
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
