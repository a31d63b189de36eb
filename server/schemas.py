"""Request and response bodies of ``POST /v1/reason`` (validated by pydantic).

The field names are the public contract (issue 4). Ranges and defaults come from the
constants of ``engine.params`` (the one place they are written), which the engine's
``SamplingParams`` / ``LatentPolicy`` check too, so that the OpenAPI schema documents
them and a bad value answers 422 naming the field; the engine's own validation still
runs and its ``ValueError`` also answers 422.

A streamed reply (``stream: true``) is a sequence of ``ReasonStreamEvent`` (one per new
piece of answer text; the last one carries ``finish_reason``, ``usage``, ``timings``,
``answer`` and ``latent_trace`` when asked), then ``data: [DONE]``. With ``n`` > 1 every
event names its answer (``index``), each answer ends with its own last event, and one more
event carries the ``majority`` before ``[DONE]``; the OpenAPI schema
declares it (``sse_response``). Booleans are strict: ``"stream": 0`` or ``"true"`` is a 422,
not a silent false or true; and so are numbers: ``"seed": false``, ``"max_tokens": 2.0`` or
``"temperature": "0.5"`` is a 422 (``StrictInt``, ``StrictFloat``), not a silent 0, 2 or 0.5.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from engine.params import (DEFAULT_DIRICHLET_ALPHA, DEFAULT_GUMBEL_TAU, DEFAULT_MAX_TOKENS, DEFAULT_MOI_BETA,
                           DEFAULT_MOI_TOP_K, DEFAULT_SOFT_TEMPERATURE, DEFAULT_SOFT_TOP_K, DEFAULT_SOFT_TOP_P,
                           DEFAULT_TRACE_TOP_K, MAX_DIRICHLET_ALPHA, MAX_ENTROPY_THRESHOLD, MAX_GUMBEL_TAU,
                           MAX_MOI_BETA, MAX_MOI_TOP_K, MAX_PATIENCE, MAX_SOFT_TEMPERATURE,
                           MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_THOUGHTS_CEILING, MAX_THRESHOLD, MAX_TOP_P,
                           MAX_TRACE_TOP_K, MIN_DIRICHLET_ALPHA, MIN_ENTROPY_THRESHOLD, MIN_GUMBEL_TAU,
                           MIN_MAX_THOUGHTS, MIN_MAX_TOKENS, MIN_MOI_BETA, MIN_MOI_TOP_K,
                           MIN_SOFT_TEMPERATURE, MIN_STOP_LENGTH, MIN_TEMPERATURE, MIN_THOUGHTS, MIN_THRESHOLD,
                           MIN_TOP_K, MIN_TOP_P, MIN_TRACE_TOP_K, MAX_SAMPLES, SEED_LIMIT, FeedbackType,
                           LatentMode)

StopString = Annotated[str, Field(min_length=MIN_STOP_LENGTH)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


class NoiseOptions(BaseModel):
    """Randomness in a soft thought's weights p (``engine.noise``); unset: the server's
    default (``--feedback-noise``), if any."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["gumbel", "dirichlet", "none"] = Field(
        description="gumbel: softmax((log p_i + g_i) / tau), g_i ~ Gumbel(0, 1) (Gumbel-Softmax); dirichlet: "
                    "a draw of Dirichlet(alpha * p) (Soft Thinking's code); none: no noise, over a server default")
    tau: StrictFloat | None = Field(None, gt=MIN_GUMBEL_TAU, le=MAX_GUMBEL_TAU,
                                    description=f"(gumbel) temperature, default {DEFAULT_GUMBEL_TAU:g}")
    alpha: StrictFloat | None = Field(None, gt=MIN_DIRICHLET_ALPHA, le=MAX_DIRICHLET_ALPHA,
                                      description=f"(dirichlet) concentration scale: larger is less noise; "
                                                  f"default {DEFAULT_DIRICHLET_ALPHA:g}")


