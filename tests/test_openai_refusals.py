"""Clear refusals (issue 25, item 4), on the real app under uvicorn with a tiny random GPT-2:

- every OpenAI request field the server does not honour (``tools``, ``response_format``
  other than text, ``logit_bias``, penalties other than 0, ``n`` above 1, ...) is a 422
  whose ``param`` is the field and whose message says it is not supported; the ``openai``
  package raises ``UnprocessableEntityError`` with that message;
- the value of such a field that asks for nothing (null, ``tools: []``,
  ``tool_choice: "none"``, ``response_format: {"type": "text"}``, penalties of 0, ...) is
  accepted, and the answer is the one without the field (greedy, so the same request
  without it is the oracle);
- numbers are strict in every request body: a boolean (or a string, or 2.0 for an integer)
  where a number is expected is a 422 naming the field (``"seed": false`` is not seed 0).
"""

from __future__ import annotations

import httpx
import pytest

from tests.test_server_harness import one_thread_server

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
MESSAGES = [{"role": "user", "content": QUESTION}]
CHAT, COMPLETIONS, REASON = "/v1/chat/completions", "/v1/completions", "/v1/reason"
BASES = {CHAT: {"messages": MESSAGES}, COMPLETIONS: {"prompt": QUESTION}, REASON: {"question": QUESTION}}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}

# (route, field, a value asking for something the server does not do)
REFUSED = [
    (CHAT, "tools", [TOOL]),
    (CHAT, "tool_choice", "auto"),
    (CHAT, "tool_choice", {"type": "function", "function": {"name": "lookup"}}),
    (CHAT, "functions", [TOOL["function"]]),
    (CHAT, "function_call", "auto"),
    (CHAT, "parallel_tool_calls", True),
    (CHAT, "parallel_tool_calls", False),
    (CHAT, "response_format", {"type": "json_object"}),
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}),
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    (CHAT, "modalities", ["text", "audio"]),
    (CHAT, "prediction", {"type": "content", "content": "Tom"}),
    (CHAT, "web_search_options", {}),
    (CHAT, "reasoning_effort", "high"),
    (CHAT, "verbosity", "low"),
    (CHAT, "store", True),
    (CHAT, "logit_bias", {"50256": -100}),
    (CHAT, "presence_penalty", 0.5),
    (CHAT, "frequency_penalty", -1),
    (COMPLETIONS, "logit_bias", {"50256": 100}),
    (COMPLETIONS, "presence_penalty", 1.0),
    (COMPLETIONS, "frequency_penalty", 2),
    (COMPLETIONS, "best_of", 2),
    (COMPLETIONS, "echo", True),
    (COMPLETIONS, "suffix", " and so on"),
]

# (route, field, a value that asks for nothing: accepted, the answer unchanged)
NEUTRAL = [
    (CHAT, "tools", []), (CHAT, "tools", None), (CHAT, "tool_choice", "none"), (CHAT, "functions", []),
    (CHAT, "function_call", "none"), (CHAT, "parallel_tool_calls", None),
    (CHAT, "response_format", {"type": "text"}), (CHAT, "modalities", ["text"]), (CHAT, "store", False),
    (CHAT, "logit_bias", {}), (CHAT, "logit_bias", None), (CHAT, "presence_penalty", 0),
    (CHAT, "frequency_penalty", 0.0), (CHAT, "n", 1),
    (COMPLETIONS, "logit_bias", {}), (COMPLETIONS, "presence_penalty", 0.0), (COMPLETIONS, "n", 1),
    (COMPLETIONS, "best_of", 1), (COMPLETIONS, "echo", False), (COMPLETIONS, "suffix", None),
    (COMPLETIONS, "suffix", ""),
]

# every integer field of each body (dotted: nested), with a valid value
INTEGERS = {
    REASON: {"max_tokens": 3, "top_k": 5, "seed": 1, "latent_trace_top_k": 2, "latent.thoughts": 1,
             "latent.max_thoughts": 2, "latent.patience": 1, "latent.feedback.top_k": 3},
    COMPLETIONS: {"max_tokens": 3, "top_k": 5, "seed": 1, "latent_trace_top_k": 2, "n": 1, "best_of": 1,
                  "logprobs": 1, "latent.thoughts": 1},
    CHAT: {"max_tokens": 3, "max_completion_tokens": 3, "top_k": 5, "seed": 1, "latent_trace_top_k": 2, "n": 1,
           "top_logprobs": 1, "latent.thoughts": 1},
}
# every number field, with a valid value
NUMBERS = {
    REASON: {"temperature": 0.0, "top_p": 0.9, "latent.threshold": 0.5, "latent.entropy_threshold": 0.1,
             "latent.feedback.temperature": 1.0, "latent.feedback.top_p": 0.9},
    COMPLETIONS: {"temperature": 0.0, "top_p": 0.9, "presence_penalty": 0.0, "frequency_penalty": 0.0},
    CHAT: {"temperature": 0.0, "top_p": 0.9, "presence_penalty": 0.0, "frequency_penalty": 0.0},
}
# fields that need a companion to be valid at all
COMPANIONS = {"top_logprobs": {"logprobs": True}, "latent.max_thoughts": {"latent.mode": "entropy"},
              "latent.patience": {"latent.mode": "entropy"}, "latent.threshold": {"latent.mode": "auto"},
              "latent.entropy_threshold": {"latent.mode": "entropy"},
              "latent.feedback.top_k": {"latent.feedback.type": "soft_embedding"},
              "latent.feedback.temperature": {"latent.feedback.type": "soft_embedding"},
              "latent.feedback.top_p": {"latent.feedback.type": "soft_embedding"},
              "latent_trace_top_k": {"return_latent_trace": True}}


