"""Schemathesis over the app's own OpenAPI schema, against the real app under uvicorn on
127.0.0.1: generated requests (valid and invalid) must never get a 5xx answer, and the
server must stay ready with nothing left running afterwards.

The model's sequence limit is kept small (``max_seq_len=64``) so that generated
``max_tokens`` values either run a short generation or are refused with 400; the
example count per operation is modest to keep the suite fast.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the 'test' extra")

from hypothesis import HealthCheck, given, settings  # noqa: E402  (installed with schemathesis)
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.test_server_harness import InProcessServer, read_metrics, wait_for  # noqa: E402

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def api(tiny_checkpoint):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with InProcessServer(tiny_checkpoint("gpt2"), max_seq_len=64, max_batch_size=8) as server:
            yield server
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def api_schema(api):
    return schemathesis.openapi.from_url(api.url + "/openapi.json")


def _operations(schema):
    for result in schema.get_all_operations():
        yield result.ok()  # raises on an operation the schema does not describe correctly


# schemathesis' pytest plugin (``@schema.parametrize``) does not run under pytest 9
# (it reads a removed ``Function._nodeid``), so the cases are drawn with hypothesis here.
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_generated_request_gets_a_5xx(api_schema, mode):
    from schemathesis import GenerationMode

    tried = []
    for operation in _operations(api_schema):
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # the GET routes take no input: nothing to make invalid

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(checks=[not_a_server_error])

        run()
        tried.append(operation.label)
    assert any("/v1/reason" in label for label in tried) and len(tried) >= 3, tried


def test_the_server_is_still_ready_and_idle_afterwards(api):
    import httpx

    assert httpx.get(api.url + "/ready").status_code == 200
    metrics = wait_for(lambda: (lambda m: m if m["coconut_num_requests_running"] == 0
                                and m["coconut_num_requests_waiting"] == 0 else None)(read_metrics(api.url)),
                       what="idle gauges")
    requests = {k: v for k, v in metrics.items() if k.startswith("coconut_http_requests_total")}
    assert sum(requests.values()) > EXAMPLES_PER_OPERATION, "schemathesis sent fewer requests than expected"
    assert not [k for k in requests if 'status="5' in k], requests
    assert requests.get('coconut_http_requests_total{method="POST",route="/v1/reason",status="200"}'), requests
