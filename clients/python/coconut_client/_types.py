"""Typed request options and response objects of the COCONUT server API.

Contract:

- Response models accept (and keep) fields this SDK does not know yet
  (``extra="allow"``), so a newer server never breaks an older client; unknown fields
  are reachable as attributes and in ``model_dump()``.
- Fields that a server may omit are ``Optional`` with a ``None`` default; the fields the
  API always sends (``text``, ``answer``, ``usage`` ...) are required, so a malformed
  body is reported as ``APIResponseValidationError`` rather than surfacing later.
- ``Latent`` is the typed form of the request's ``latent`` object; a plain dict is
  accepted wherever a ``Latent`` is, and is sent unchanged (the server validates it).
  The same holds for ``Mixture`` (the request's ``mixture``, Mixture of Inputs).

Annotations use ``Optional``/``List`` rather than ``X | None`` so that pydantic can
evaluate them on every Python version the package supports.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


class _Response(BaseModel):
    """Base of everything parsed from the server: lenient about new fields."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Latent(BaseModel):
    """How many continuous thoughts the model spends before answering.

    - ``mode="fixed"``: exactly ``thoughts`` thoughts (``None``: the checkpoint default);
    - ``mode="auto"``: the checkpoint's stop classifier ends thinking once its stop
      probability reaches ``threshold``, after at most ``max_thoughts`` thoughts;
    - ``mode="none"``: no latent phase at all.

    ``None`` fields are not sent, so the server applies the checkpoint's defaults.
    Extra keys are passed through for server options this SDK does not know yet.
    """

    model_config = ConfigDict(extra="allow")

    mode: Optional[Literal["fixed", "auto", "none"]] = None
    thoughts: Optional[int] = None
    max_thoughts: Optional[int] = None
    threshold: Optional[float] = None


LatentParam = Union[Latent, Dict[str, Any]]


class Mixture(BaseModel):
    """Mixture of Inputs (the request's ``mixture``): each sampled answer token ``y`` is fed
    back as ``Hn * sum_i w_i E[i] + (1 - Hn) * E[y]`` over the ``top_k`` most likely tokens,
    ``w = (p + beta [i = y]) / (1 + beta)``, ``Hn`` the normalised entropy. ``type="none"``
    turns a server's default mixture off. ``None`` fields are not sent (server defaults)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["moi", "none"] = "moi"
    beta: Optional[float] = None
    top_k: Optional[int] = None


MixtureParam = Union[Mixture, Dict[str, Any]]


class PromptTokensDetails(_Response):
    """``cached_tokens``: prompt tokens the server took from its prefix cache."""

    cached_tokens: int = 0


class Usage(_Response):
    """Token counts of ``POST /v1/reason`` (the server's ``Usage``: no ``total_tokens``)."""

    prompt_tokens: int
    completion_tokens: int
    latent_thoughts: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class Timings(_Response):
    """Seconds spent in each phase of the request on the server (the server's ``Timings``:
    ``queue``, ``prefill``, ``latent``, ``decode``; it sends no total)."""

    queue: Optional[float] = None
    prefill: Optional[float] = None
    latent: Optional[float] = None
    decode: Optional[float] = None


class TraceToken(_Response):
    """One of a thought's top tokens under ``softmax(W h)``."""

    id: int
    text: str
    prob: float


class LatentThought(_Response):
    """One continuous thought projected onto the vocabulary: its top-k tokens."""

    thought: int  # 1-based index of the thought
    tokens: List[TraceToken] = Field(default_factory=list)


class _WithRequestId(_Response):
    _request_id: Optional[str] = PrivateAttr(default=None)

    @property
    def request_id(self) -> Optional[str]:
        """The server's ``x-request-id`` for the HTTP exchange that produced this object."""
        return self._request_id


class Majority(_Response):
    """With ``n`` > 1: the most frequent non-empty answer, how many gave it, of how many."""

    answer: str
    count: int
    of: Optional[int] = None


class Sample(_Response):
    """One of the ``n`` answers of ``POST /v1/reason``."""

    index: int
    text: str
    answer: str
    finish_reason: Optional[str] = None
    completion_tokens: Optional[int] = None


class ReasonResult(_WithRequestId):
    """The answer to ``POST /v1/reason`` (non-streamed); with ``n`` > 1 also ``samples``
    (every answer) and ``majority`` (the vote over their answers)."""

    id: str
    model: Optional[str] = None
    text: str
    answer: str
    finish_reason: Optional[str] = None
    usage: Usage
    timings: Optional[Timings] = None
    latent_trace: Optional[List[LatentThought]] = None
    samples: Optional[List[Sample]] = None
    majority: Optional[Majority] = None


class StreamEvent(_Response):
    """One ``data:`` event of a streamed ``/v1/reason``.

    ``delta`` is the new text (possibly empty); the deltas of a stream concatenate to
    the non-streamed ``text``. The last event carries ``finish_reason``, ``usage``,
    ``timings``, ``answer`` and (when asked) ``latent_trace``; earlier ones have them
    ``None``. With ``n`` > 1 each event names its answer (``index``), each answer has its
    own last event, and a final one carries ``majority``.
    """

    delta: str = ""
    index: int = 0
    majority: Optional[Majority] = None
    id: Optional[str] = None
    model: Optional[str] = None
    finish_reason: Optional[str] = None
    answer: Optional[str] = None
    usage: Optional[Usage] = None
    timings: Optional[Timings] = None
    latent_trace: Optional[List[LatentThought]] = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


class Model(_Response):
    """One entry of ``GET /v1/models`` (OpenAI's model object)."""

    id: str
    object: str = "model"
    created: Optional[int] = None
    owned_by: Optional[str] = None


class ModelList(_Response):
    object: str = "list"
    data: List[Model]


class Health(_WithRequestId):
    """The body of ``GET /health``; ``status`` is whatever the server reports."""

    status: Optional[str] = None
