"""What the sync and async clients share: configuration, requests, parsing, retry decisions.

Contract:

- A client is configured once (base URL, API key, timeouts, retries, headers) and
  ``with_options(...)`` returns a copy with some settings changed that shares the
  connection pool (closing the copy does not close the pool).
- Every API method turns its arguments into a ``RequestOptions`` here
  (``_reason_options``, ...), the concrete client sends it with ``_send`` (the only
  transport-specific code: one retry loop calling ``httpx.Client.send`` or
  ``httpx.AsyncClient.send`` and ``sleep``), and the body is parsed here (``_parse``).
- Request bodies carry only the fields the caller gave (``None`` means "server
  default"), plus ``extra_body`` for fields this SDK does not know yet.
- Per-call ``timeout`` and ``max_retries`` override the client's for that call only.

Environment: ``COCONUT_BASE_URL`` and ``COCONUT_API_KEY`` are the defaults for
``base_url`` and ``api_key``.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, TypeVar, Union

import httpx
import pydantic

from ._errors import (APIConnectionError, APIResponseValidationError, APITimeoutError,
                      REQUEST_ID_HEADER, decode_body)
from ._retry import RetryPolicy
from ._types import Latent, LatentParam, Mixture, MixtureParam
from ._version import __version__

log = logging.getLogger("coconut_client")

M = TypeVar("M", bound=pydantic.BaseModel)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_RETRIES = 2
#: Generation can take long (read), but a server that is up accepts a connection fast.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)


class _NotGiven:
    """Marks an argument that was not passed (where ``None`` has its own meaning)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()

TimeoutParam = Union[float, httpx.Timeout, None]


def make_timeout(timeout: TimeoutParam, connect: Optional[float] = None,
                 read: Optional[float] = None) -> httpx.Timeout:
    """An ``httpx.Timeout`` from a number (all phases), a Timeout or ``None`` (no limit),
    with the connect and read limits optionally replaced."""
    base = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
    return httpx.Timeout(connect=base.connect if connect is None else connect,
                         read=base.read if read is None else read,
                         write=base.write, pool=base.pool)


@dataclass
class RequestOptions:
    """One API call, before it becomes an ``httpx.Request``."""

    method: str
    path: str
    json: Any = None
    headers: Dict[str, str] = field(default_factory=dict)
    timeout: Any = NOT_GIVEN
    max_retries: Optional[int] = None
    stream: bool = False


def _latent_body(latent: LatentParam) -> Dict[str, Any]:
    if isinstance(latent, Latent):
        return latent.model_dump(exclude_none=True)
    if isinstance(latent, Mapping):
        return dict(latent)
    raise TypeError(f"latent must be a Latent or a dict, not {type(latent).__name__}")


