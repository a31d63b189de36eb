"""The OpenAPI document says what the server does (what ``schemathesis --checks all``
checks), on a real server (uvicorn in a thread) with a tiny random GPT-2:

- a 404 (unknown ``model``) is declared on /v1/reason, /v1/completions and
  /v1/chat/completions, and the answer conforms;
- the ``stream: true`` reply is declared as ``text/event-stream`` whose events carry
  the route's event object (``ReasonStreamEvent``, ``CompletionChunk``,
  ``ChatCompletionChunk``); schemathesis' own response checks validate real streams
  against it, and each event's JSON is validated against the component schema;
- booleans of the request bodies are strict: ``"stream": 0`` is a 422 naming the
  field, not a silent false;
- the API key check takes the ``Bearer`` scheme in any case (RFC 9110 section 11.1).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.test_server_harness import InProcessServer, read_metrics, sse_payloads, wait_for, one_thread_server

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
ROUTES = {
    "/v1/reason": ({"question": QUESTION}, "ReasonStreamEvent", "ReasonResponse"),
    "/v1/completions": ({"prompt": QUESTION}, "CompletionChunk", "CompletionResponse"),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": QUESTION}]}, "ChatCompletionChunk",
                             "ChatResponse"),
}
BOOLEAN_FIELDS = {
    "/v1/reason": ["stream", "ignore_eos", "return_latent_trace"],
    "/v1/completions": ["stream", "ignore_eos", "return_latent_trace", "echo"],
    "/v1/chat/completions": ["stream", "ignore_eos", "return_latent_trace", "logprobs"],
}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="module")
def server(checkpoint):
    with one_thread_server(checkpoint, max_batch_size=8) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def doc(http):
    r = http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def _responses(doc, route):
    return doc["paths"][route]["post"]["responses"]


def _validator(doc, name):
    """A JSON-schema validator of one component, its references resolved in the document."""
    import jsonschema_rs
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


# ---------------------------------------------------------------- declarations


@pytest.mark.parametrize("route", list(ROUTES))
def test_404_is_declared_with_the_error_body(doc, route):
    declared = _responses(doc, route)["404"]
    assert declared["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "model" in declared["description"]


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_stream_is_declared_as_events_of_the_route_object(doc, route):
    _, event, reply = ROUTES[route]
    content = _responses(doc, route)["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{reply}"}
    schema = content["text/event-stream"]["schema"]
    assert schema != {"type": "string"}
    assert schema["type"] == "object" and schema["required"] == ["data"]
    done, payload = schema["properties"]["data"]["anyOf"]
    assert done == {"const": "[DONE]", "description": "the end of a complete stream"}
    assert payload["contentMediaType"] == "application/json"
    assert payload["contentSchema"] == {"anyOf": [{"$ref": f"#/components/schemas/{event}"},
                                                  {"$ref": "#/components/schemas/ErrorResponse"}]}
    assert event in doc["components"]["schemas"]


def test_the_reason_event_schema_is_reason_stream_event(doc):
    from server.schemas import ReasonStreamEvent

    schema = doc["components"]["schemas"]["ReasonStreamEvent"]
    assert set(schema["properties"]) == set(ReasonStreamEvent.model_fields)
    assert set(schema["required"]) == {"id", "model", "delta"}
    for name in ("Usage", "Timings", "LatentThought"):
        assert name in doc["components"]["schemas"]


def test_request_booleans_are_declared_boolean(doc):
    schemas = doc["components"]["schemas"]
    for model, fields in (("ReasonRequest", BOOLEAN_FIELDS["/v1/reason"]),
                          ("CompletionRequest", BOOLEAN_FIELDS["/v1/completions"]),
                          ("ChatRequest", BOOLEAN_FIELDS["/v1/chat/completions"])):
        for field in fields:
            prop = schemas[model]["properties"][field]
            types = [prop.get("type")] + [p.get("type") for p in prop.get("anyOf", [])]
            assert "boolean" in types, (model, field, prop)


# ---------------------------------------------------------------- behaviour conforms


def _events(response: httpx.Response) -> list[dict]:
    """The response's server-sent events as the SSE specification reads them."""
    events = []
    for block in response.text.split("\n\n"):
        data = [line[len("data: "):] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append({"data": "\n".join(data), "event": "message"})
    return events


@pytest.mark.parametrize("route", list(ROUTES))
def test_real_streams_conform_to_the_declared_events(http, doc, route):
    import jsonschema_rs

    body, event, _ = ROUTES[route]
    r = http.post(route, json={**body, "max_tokens": 6, "stream": True, "return_latent_trace": True,
                               "latent": {"thoughts": 2}} | ({"stream_options": {"include_usage": True}}
                                                             if route != "/v1/reason" else {}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert events[-1]["data"] == "[DONE]" and len(events) >= 3
    declared = _responses(doc, route)["200"]["content"]["text/event-stream"]["schema"]
    wrapper = jsonschema_rs.validator_for({**declared, "components": doc["components"]})
    payload = _validator(doc, event)
    for e in events:
        assert wrapper.is_valid(e), e
    for e in events[:-1]:
        assert payload.is_valid(json.loads(e["data"])), e["data"]


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("variant", ["json", "stream", "unknown model"])
def test_schemathesis_response_checks_pass(server, route, variant):
    """schemathesis' own checks (status code declared, content type declared, body and
    every event conform) on the three kinds of answer."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    body = dict(ROUTES[route][0], max_tokens=4)
    if variant == "stream":
        body["stream"] = True
    if variant == "unknown model":
        body["model"] = "no-such-model"
    case = schema[route]["POST"].Case(body=body, media_type="application/json")
    response = case.call()
    assert response.status_code == (404 if variant == "unknown model" else 200), response.text
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance, not_a_server_error])


@pytest.mark.parametrize("route", list(ROUTES))
def test_unknown_model_is_404_with_the_declared_body(http, doc, route):
    r = http.post(route, json={**ROUTES[route][0], "model": "no-such-model"})
    assert r.status_code == 404
    assert _validator(doc, "ErrorResponse").is_valid(r.json())
    assert r.json()["error"]["type"] == "not_found_error" and r.json()["error"]["param"] == "model"


# ---------------------------------------------------------------- strict booleans


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("value", [0, 1, "true", "false", "", 0.0, [], {}])
def test_non_boolean_values_of_boolean_fields_are_422(http, route, value):
    for field in BOOLEAN_FIELDS[route]:
        r = http.post(route, json={**ROUTES[route][0], "max_tokens": 2, field: value})
        assert r.status_code == 422, (field, value, r.text)
        assert r.json()["error"]["param"] == field, (field, r.json())


@pytest.mark.parametrize("route", list(ROUTES))
def test_stream_zero_is_not_false(http, route):
    r = http.post(route, json={**ROUTES[route][0], "stream": 0})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stream"
    assert "valid boolean" in r.json()["error"]["message"]


def test_stream_options_include_usage_is_strict(http):
    r = http.post("/v1/completions", json={"prompt": QUESTION, "stream": True, "stream_options": {"include_usage": 1}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stream_options.include_usage"


@pytest.mark.parametrize("route", list(ROUTES))
def test_real_booleans_still_work(http, route):
    body = {**ROUTES[route][0], "max_tokens": 3, "ignore_eos": True, "return_latent_trace": False, "stream": False}
    r = http.post(route, json=body)
    assert r.status_code == 200, r.text
    streamed = http.post(route, json={**body, "stream": True})
    assert streamed.status_code == 200 and sse_payloads(streamed.text)[-1] == "[DONE]"


def test_echo_true_is_refused_and_false_accepted(http):
    assert http.post("/v1/completions", json={"prompt": QUESTION, "max_tokens": 2, "echo": False}).status_code == 200
    r = http.post("/v1/completions", json={"prompt": QUESTION, "echo": True})
    assert r.status_code == 422 and "echo" in r.json()["error"]["message"]


# ---------------------------------------------------------------- auth scheme


def test_the_bearer_scheme_is_case_insensitive(checkpoint):
    with InProcessServer(checkpoint, api_key="s3cret") as keyed, \
            httpx.Client(base_url=keyed.url, timeout=60) as client:
        body = {"question": QUESTION, "max_tokens": 2}
        for header in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR s3cret", "bearer  s3cret"):
            r = client.post("/v1/reason", json=body, headers={"Authorization": header})
            assert r.status_code == 200, (header, r.text)
        for header in ("bearer S3CRET", "bearer wrong", "bearer", "Basic s3cret", "s3cret",
                       "bearers3cret", "token s3cret"):
            r = client.post("/v1/reason", json=body, headers={"Authorization": header})
            assert r.status_code == 401, header
            assert r.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
        metrics = wait_for(lambda: (lambda m: m if m["coconut_num_requests_running"] == 0 else None)(
            read_metrics(keyed.url)), what="idle")
        assert metrics["coconut_num_requests_waiting"] == 0
