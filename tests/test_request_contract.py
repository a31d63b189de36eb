"""The SDK (``coconut_client``) and the server agree on the request contract.

Read from the server's own OpenAPI document (``server.app.create_app``; no model is
loaded, the lifespan does not run) and the SDK's pydantic types:

- every field an SDK response type declares exists in the server schema it parses
  (``ReasonResult`` - ``ReasonResponse``, ``StreamEvent`` - ``ReasonStreamEvent``,
  ``Usage``, ``Timings``, ``LatentThought``, ``TraceToken``, ``Model`` - ``ModelCard``,
  ``ModelList``, ``Sample``, ``Majority``), and accepts every value the server's schema allows there;
- a field the SDK requires is one the server always sends (required, never null);
- every request field the SDK can send (each argument of ``reason`` / ``stream``, and
  each ``Latent`` field) is a field of ``ReasonRequest`` / ``LatentOptions`` whose schema
  accepts the SDK's type, and a body with all of them set validates.

And the server's limits and defaults are those of ``engine.params`` (one source).
"""

from __future__ import annotations

import inspect

import pytest
from pydantic.json_schema import models_json_schema

from coconut_client import _types as sdk
from coconut_client._base import BaseClient
from coconut_client import AsyncCoconutClient, CoconutClient

SDK_TO_SERVER = {
    "ReasonResult": "ReasonResponse",
    "StreamEvent": "ReasonStreamEvent",
    "Usage": "Usage",
    "Timings": "Timings",
    "LatentThought": "LatentThought",
    "TraceToken": "TraceToken",
    "Model": "ModelCard",
    "ModelList": "ModelList",
    "Sample": "Sample",
    "Majority": "Majority",
    "PromptTokensDetails": "PromptTokensDetails",
}
#: Request models: the SDK's ``Latent`` is sent as the request's ``latent`` object.
SDK_REQUEST_TO_SERVER = {"Latent": "LatentOptions", "Mixture": "MixtureOptions"}

#: A valid value for every request argument of the SDK's ``reason`` / ``stream``.
REQUEST_VALUES = {
    "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 7, "stop": ["\n\n"],
    "ignore_eos": True, "latent": sdk.Latent(mode="auto", max_thoughts=4, threshold=0.6),
    "return_latent_trace": True, "latent_trace_top_k": 3, "model": "coconut", "n": 3,
    "mixture": sdk.Mixture(beta=0.5, top_k=8),
}
#: Arguments of ``_reason_options`` that are not request fields.
TRANSPORT_ARGS = {"self", "question", "stream", "extra_body", "extra_headers", "timeout", "max_retries"}

_REF = "#/components/schemas/"


@pytest.fixture(scope="module")
def openapi() -> dict:
    from server.app import create_app
    from server.settings import ServerSettings

    return create_app(ServerSettings()).openapi()


@pytest.fixture(scope="module")
def server_schemas(openapi) -> dict:
    return openapi["components"]["schemas"]


@pytest.fixture(scope="module")
def sdk_schemas() -> dict:
    models = [getattr(sdk, name) for name in [*SDK_TO_SERVER, *SDK_REQUEST_TO_SERVER]]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=_REF + "{model}")
    return top["$defs"]


# ---------------------------------------------------------------- schema comparison


def _alternatives(node: dict) -> list[dict]:
    """The alternatives of a schema node (anyOf / oneOf flattened; a type list split)."""
    for key in ("anyOf", "oneOf"):
        if key in node:
            return [alt for sub in node[key] for alt in _alternatives(sub)]
    if isinstance(node.get("type"), list):
        return [{**node, "type": t} for t in node["type"]]
    if "type" not in node and "const" in node:
        return [{**node, "type": _json_type(node["const"])}]
    if "type" not in node and "enum" in node:
        return [{"type": _json_type(v), "enum": [v]} for v in node["enum"]]
    return [node]


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value), "object")


def _ref(node: dict) -> str | None:
    ref = node.get("$ref")
    return ref[len(_REF):] if ref else None


def _accepts(receiver: dict, value: dict, pairs: dict[str, str]) -> bool:
    """Whether schema alternative ``receiver`` accepts everything alternative ``value``
    allows. ``pairs`` maps the receiver's model names to the value's."""
    if receiver == {} or receiver.get("type") is None and _ref(receiver) is None and not receiver.get("anyOf"):
        return True                                    # Any
    if _ref(receiver) is not None or _ref(value) is not None:
        return _ref(value) is not None and pairs.get(_ref(receiver)) == _ref(value)
    kind, other = receiver["type"], value.get("type")
    if kind == "number" and other == "integer":
        return True
    if kind != other:
        return False
    if "enum" in receiver or "const" in receiver:
        allowed = set(receiver.get("enum", [receiver.get("const")]))
        sent = value.get("enum", [value["const"]] if "const" in value else None)
        return sent is not None and set(sent) <= allowed
    if kind == "array":
        return _compatible(receiver.get("items", {}), value.get("items", {}), pairs)
    return True