class MixtureOptions(BaseModel):
    """Mixture of Inputs: each sampled answer token y is fed back as Hn * sum_i w_i E[i] +
    (1 - Hn) * E[y] over the top_k tokens of its distribution (p renormalised over them),
    w = (p + beta [i = y]) / (1 + beta), Hn = H(p) / log top_k (``engine.moi``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["moi", "none"] = Field("moi", description="moi: Mixture of Inputs; none: plain token "
                                                           "inputs, over a server default (--mixture)")
    beta: StrictFloat | None = Field(None, ge=MIN_MOI_BETA, le=MAX_MOI_BETA,
                                     description=f"(moi) the sampled token's extra weight, default {DEFAULT_MOI_BETA:g}")
    top_k: StrictInt | None = Field(None, ge=MIN_MOI_TOP_K, le=MAX_MOI_TOP_K,
                                    description=f"(moi) tokens of the distribution mixed, default {DEFAULT_MOI_TOP_K}")


class FeedbackOptions(BaseModel):
    """What a continuous thought feeds back; unset: the checkpoint's operator."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: FeedbackType = Field(description="hidden: the last hidden state (COCONUT); soft_embedding: "
                               "sum_i p_i E[i] with p = softmax(W h / temperature) kept to top_k, then "
                               "top_p, renormalised (Soft Thinking); projection: the checkpoint's learned "
                               "prj(h) (CODI), only where it has one")
    temperature: StrictFloat | None = Field(None, gt=MIN_SOFT_TEMPERATURE, le=MAX_SOFT_TEMPERATURE,
                                      description=f"(soft_embedding) default {DEFAULT_SOFT_TEMPERATURE:g}")
    top_k: StrictInt | None = Field(None, ge=0, description=f"(soft_embedding) tokens mixed, 0 = all; "
                                                            f"default {DEFAULT_SOFT_TOP_K}")
    top_p: StrictFloat | None = Field(None, gt=MIN_TOP_P, le=MAX_TOP_P,
                                      description=f"(soft_embedding) default {DEFAULT_SOFT_TOP_P:g}")
    noise: NoiseOptions | None = Field(None, description="(soft_embedding) random weights: the answers of n > 1 "
                                       "then fork at their first thought (answer i draws with seed + i)")