def _body(route: str, fields: dict) -> dict:
    """The route's minimal body with ``fields`` (dotted names nest) set."""
    body = {**BASES[route], "max_tokens": 3, "temperature": 0}
    for name, value in fields.items():
        *parents, leaf = name.split(".")
        at = body
        for p in parents:
            at = at.setdefault(p, {})
        at[leaf] = value
    return body


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="module")
def server(checkpoint):
    with one_thread_server(checkpoint, max_batch_size=8, torch_threads=1) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.mark.parametrize("route, field, value", REFUSED, ids=lambda v: str(v)[:24])
def test_an_unsupported_field_is_a_422_naming_it(http, route, field, value):
    r = http.post(route, json=_body(route, {field: value}))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error", error
    assert f"{field} is not supported by this server" in error["message"], error
    assert [d["type"] for d in r.json()["detail"]] == ["not_supported"]


@pytest.mark.parametrize("field, value", [("tool_calls", [{"id": "c1", "type": "function", "function":
                                                            {"name": "lookup", "arguments": "{}"}}]),
                                           ("function_call", {"name": "lookup", "arguments": "{}"})])
def test_a_message_calling_a_tool_is_refused(http, field, value):
    messages = [{"role": "assistant", "content": None, field: value}, *MESSAGES]
    r = http.post(CHAT, json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == f"messages.0.{field}"
    assert f"{field} is not supported" in r.json()["error"]["message"]


@pytest.mark.parametrize("route, field, value", NEUTRAL, ids=lambda v: str(v)[:24])
def test_a_value_asking_for_nothing_is_accepted_and_changes_nothing(http, route, field, value):
    plain = http.post(route, json=_body(route, {}))
    with_it = http.post(route, json=_body(route, {field: value}))
    assert plain.status_code == with_it.status_code == 200, with_it.text
    text = (lambda r: r.json()["choices"][0]["message"]["content"] if route == CHAT
            else r.json()["choices"][0]["text"])
    assert text(with_it) == text(plain)


@pytest.mark.parametrize("route", list(INTEGERS))
def test_integer_fields_take_no_booleans_strings_or_floats(http, route):
    for field, good in INTEGERS[route].items():
        companion = COMPANIONS.get(field, {})
        r = http.post(route, json=_body(route, {**companion, field: good}))
        assert r.status_code == 200, (field, r.text)       # the field works with a real integer
        for bad in (True, False, str(good), float(good)):
            r = http.post(route, json=_body(route, {**companion, field: bad}))
            assert r.status_code == 422, (field, bad, r.text)
            assert r.json()["error"]["param"] == field, (field, bad, r.json()["error"])
            assert "valid integer" in r.json()["error"]["message"], (field, bad, r.json()["error"])


@pytest.mark.parametrize("route", list(NUMBERS))
def test_number_fields_take_no_booleans_or_strings(http, route):
    for field, good in NUMBERS[route].items():
        companion = COMPANIONS.get(field, {})
        r = http.post(route, json=_body(route, {**companion, field: good}))
        if field == "latent.threshold":   # the auto mode: the tiny checkpoint has no stop classifier
            assert r.status_code == 422 and "stop classifier" in r.text, r.text
        else:
            assert r.status_code == 200, (field, r.text)
        for bad in (True, False, str(good)):
            r = http.post(route, json=_body(route, {**companion, field: bad}))
            assert r.status_code == 422, (field, bad, r.text)
            assert r.json()["error"]["param"] == field, (field, bad, r.json()["error"])
            assert "valid number" in r.json()["error"]["message"], (field, bad, r.json()["error"])


def test_seed_false_is_not_seed_0(http):
    """schemathesis found ``"seed": false`` accepted as a seed (issue 25)."""
    for route in BASES:
        r = http.post(route, json=_body(route, {"seed": False, "temperature": 1.0}))
        assert r.status_code == 422 and r.json()["error"]["param"] == "seed", r.text


def test_the_openai_package_reads_the_refusal(server, checkpoint):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.UnprocessableEntityError, match="tools is not supported by this server"):
            client.chat.completions.create(model=checkpoint.name, messages=MESSAGES, max_tokens=2, tools=[TOOL])
        with pytest.raises(openai.UnprocessableEntityError,
                           match="response_format is not supported by this server"):
            client.chat.completions.create(model=checkpoint.name, messages=MESSAGES, max_tokens=2,
                                           response_format={"type": "json_object"})
        with pytest.raises(openai.UnprocessableEntityError, match="best_of is not supported by this server"):
            client.completions.create(model=checkpoint.name, prompt=QUESTION, max_tokens=2, best_of=2)
        ok = client.chat.completions.create(model=checkpoint.name, messages=MESSAGES, max_tokens=2,
                                            temperature=0, response_format={"type": "text"}, tool_choice="none")
        assert ok.choices[0].finish_reason in ("length", "stop")


def test_the_schema_lists_the_refused_fields(http):
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    for route, field, _ in REFUSED:
        model = "ChatRequest" if route == CHAT else "CompletionRequest"
        assert field in schemas[model]["properties"], (model, field)
        assert "not supported" in schemas[model]["properties"][field]["description"] or \
            field == "best_of", (model, field)
