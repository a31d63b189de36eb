"""A server that heals itself when its engine process dies (``engine serve``'s default).

The engine child is killed with SIGKILL under load, as an out-of-memory kill would:

- every request in it ends at once with a 500 whose ``type`` is ``engine_dead_error``
  (streams with their in-band error event), none hangs;
- while the new child loads, ``/ready`` is 503 ``restarting`` (``/health`` stays 200) and
  new requests get 503 with ``Retry-After``;
- then the same server answers greedy requests exactly as before the kill, and as the naive
  reference decoder does; ``coconut_engine_restarts_total`` is 1 and the log names the signal;
- across three restarts nothing leaks: no stream or prompt entry, no queued request, no
  batch slot (a full batch runs afterwards), no file descriptor, no thread;
- a child that keeps dying makes ``engine serve`` exit 4 (``--max-engine-restarts``);
- the restart policy's backoff and its window, and the exit-status wording, on their own.

The backoff is cut to 0.1-0.2 s here (``--engine-restart-backoff-s``) so that each test takes
seconds; the children come from a fork server that has imported torch, so a restart costs
the tiny model's load.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from engine.async_engine import EngineCrashedError, EngineDeadError
from engine.params import LatentPolicy, SamplingParams
from engine.process_engine import ProcessEngine, RestartPolicy, describe_exit
from tests.engine_helpers import QUESTIONS, reference
from tests.live_server import LiveServer
from tests.test_server_harness import InProcessServer, read_metrics, sse_payloads, wait_for

LONG = {"max_tokens": 1500, "ignore_eos": True}     # seconds of decoding: in flight when killed
GREEDY = [{"question": q, "max_tokens": 8, "latent": {"mode": "fixed", "thoughts": 2}} for q in QUESTIONS[:3]]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2", max_positions=2048)


@pytest.fixture(scope="module")
def oracle(checkpoint):
    """GREEDY's answers (text, completion tokens) from an in-process engine whose token ids
    are checked against the naive reference decoder's (the independent oracle)."""
    from engine.sync_engine import Engine

    engine = Engine.from_pretrained(checkpoint)
    out = []
    for body in GREEDY:
        got = engine.generate(body["question"], SamplingParams(max_tokens=8), LatentPolicy(mode="fixed", thoughts=2))[0]
        assert got.token_ids == reference(engine, body["question"], 2, 8).token_ids
        out.append((got.text, len(got.token_ids)))
    return out


