"""``engine serve --replicas 2`` on a local Ray cluster, for real: the bundled model in two
replicas behind Ray Serve's proxy (and again behind its HAProxy ingress), driven over HTTP
as a client would.

Covers: 64 concurrent requests all 200 with both replicas serving; the greedy SSE stream
equal to the single-process server's (byte for byte once the per-request id and the
timings are masked, the only fields that differ between any two runs); auth, 422, 413 and
one ``x-request-id``; 503 with ``Retry-After`` once every replica's queue is full;
``/metrics`` carrying both replicas' samples; a replica killed with SIGKILL replaced by
Ray; SIGTERM draining an in-flight stream before the process exits 0. Skipped, saying
so, where the Ray Serve extra is not installed (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time

import httpx
import pytest

from tests.live_server import LiveServer
from tests.test_server_harness import read_metrics, sse_payloads, wait_for

pytest.importorskip("ray.serve", reason='the Ray Serve extra is not installed (pip install -e ".[ray]")')

pytestmark = pytest.mark.timeout(1200)

KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = ("Carol is a nolpus. Davis is a scrompus. Every grulpus is a zhoolpus. Jack is a holpus. "
            "Every scrompus is a torpus. Every torpus is a vompus. Max is a gwelpus. Every nolpus is a "
            "grulpus. Is Davis a vompus or zhoolpus?")
# a queue of 64 per replica: the 64 concurrent requests fit in either replica alone, however
# the ingress spreads them (HAProxy sent more than 4 + 48 to one replica of the 256-wide model
# under load, and those were 503s)
ARGS = ("--max-batch-size", "4", "--max-queue", "64", "--torch-threads", "1", "--seed", "0")


def replica_of(response: httpx.Response) -> str:
    return response.headers["x-coconut-replica"]


def replicas_seen(url: str, tries: int = 24) -> set[str]:
    return {replica_of(httpx.get(url + "/ready", timeout=30)) for _ in range(tries)}


@pytest.fixture(scope="module", params=["proxy", "haproxy"])
def cluster(request):
    with LiveServer(None, "--replicas", "2", "--ray-ingress", request.param, "--api-key", KEY, *ARGS,
                    startup_timeout=900,
                    env={"RAY_DISABLE_USAGE_STATS": "1"}) as live:
        wait_for(lambda: len(replicas_seen(live.url)) == 2, timeout=300, interval=1.0,
                 what="both replicas answering")
        yield live


def test_64_concurrent_requests_all_succeed_on_both_replicas(cluster):
    async def main():
        async with httpx.AsyncClient(base_url=cluster.url, headers=AUTH, timeout=300,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post("/v1/reason", json={
                "question": QUESTION, "temperature": 0, "max_tokens": 8}) for _ in range(64)))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 64, [r.text for r in responses if r.status_code != 200]
    if cluster.args[cluster.args.index("--ray-ingress") + 1] == "proxy":
        # Ray's own router spreads a burst; HAProxy may send all 64 to one replica (each holds
        # 64), which the fixture's wait already saw both answering
        assert len({replica_of(r) for r in responses}) == 2
    assert {r.json()["answer"] for r in responses} == {"Davis is a vompus."}


def _masked_stream(url: str, headers: dict) -> str:
    r = httpx.post(url + "/v1/reason", headers=headers, timeout=120,
                   json={"question": QUESTION, "temperature": 0, "max_tokens": 8, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    body = re.sub(r'"id": "reason-[0-9a-f]+"', '"id": "ID"', r.text)
    body = re.sub(r'"cached_tokens": \d+', '"cached_tokens": 0', body)   # what earlier requests left in the slots
    return re.sub(r'"timings": \{[^}]*\}', '"timings": {}', body)


def test_greedy_stream_equals_the_single_process_servers(cluster):
    through_ray = _masked_stream(cluster.url, AUTH)
    with LiveServer(None, *ARGS) as single:
        alone = _masked_stream(single.url, {})
    assert through_ray == alone
    events = sse_payloads(through_ray)
    assert events[-1] == "[DONE]" and events[-2]["answer"] == "Davis is a vompus."


def test_errors_and_request_ids_are_the_single_servers(cluster):
    url = cluster.url
    assert httpx.post(url + "/v1/reason", json={"question": QUESTION}).status_code == 401
    bad = httpx.post(url + "/v1/reason", headers=AUTH, json={"question": QUESTION, "temperature": -1})
    assert bad.status_code == 422 and "temperature" in bad.text
    big = httpx.post(url + "/v1/reason", headers={**AUTH, "content-type": "application/json"},
                     content=b"x" * (2 << 20))
    assert big.status_code == 413
    long = httpx.post(url + "/v1/reason", headers=AUTH, json={"question": QUESTION, "max_tokens": 100000})
    assert long.status_code == 400 and "max_tokens" in long.text      # too long for the sequence limit
    ok = httpx.post(url + "/v1/chat/completions", headers={**AUTH, "x-request-id": "client-id-7"},
                    json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert ok.headers.get_list("x-request-id") == ["client-id-7"]
    assert ok.headers["x-coconut-replica"] in replicas_seen(url)


def test_503_with_retry_after_once_every_replica_is_full(cluster):
    # 2 replicas x (4 running + 64 waiting) = 136 places; 160 long requests at once
    async def main():
        async with httpx.AsyncClient(base_url=cluster.url, headers=AUTH, timeout=600,
                                     limits=httpx.Limits(max_connections=160)) as client:
            return await asyncio.gather(*(client.post("/v1/reason", json={
                "question": QUESTION, "max_tokens": 120, "ignore_eos": True, "temperature": 0})
                for _ in range(160)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    refused = [r for r in responses if r.status_code == 503]
    assert refused, "no request was refused although both queues were full"
    assert all(r.headers.get("retry-after") for r in refused)
    assert codes.count(200) >= 2 * 4      # every replica ran a full batch
    assert {replica_of(r) for r in responses if r.status_code == 200} == replicas_seen(cluster.url)


def test_metrics_carry_every_replica_with_a_label(cluster):
    def both_reported():
        metrics = read_metrics(cluster.url)
        labelled = {k for k in metrics if k.startswith("coconut_num_requests_running{")}
        return labelled if len(labelled) == 2 else None

    labelled = wait_for(both_reported, timeout=30, interval=0.5, what="both replicas in /metrics")
    assert {re.search(r'replica="([^"]+)"', k).group(1) for k in labelled} == replicas_seen(cluster.url)


def test_a_killed_replica_is_replaced_and_the_other_replicas_requests_are_untouched(cluster):
    before = replicas_seen(cluster.url)
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", "ServeReplica:coconut"], capture_output=True,
                                           text=True).stdout.split()]
    assert len(pids) == 2, pids

    async def one(client):
        try:
            return await client.post("/v1/reason", json={"question": QUESTION, "max_tokens": 200,
                                                         "ignore_eos": True, "temperature": 0})
        except httpx.HTTPError as e:      # the killed replica's requests may lose their connection
            return e

    async def load_then_kill():
        async with httpx.AsyncClient(base_url=cluster.url, headers=AUTH, timeout=300,
                                     limits=httpx.Limits(max_connections=16)) as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(16)]
            await asyncio.sleep(1.0)
            os.kill(pids[0], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(load_then_kill())

    def replaced():
        try:
            seen = replicas_seen(cluster.url, tries=12)
        except httpx.HTTPError:
            return None
        return seen if len(seen) == 2 and seen != before else None

    after = wait_for(replaced, timeout=300, interval=1.0, what="Ray to replace the killed replica")
    (survivor,) = after & before             # one survivor, one new replica
    responses = [r for r in results if isinstance(r, httpx.Response)]
    from_survivor = [r for r in responses if r.headers.get("x-coconut-replica") == survivor]
    assert from_survivor and all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200
                                 for r in from_survivor)
    # the killed replica's requests end with an error (Ray's 500, or a closed connection), never a
    # partial answer passed off as complete
    for r in results:
        if isinstance(r, httpx.Response) and r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 200
        elif isinstance(r, httpx.Response):
            assert r.status_code == 500
    r = httpx.post(cluster.url + "/v1/reason", headers=AUTH, json={"question": QUESTION, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200 and r.json()["answer"] == "Davis is a vompus."


def test_sigterm_drains_an_in_flight_stream_then_exits_0(cluster):
    events: list = []
    with httpx.stream("POST", cluster.url + "/v1/reason", headers=AUTH, timeout=300,
                      json={"question": QUESTION, "max_tokens": 200, "ignore_eos": True, "stream": True,
                            "temperature": 0}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                break
        cluster.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
    payloads = [e[len("data: "):] for e in events]
    assert payloads[-1] == "[DONE]"
    final = json.loads(payloads[-2])
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 200
    assert cluster.proc.wait(timeout=300) == 0, cluster.output()[-3000:]
    assert time.monotonic() - started < 300