def _compatible(receiver: dict, value: dict, pairs: dict[str, str]) -> bool:
    """Every alternative of ``value`` is accepted by some alternative of ``receiver``."""
    return all(any(_accepts(r, v, pairs) for r in _alternatives(receiver)) for v in _alternatives(value))


def _nullable(node: dict) -> bool:
    return any(alt.get("type") == "null" for alt in _alternatives(node))


def _response_problems(sdk_name: str, sdk_schemas: dict, server_schemas: dict) -> list[str]:
    server_name = SDK_TO_SERVER[sdk_name]
    mine, theirs = sdk_schemas[sdk_name], server_schemas[server_name]
    problems = []
    for field, node in mine.get("properties", {}).items():
        where = f"SDK {sdk_name}.{field} (server {server_name})"
        if field not in theirs.get("properties", {}):
            problems.append(f"{where}: the server's schema has no such field")
            continue
        sent = theirs["properties"][field]
        if not _compatible(node, sent, SDK_TO_SERVER):
            problems.append(f"{where}: SDK type {node} does not accept the server's {sent}")
        if field in mine.get("required", []) and (field not in theirs.get("required", []) or _nullable(sent)):
            problems.append(f"{where}: required by the SDK, but the server may omit it")
    return problems


# ---------------------------------------------------------------- responses


@pytest.mark.parametrize("sdk_name", sorted(SDK_TO_SERVER))
def test_sdk_response_fields_exist_on_the_server(sdk_name, sdk_schemas, server_schemas):
    assert _response_problems(sdk_name, sdk_schemas, server_schemas) == []


def test_the_comparison_catches_a_field_the_server_never_sends(sdk_schemas, server_schemas):
    """``timings.total`` (declared by the SDK, never sent by the server) is caught."""
    schemas = {**sdk_schemas, "Timings": {**sdk_schemas["Timings"], "properties": {
        **sdk_schemas["Timings"]["properties"], "total": {"anyOf": [{"type": "number"}, {"type": "null"}]}}}}
    assert any("Timings.total" in p for p in _response_problems("Timings", schemas, server_schemas))


def test_the_comparison_catches_an_incompatible_type(server_schemas):
    schemas = {"Usage": {"properties": {"prompt_tokens": {"type": "string"}}, "required": []}}
    assert _response_problems("Usage", schemas, server_schemas)


def test_every_server_response_model_the_sdk_parses_is_in_the_document(server_schemas):
    assert set(SDK_TO_SERVER.values()) <= set(server_schemas)


# ---------------------------------------------------------------- requests


def _request_args() -> set[str]:
    return set(inspect.signature(BaseClient._reason_options).parameters) - TRANSPORT_ARGS


def test_every_reason_argument_is_a_request_field():
    """The public methods take exactly the request fields ``_reason_options`` sends."""
    args = _request_args()
    assert args == set(REQUEST_VALUES), "add a valid value for a new request field to REQUEST_VALUES"
    for method in (CoconutClient.reason, CoconutClient.stream, AsyncCoconutClient.reason,
                   AsyncCoconutClient.stream):
        params = set(inspect.signature(method).parameters) - TRANSPORT_ARGS - {"extra_headers"}
        assert params == args, method.__qualname__


def _body(stream: bool) -> dict:
    client = BaseClient.__new__(BaseClient)
    opts = client._reason_options("Is Tom a yumpus?", stream=stream, extra_body=None, extra_headers=None,
                                  timeout=None, max_retries=None, **REQUEST_VALUES)
    return opts.json


@pytest.mark.parametrize("stream", [False, True])
def test_every_request_field_the_sdk_sends_is_accepted(stream, server_schemas):
    from server.schemas import ReasonRequest

    body = _body(stream)
    assert set(body) == {"question", *REQUEST_VALUES, *(["stream"] if stream else [])}
    assert set(body) <= set(server_schemas["ReasonRequest"]["properties"])
    request = ReasonRequest.model_validate(body)     # extra="forbid": an unknown field fails
    assert request.latent is not None and request.latent.mode == "auto"