class LatentOptions(BaseModel):
    """How many continuous thoughts to spend and what they feed back; unset fields take the
    checkpoint's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: LatentMode | None = Field(
        None, description="fixed: exactly `thoughts`; auto: the stop classifier decides, up to "
        "`max_thoughts`; entropy: until softmax(W h)'s entropy is below `entropy_threshold` for "
        "`patience` thoughts in a row; token: until the argmax of W h is the end token; none: answer "
        "directly. Unset: `thoughts` implies fixed, `threshold` auto, `entropy_threshold` or "
        "`patience` entropy, else the checkpoint's mode")
    thoughts: StrictInt | None = Field(None, ge=MIN_THOUGHTS, le=MAX_THOUGHTS_CEILING,
                                       description="(fixed) thought count")
    max_thoughts: StrictInt | None = Field(None, ge=MIN_MAX_THOUGHTS, le=MAX_THOUGHTS_CEILING,
                                           description="(auto, entropy, token) the cap")
    threshold: StrictFloat | None = Field(None, ge=MIN_THRESHOLD, le=MAX_THRESHOLD,
                                    description="(auto) stop probability threshold")
    entropy_threshold: StrictFloat | None = Field(None, ge=MIN_ENTROPY_THRESHOLD, le=MAX_ENTROPY_THRESHOLD,
                                            description="(entropy) nats")
    patience: StrictInt | None = Field(None, ge=1, le=MAX_PATIENCE,
                                       description="(entropy) thoughts in a row below the threshold (1)")
    feedback: FeedbackOptions | None = None


class SamplingFields(BaseModel):
    """Sampling fields shared by /v1/reason and the OpenAI-compatible routes."""

    model_config = ConfigDict(allow_inf_nan=False)    # 1e400, NaN, Infinity: 422

    max_tokens: StrictInt | None = Field(None, ge=MIN_MAX_TOKENS,
                                   description=f"most answer tokens (default {DEFAULT_MAX_TOKENS})")
    temperature: StrictFloat | None = Field(None, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="0 = greedy")
    top_p: StrictFloat | None = Field(None, gt=MIN_TOP_P, le=MAX_TOP_P)
    top_k: StrictInt | None = Field(None, ge=MIN_TOP_K, description="0 = disabled")
    seed: StrictInt | None = Field(None, ge=0, lt=SEED_LIMIT, description="per-request generator seed "
                                   "(answer i of n samples with seed + i)")
    n: StrictInt = Field(1, ge=1, le=MAX_SAMPLES,
                         description="answers to the question (self-consistency): the prompt is prefilled "
                                     "once and the latent thoughts are computed once, the answers fork from "
                                     "them; at most the server's --max-batch-size")
    stop: StopString | StopList | None = Field(None, description="strings that end the answer")
    ignore_eos: StrictBool = Field(False, description="keep going past end-of-sequence")
    latent: LatentOptions | None = None
    mixture: MixtureOptions | None = Field(None, description="feed each sampled answer token back as a Mixture "
                                           "of Inputs; unset: the server's default (--mixture), if any")
    return_latent_trace: StrictBool = Field(False, description="return each thought's top tokens")
    latent_trace_top_k: StrictInt = Field(DEFAULT_TRACE_TOP_K, ge=MIN_TRACE_TOP_K, le=MAX_TRACE_TOP_K,
                                    description="tokens per thought in latent_trace")


class ReasonRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={
        "examples": [{"question": "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a "
                      "zumpus?", "max_tokens": 32, "latent": {"mode": "fixed", "thoughts": 4}}]})

    question: str = Field(min_length=1, description="the question to reason about")
    model: str | None = Field(None, description="ignored unless given: must name the served model")
    stream: StrictBool = Field(False, description="reply with server-sent events")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens taken from the prefix cache instead of computed")


class Usage(BaseModel):
    prompt_tokens: int
    latent_thoughts: int
    completion_tokens: int
    prompt_tokens_details: PromptTokensDetails


class Timings(BaseModel):
    """Seconds spent in each phase of the request."""

    queue: float
    prefill: float
    latent: float
    decode: float


class TraceToken(BaseModel):
    id: int
    text: str
    prob: float


class FrontierNode(BaseModel):
    concept: str = Field(description="a node of the question's graph (a person or a concept)")
    hops: int | None = Field(None, description="breadth-first hops from the asked name; absent: unreachable")
    prob: float = Field(description="the thought's probability on this node's token")


class Frontier(BaseModel):
    """For a graph question: the thought's mass on the nodes within `hops` hops of the asked name."""

    hops: int = Field(description="the frontier's radius: thought k covers the nodes within k hops")
    frontier_mass: float = Field(description="total probability on the frontier's nodes")
    next_mass: float = Field(description="total probability on the nodes exactly one hop past it")
    rest_mass: float = Field(description="everything else (other tokens, unreachable nodes)")
    nodes: list[FrontierNode] = Field(description="every node of the graph, in order of first mention")


class ThoughtFeed(BaseModel):
    """What the thought fed back: the operator, and for a soft embedding its mixture."""

    type: FeedbackType
    tokens: list[TraceToken] | None = Field(None, description="(soft_embedding) the tokens mixed, with "
                                            "their weights as prob")


class LatentThought(BaseModel):
    """One continuous thought projected onto the vocabulary: its top-k tokens, the entropy
    of softmax(W h), what was fed, and for a graph question read by a compact model, how
    its mass spreads over the graph."""

    thought: int = Field(description="1-based index of the thought")
    tokens: list[TraceToken]
    entropy: float | None = Field(None, description="nats of softmax(W h) over the vocabulary")
    feed: ThoughtFeed | None = None
    frontier: Frontier | None = None