class BaseClient:
    _http: Any
    _owns_http: bool

    def __init__(self, *, base_url: Optional[str], api_key: Optional[str], timeout: TimeoutParam,
                 connect_timeout: Optional[float], read_timeout: Optional[float],
                 max_retries: int, retry_policy: Optional[RetryPolicy],
                 default_headers: Optional[Mapping[str, str]]):
        if base_url is None:
            base_url = os.environ.get("COCONUT_BASE_URL") or DEFAULT_BASE_URL
        if api_key is None:
            api_key = os.environ.get("COCONUT_API_KEY") or None
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.base_url = str(base_url).rstrip("/")
        self.api_key = api_key
        self.timeout = make_timeout(timeout, connect_timeout, read_timeout)
        self.max_retries = max_retries
        self.retry_policy = retry_policy or RetryPolicy()
        self.default_headers: Dict[str, str] = dict(default_headers or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, max_retries={self.max_retries})"

    # -- configuration -------------------------------------------------------------

    def with_options(self: Any, *, api_key: Any = NOT_GIVEN, timeout: Any = NOT_GIVEN,
                     connect_timeout: Optional[float] = None, read_timeout: Optional[float] = None,
                     max_retries: Optional[int] = None,
                     default_headers: Optional[Mapping[str, str]] = None) -> Any:
        """A copy of this client with some settings changed, sharing its connection pool."""
        other = copy.copy(self)
        other._owns_http = False
        if api_key is not NOT_GIVEN:
            other.api_key = api_key
        if timeout is not NOT_GIVEN or connect_timeout is not None or read_timeout is not None:
            other.timeout = make_timeout(self.timeout if timeout is NOT_GIVEN else timeout,
                                         connect_timeout, read_timeout)
        if max_retries is not None:
            if not isinstance(max_retries, int) or max_retries < 0:
                raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
            other.max_retries = max_retries
        if default_headers is not None:
            other.default_headers = {**self.default_headers, **default_headers}
        return other

    # -- requests --------------------------------------------------------------------

    def _headers(self, extra: Optional[Mapping[str, str]], stream: bool) -> Dict[str, str]:
        headers = {"Accept": "text/event-stream" if stream else "application/json",
                   "User-Agent": f"coconut-client/{__version__} (python; httpx)"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self.default_headers)
        if extra:
            headers.update(extra)
        return headers

    def _build_request(self, opts: RequestOptions) -> httpx.Request:
        timeout = self.timeout if opts.timeout is NOT_GIVEN else make_timeout(opts.timeout)
        return self._http.build_request(
            opts.method, self.base_url + opts.path, json=opts.json,
            headers=self._headers(opts.headers, opts.stream), timeout=timeout)

    def _max_retries(self, opts: RequestOptions) -> int:
        return self.max_retries if opts.max_retries is None else opts.max_retries

    def _next_delay(self, opts: RequestOptions, attempt: int, *,
                    response: Optional[httpx.Response] = None,
                    error: Optional[BaseException] = None) -> Optional[float]:
        """Seconds before the next attempt, or ``None`` when this failure is final."""
        delay = self.retry_policy.next_delay(attempt, self._max_retries(opts),
                                             response=response, error=error)
        if delay is not None:
            what = f"HTTP {response.status_code}" if response is not None else repr(error)
            log.info("%s %s failed (%s); retry %d of %d in %.2fs", opts.method, opts.path, what,
                     attempt + 1, self._max_retries(opts), delay)
        return delay

    @staticmethod
    def _connection_error(exc: Exception, request: httpx.Request) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"Request timed out: {exc}", request)
        return APIConnectionError(f"Connection error: {exc}", request)

    def _reason_options(self, question: str, *, stream: bool, max_tokens: Optional[int],
                        temperature: Optional[float], top_p: Optional[float], top_k: Optional[int],
                        seed: Optional[int], stop: Union[str, Sequence[str], None],
                        ignore_eos: Optional[bool], latent: Optional[LatentParam],
                        return_latent_trace: Optional[bool], latent_trace_top_k: Optional[int],
                        model: Optional[str], extra_body: Optional[Mapping[str, Any]],
                        extra_headers: Optional[Mapping[str, str]], timeout: Any,
                        max_retries: Optional[int], n: Optional[int] = None,
                        mixture: Optional[MixtureParam] = None) -> RequestOptions:
        body: Dict[str, Any] = {"question": question}
        optional = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                    "top_k": top_k, "seed": seed, "ignore_eos": ignore_eos,
                    "return_latent_trace": return_latent_trace,
                    "latent_trace_top_k": latent_trace_top_k, "model": model, "n": n}
        body.update({k: v for k, v in optional.items() if v is not None})
        if stop is not None:
            body["stop"] = stop if isinstance(stop, str) else list(stop)
        if latent is not None:
            body["latent"] = _latent_body(latent)
        if mixture is not None:
            body["mixture"] = mixture.model_dump(exclude_none=True) if isinstance(mixture, Mixture) else dict(mixture)
        if stream:
            body["stream"] = True
        if extra_body:
            body.update(extra_body)
        return RequestOptions("POST", "/v1/reason", json=body, headers=dict(extra_headers or {}),
                              timeout=timeout, max_retries=max_retries, stream=stream)

    @staticmethod
    def _get_options(path: str, extra_headers: Optional[Mapping[str, str]], timeout: Any,
                     max_retries: Optional[int]) -> RequestOptions:
        return RequestOptions("GET", path, headers=dict(extra_headers or {}), timeout=timeout,
                              max_retries=max_retries)

    # -- responses -------------------------------------------------------------------

    @staticmethod
    def _parse(response: httpx.Response, model: Type[M]) -> M:
        """The (read) success response's JSON body as ``model``."""
        body = decode_body(response)
        if not isinstance(body, dict):
            raise APIResponseValidationError(
                f"expected a JSON object from {response.request.url.path}, got {str(body)[:200]!r}",
                response=response, body=body)
        try:
            result = model.model_validate(body)
        except pydantic.ValidationError as exc:
            raise APIResponseValidationError(
                f"unexpected response from {response.request.url.path}: {exc}",
                response=response, body=body) from exc
        if hasattr(result, "_request_id"):
            result._request_id = response.headers.get(REQUEST_ID_HEADER)  # type: ignore[attr-defined]
        return result

    @staticmethod
    def _model_list(response: httpx.Response) -> List[Any]:
        from ._types import ModelList
        return BaseClient._parse(response, ModelList).data