def _answers(url: str) -> list[dict]:
    out = []
    for body in GREEDY:
        r = httpx.post(url + "/v1/reason", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def _child_pid(output: str) -> int:
    """The current engine child, from the server's log ('engine process started (pid N)')."""
    pids = re.findall(r"engine process (?:started|restarted) \(pid (\d+)\)", output)
    assert pids, output[-2000:]
    return int(pids[-1])


def _in_flight(url: str, n_plain: int, n_stream: int, results: list) -> list[threading.Thread]:
    """Start requests that decode for seconds; each thread appends (kind, status, payload)."""
    body = {"question": QUESTIONS[0], **LONG}

    def plain():
        r = httpx.post(url + "/v1/reason", json=body, timeout=60)
        results.append(("plain", r.status_code, r.json()))

    def stream():
        with httpx.stream("POST", url + "/v1/reason", json={**body, "stream": True}, timeout=60) as s:
            text = s.read().decode()   # 500 before the first event (still waiting), else SSE
            results.append(("stream", s.status_code, sse_payloads(text) if s.status_code == 200 else json.loads(text)))

    threads = [threading.Thread(target=plain) for _ in range(n_plain)] + \
              [threading.Thread(target=stream) for _ in range(n_stream)]
    for t in threads:
        t.start()
    return threads


def _check_failed(results: list, n: int) -> None:
    assert len(results) == n, results
    for kind, status, payload in results:
        if kind == "stream" and status == 200:     # the error after the stream started: in-band
            assert "[DONE]" not in payload, payload[-2:]
            error = payload[-1]["error"]
        else:
            assert status == 500, (kind, status, payload)
            error = payload["error"]
        assert error["type"] == "engine_dead_error", error
        assert "SIGKILL" in error["message"] and "restarts it" in error["message"], error


def test_a_killed_engine_process_is_replaced_and_answers_as_before(checkpoint, oracle):
    # float32 as the oracle: --dtype auto takes bfloat16 on a CPU with AVX-512 BF16
    args = ("--max-batch-size", "4", "--torch-threads", "1", "--engine-restart-backoff-s", "0.2",
            "--retry-after-s", "2", "--dtype", "float32")
    with LiveServer(checkpoint, *args) as live:
        before = _answers(live.url)
        assert [(a["text"], a["usage"]["completion_tokens"]) for a in before] == oracle

        # under load: 4 running (2 streamed) and 2 waiting for a slot
        results: list = []
        threads = _in_flight(live.url, 3, 3, results)
        wait_for(lambda: (m := read_metrics(live.url))["coconut_num_requests_running"] == 4
                 and m["coconut_num_requests_waiting"] == 2, what="4 running and 2 waiting")
        pid = _child_pid(live.output())
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "an in-flight request hangs"
        failed_after = time.monotonic() - killed
        _check_failed(results, 6)

        # while the new child loads: /ready says so, /health stays up, requests get 503
        seen_restarting = False
        while True:
            ready = httpx.get(live.url + "/ready", timeout=10)
            if ready.status_code == 200:
                break
            assert ready.status_code == 503 and ready.json()["status"] == "restarting", ready.text
            assert "SIGKILL" in ready.json()["detail"]
            if not seen_restarting:
                seen_restarting = True
                assert httpx.get(live.url + "/health", timeout=10).status_code == 200
                refused = httpx.post(live.url + "/v1/reason", json=GREEDY[0], timeout=10)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "2", refused.text
                assert refused.json()["error"]["type"] == "unavailable_error"
                assert "restarting" in refused.json()["error"]["message"]
            assert time.monotonic() - killed < 60, "not serving again within 60 s"
            time.sleep(0.02)
        assert seen_restarting, "/ready never reported the restart"
        after = _answers(live.url)
        healed = time.monotonic() - killed
        assert [(a["text"], a["answer"], a["usage"]) for a in after] == \
            [(b["text"], b["answer"], b["usage"]) for b in before]
        assert [(a["text"], a["usage"]["completion_tokens"]) for a in after] == oracle

        metrics = read_metrics(live.url)
        assert metrics["coconut_engine_restarts_total"] == 1
        assert metrics['coconut_requests_finished_total{reason="error"}'] == 6
        assert metrics["coconut_num_requests_running"] == 0 and metrics["coconut_num_requests_waiting"] == 0
        log = live.output()
        assert re.search(r"engine process failed: the engine process exited \(signal 9 \(SIGKILL\)\); "
                         r"6 requests in flight failed; restarting it in 0.2 s", log), log[-3000:]
        assert _child_pid(log) != pid
        print(f"in-flight requests failed {failed_after:.2f} s after the kill; first answer {healed:.2f} s after it")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _kill_and_heal(server: InProcessServer, http: httpx.Client) -> None:
    engine = server.async_engine
    results: list = []
    threads = _in_flight(server.url, 1, 1, results)
    wait_for(lambda: engine.num_running == 2, what="2 running")
    os.kill(engine.pid, signal.SIGKILL)
    for t in threads:
        t.join(30)
    _check_failed(results, 2)
    wait_for(lambda: http.get("/ready").status_code == 200, timeout=60, what="serving again")


def test_three_restarts_leak_no_slot_queue_entry_or_descriptor(checkpoint, oracle):
    with InProcessServer(checkpoint, max_batch_size=2, torch_threads=1, engine_restart_backoff_s=0.1) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        engine = server.async_engine
        _kill_and_heal(server, http)        # the fork server and the first reader are up now
        assert http.post("/v1/reason", json=GREEDY[0]).status_code == 200

        def settled():
            return engine.num_running == 0 and engine.num_waiting == 0 and not engine._streams

        wait_for(settled, what="an idle engine")
        fds, threads = _fds(), threading.active_count()
        for _ in range(3):
            _kill_and_heal(server, http)
        assert engine.restarts == 4 and read_metrics(server.url)["coconut_engine_restarts_total"] == 4
        wait_for(settled, what="an idle engine")
        assert not engine._prompts, "prompt entries of failed requests remain"
        # every slot of the new child is free: a full batch (2) runs at once, token-exact
        results: list = []
        full = _in_flight(server.url, 2, 0, results)
        wait_for(lambda: engine.num_running == 2, what="a full batch")
        for t in full:
            t.join(60)
        assert [r[1] for r in results] == [200, 200] and all(r[2]["usage"]["completion_tokens"] == 1500
                                                            for r in results)
        got = [http.post("/v1/reason", json=b).json() for b in GREEDY]
        assert [(g["text"], g["usage"]["completion_tokens"]) for g in got] == oracle
        wait_for(settled, what="an idle engine")
        # the dead children's pipes, sentinels and reader threads are gone
        wait_for(lambda: _fds() <= fds, timeout=10, what=f"the descriptors to return to {fds} (now {_fds()})")
        wait_for(lambda: threading.active_count() <= threads, timeout=10, what="the reader threads to end")


def test_an_engine_that_keeps_dying_makes_the_server_exit_non_zero(checkpoint):
    args = ("--torch-threads", "1", "--engine-restart-backoff-s", "0.1", "--max-engine-restarts", "2",
            "--engine-restart-window-s", "600")
    with LiveServer(checkpoint, *args) as live:
        for n in range(3):
            wait_for(lambda: httpx.get(live.url + "/ready", timeout=10).status_code == 200, timeout=60,
                     what="serving")
            if n == 0:
                assert httpx.post(live.url + "/v1/reason", json=GREEDY[0], timeout=60).status_code == 200
            os.kill(_child_pid(live.output()), signal.SIGKILL)
            if n < 2:   # let the restart begin before the next kill
                wait_for(lambda: f"(restart {n + 1} of at most 2 within 600 s)" in live.output(), timeout=30, what="the failure")
                wait_for(lambda: len(re.findall(r"engine process restarted", live.output())) == n + 1,
                         timeout=60, what=f"restart {n + 1}")
        assert live.proc.wait(60) == 4, live.output()[-3000:]
        log = live.output()
        assert "giving up after 3 failures within 600 s (--max-engine-restarts 2)" in log, log[-3000:]
        assert "the engine process kept failing" in log


def test_without_a_restart_policy_a_dead_child_stays_dead():
    """``ProcessEngine`` alone (no policy) keeps its old contract; the policy's arithmetic."""
    policy = RestartPolicy(max_restarts=5, window_s=600, backoff_s=1.0)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 2, 4, 8, 16]
    assert RestartPolicy(backoff_s=10, max_backoff_s=60).delay(4) == 60
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)
    assert describe_exit(-9) == "signal 9 (SIGKILL)" and describe_exit(3) == "exit code 3"
    assert issubclass(EngineCrashedError, EngineDeadError)