FinishReason = Literal["stop", "length", "abort", "error"]


class Majority(BaseModel):
    """Self-consistency's vote over the n answers."""

    answer: str = Field(description="the most frequent non-empty answer (a tie: the lowest index's); "
                                    "empty only when no answer has one")
    count: int = Field(description="how many answers gave it")
    of: int = Field(description="n, the answers counted")


class Sample(BaseModel):
    """One of the n answers."""

    index: int
    text: str
    answer: str
    finish_reason: FinishReason | None
    completion_tokens: int


class ReasonResponse(BaseModel):
    id: str
    model: str
    text: str = Field(description="the generated language (with n > 1: answer 0's)")
    answer: str = Field(description="the text after the answer prefix, stripped (with n > 1: answer 0's)")
    finish_reason: FinishReason | None
    usage: Usage = Field(description="prompt tokens and thoughts once, completion tokens of every answer")
    timings: Timings
    latent_trace: list[LatentThought] | None = None
    samples: list[Sample] | None = Field(None, description="with n > 1: every answer, in index order")
    majority: Majority | None = Field(None, description="with n > 1: the most frequent answer")


class ReasonStreamEvent(BaseModel):
    """One server-sent event of a streamed /v1/reason reply (``data: {...}``)."""

    id: str
    model: str
    index: int = Field(0, description="which of the n answers this event belongs to")
    delta: str = Field(description="new answer text")
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    answer: str | None = None
    latent_trace: list[LatentThought] | None = None
    majority: Majority | None = Field(None, description="with n > 1, the last event (delta empty): the vote")


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int
    request_id: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
    detail: list[dict] | None = Field(None, description="field errors (422)")


ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "bad request (e.g. the question is too long)"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "`model` names a model this server does not serve"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    422: {"model": ErrorResponse, "description": "invalid fields"},
    500: {"model": ErrorResponse, "description": "the engine failed this request"},
    503: {"model": ErrorResponse, "description": "overloaded (retry after Retry-After) or not ready"},
}


# ---------------------------------------------------------------- server-sent events

_REF = "#/components/schemas/"


def sse_event_schema(event_model: str) -> dict[str, Any]:
    """The schema of one server-sent event of a stream whose events carry ``event_model``.

    Each event is one ``data:`` line holding a JSON object (an ``event_model``, or an
    ``ErrorResponse`` when the stream fails after it started, which then ends without
    ``[DONE]``); the last event of a complete stream is ``data: [DONE]``. As OpenAPI 3.1
    has no keyword for the items of a stream, the media type's ``schema`` describes one
    event in the shape of the server-sent events specification (the ``itemSchema`` shape
    of OpenAPI 3.2, which is how schemathesis reads a 3.1 event stream): an object whose
    ``data`` string holds JSON (``contentMediaType``) of that ``contentSchema``.
    """
    payload = {"anyOf": [{"$ref": _REF + event_model}, {"$ref": _REF + "ErrorResponse"}]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"anyOf": [
                {"const": "[DONE]", "description": "the end of a complete stream"},
                {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
            ]},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }


def sse_response(event_model: str, description: str) -> dict[int, dict]:
    """The ``responses=`` entry of a route that answers JSON, or with ``stream: true``
    server-sent events of ``event_model`` (a model listed in ``STREAM_EVENT_MODELS`` of
    ``server.app``, which puts it in the document's components)."""
    return {200: {"description": description,
                  "content": {"text/event-stream": {"schema": sse_event_schema(event_model)}}}}


def add_component_schemas(openapi: dict, models: list[type[BaseModel]]) -> dict:
    """Add ``models`` (and the models they use) to ``openapi``'s components, keeping the
    schemas FastAPI generated for the same names."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema([(m, "serialization") for m in models], ref_template=_REF + "{model}")
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in top.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    return openapi