def test_request_argument_types_are_accepted_by_the_server(server_schemas):
    """What each argument's annotation allows, the server's field accepts."""
    from pydantic import TypeAdapter

    hints = inspect.signature(CoconutClient.reason).parameters
    request = server_schemas["ReasonRequest"]["properties"]
    for name in REQUEST_VALUES:
        if name in ("latent", "mixture"):   # a model or a dict: the models are checked below
            continue
        annotation = hints[name].annotation
        schema = TypeAdapter(eval(annotation, vars(sdk) | {"Sequence": list}) if isinstance(annotation, str)
                             else annotation).json_schema()
        if name in ("ignore_eos", "return_latent_trace"):   # None is not sent: the server default
            schema = {"type": "boolean"}
        nonnull = {"anyOf": [a for a in _alternatives(schema) if a.get("type") != "null"]}
        assert _compatible(request[name], nonnull, {}), f"{name}: {schema} vs the server's {request[name]}"


@pytest.mark.parametrize("model", sorted(SDK_REQUEST_TO_SERVER))
def test_sdk_latent_fields_are_latent_options(sdk_schemas, server_schemas, model):
    mine, theirs = sdk_schemas[model]["properties"], server_schemas[SDK_REQUEST_TO_SERVER[model]]["properties"]
    assert set(mine) <= set(theirs)
    for field, node in mine.items():
        assert _compatible(theirs[field], node, {}), f"{model}.{field}: {node} vs the server's {theirs[field]}"


# ---------------------------------------------------------------- one source for limits


def test_server_bounds_come_from_engine_params(server_schemas):
    from engine import params as P

    request = server_schemas["ReasonRequest"]["properties"]
    latent = server_schemas["LatentOptions"]["properties"]

    def bound(node, key):
        return next(a[key] for a in _alternatives(node) if key in a)

    assert bound(request["max_tokens"], "minimum") == P.MIN_MAX_TOKENS
    assert str(P.DEFAULT_MAX_TOKENS) in request["max_tokens"]["description"]
    assert bound(request["temperature"], "maximum") == P.MAX_TEMPERATURE
    assert bound(request["top_p"], "exclusiveMinimum") == P.MIN_TOP_P
    assert bound(request["seed"], "exclusiveMaximum") == P.SEED_LIMIT
    assert request["latent_trace_top_k"]["default"] == P.DEFAULT_TRACE_TOP_K
    assert request["latent_trace_top_k"]["maximum"] == P.MAX_TRACE_TOP_K
    assert bound(latent["thoughts"], "maximum") == P.MAX_THOUGHTS_CEILING
    assert bound(latent["max_thoughts"], "minimum") == P.MIN_MAX_THOUGHTS
    stop_list = next(a for a in _alternatives(request["stop"]) if a.get("type") == "array")
    assert stop_list["maxItems"] == P.MAX_STOP_STRINGS


def test_engine_defaults_are_the_documented_ones():
    from engine import params as P
    from server.routes import openai
    from server.service import DEFAULT_MAX_TOKENS

    assert P.SamplingParams() == P.SamplingParams(max_tokens=64, temperature=0.0, top_p=1.0, top_k=0)
    assert DEFAULT_MAX_TOKENS == P.DEFAULT_MAX_TOKENS == 64
    assert openai.OPENAI_DEFAULT_TEMPERATURE == 1.0 and openai.COMPLETIONS_DEFAULT_MAX_TOKENS == 16


# ---------------------------------------------------------------- latent defaults: the engine's


@pytest.mark.parametrize("latent, expected", [
    (None, None),
    ({}, None),
    ({"thoughts": 3}, "fixed"),
    ({"max_thoughts": 4}, "auto"),
    ({"threshold": 0.6}, "auto"),
    ({"mode": "none"}, "none"),
])
def test_service_passes_latent_options_through(latent, expected):
    """The service does not pick a mode: an unset one stays ``None`` (LatentPolicy infers it
    from the fields given, else ``CoconutConfig.resolve`` takes the checkpoint's)."""
    from engine.checkpoint import CoconutConfig, StopClassifierSpec
    from server.schemas import ReasonRequest
    from server.service import GenerationService

    service = GenerationService.__new__(GenerationService)
    body = {"question": "q", "return_latent_trace": True, **({"latent": latent} if latent is not None else {})}
    policy = service.params("q", ReasonRequest.model_validate(body)).latent
    assert policy is not None and policy.mode == expected and policy.trace_top_k == 5
    for config in (CoconutConfig(), CoconutConfig(method="cot"),
                   CoconutConfig(stop_classifier=StopClassifierSpec(path="s.safetensors", max_thoughts=9))):
        if expected == "auto" and config.stop_classifier is None:
            continue
        resolved = config.resolve(policy)
        assert resolved.mode == (expected or config.default_mode)
        assert resolved.trace_top_k == (0 if resolved.mode == "none" else 5)
        if resolved.mode == "fixed":
            assert resolved.thoughts == (3 if latent == {"thoughts": 3} else config.num_thoughts)