def test_a_replacement_that_fails_to_load_counts_as_a_failure(gpt2_checkpoint, tmp_path):
    """The checkpoint disappears after the first start: every restart fails to load, and the
    policy gives up after max_restarts of them (on_give_up called once, with the reason)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, ckpt)
    gave_up: list[str] = []
    restarts: list[str] = []

    async def main():
        engine = ProcessEngine(ckpt, {"max_batch_size": 2}, restart=RestartPolicy(max_restarts=2, backoff_s=0.05),
                               on_restart=restarts.append, on_give_up=gave_up.append)
        await engine.start()
        try:
            stream = engine.generate(QUESTIONS[0], SamplingParams(max_tokens=400, ignore_eos=True),
                                     LatentPolicy(mode="fixed", thoughts=1))
            await stream.__anext__()
            (ckpt / "model.safetensors").unlink()
            os.kill(engine.pid, signal.SIGKILL)
            with pytest.raises(EngineCrashedError, match="SIGKILL"):
                async for _ in stream:
                    pass
            assert engine.restarting and not engine.accepting
            with pytest.raises(EngineDeadError, match="not accepting"):
                await stream_one(engine)
            for _ in range(600):
                if gave_up:
                    break
                await asyncio.sleep(0.05)
            assert not engine.restarting and not engine.is_healthy and engine.gave_up
            assert "did not start" in engine.unavailable_reason
        finally:
            await engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert len(restarts) == 2 and len(gave_up) == 1, (restarts, gave_up)
    assert "did not start" in gave_up[0]


async def stream_one(engine):
    return [out async for out in engine.generate(QUESTIONS[1], SamplingParams(max_tokens=2))]
