"""``CoconutClient``: the synchronous client (``httpx.Client`` underneath).

Contract: every method sends one API request through ``_send``, which retries as
``RetryPolicy`` says and raises the typed errors of ``_errors``; ``stream`` returns a
``Stream`` that sends its request when iterated or entered. The client owns the
``httpx.Client`` it creates (closed by ``close()`` or the ``with`` block); one passed in
as ``http_client`` stays the caller's to close. ``sleep`` is the function waited with
between attempts (inject a fake one in tests).
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import httpx

from ._base import (DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, NOT_GIVEN, BaseClient, RequestOptions,
                    TimeoutParam)
from ._errors import OverloadedError, status_error
from ._retry import RetryPolicy
from ._streaming import Stream
from ._types import Health, LatentParam, MixtureParam, Model, ReasonResult, StreamEvent


class CoconutClient(BaseClient):
    """Synchronous client of the COCONUT server.

    >>> with CoconutClient("http://127.0.0.1:8000") as c:          # doctest: +SKIP
    ...     r = c.reason("Is Tom a wumpus?", max_tokens=32, latent={"mode": "fixed", "thoughts": 6})
    ...     print(r.answer, r.usage.latent_thoughts)
    """

    _http: httpx.Client

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 timeout: TimeoutParam = DEFAULT_TIMEOUT, connect_timeout: Optional[float] = None,
                 read_timeout: Optional[float] = None, max_retries: int = DEFAULT_MAX_RETRIES,
                 retry_policy: Optional[RetryPolicy] = None,
                 default_headers: Optional[Mapping[str, str]] = None,
                 http_client: Optional[httpx.Client] = None,
                 sleep: Callable[[float], Any] = time.sleep):
        super().__init__(base_url=base_url, api_key=api_key, timeout=timeout,
                         connect_timeout=connect_timeout, read_timeout=read_timeout,
                         max_retries=max_retries, retry_policy=retry_policy,
                         default_headers=default_headers)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self.timeout)
        self._sleep = sleep

    # -- transport ---------------------------------------------------------------------

    def _send(self, opts: RequestOptions) -> httpx.Response:
        """Send with retries; a 2xx response (still open when ``opts.stream``) or raise."""
        request = self._build_request(opts)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=opts.stream)
                if not response.is_success:
                    try:
                        response.read()  # the error body, for the exception
                    finally:
                        response.close()
            except httpx.TransportError as exc:
                delay = self._next_delay(opts, attempt, error=exc)
                if delay is None:
                    raise self._connection_error(exc, request) from exc
            else:
                if response.is_success:
                    return response
                delay = self._next_delay(opts, attempt, response=response)
                if delay is None:
                    raise status_error(response)
            self._sleep(delay)
            attempt += 1

    # -- API ---------------------------------------------------------------------------

    def reason(self, question: str, *, max_tokens: Optional[int] = None,
               temperature: Optional[float] = None, top_p: Optional[float] = None,
               top_k: Optional[int] = None, seed: Optional[int] = None,
               stop: Union[str, Sequence[str], None] = None, ignore_eos: Optional[bool] = None,
               latent: Optional[LatentParam] = None, return_latent_trace: Optional[bool] = None,
               latent_trace_top_k: Optional[int] = None, model: Optional[str] = None,
               n: Optional[int] = None, mixture: Optional[MixtureParam] = None,
               extra_body: Optional[Mapping[str, Any]] = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               timeout: Any = NOT_GIVEN, max_retries: Optional[int] = None) -> ReasonResult:
        """Ask one question (``POST /v1/reason``) and wait for the whole answer."""
        opts = self._reason_options(
            question, stream=False, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos, latent=latent,
            return_latent_trace=return_latent_trace, latent_trace_top_k=latent_trace_top_k,
            model=model, n=n, mixture=mixture, extra_body=extra_body,
            extra_headers=extra_headers, timeout=timeout, max_retries=max_retries)
        return self._parse(self._send(opts), ReasonResult)

    def stream(self, question: str, *, max_tokens: Optional[int] = None,
               temperature: Optional[float] = None, top_p: Optional[float] = None,
               top_k: Optional[int] = None, seed: Optional[int] = None,
               stop: Union[str, Sequence[str], None] = None, ignore_eos: Optional[bool] = None,
               latent: Optional[LatentParam] = None, return_latent_trace: Optional[bool] = None,
               latent_trace_top_k: Optional[int] = None, model: Optional[str] = None,
               n: Optional[int] = None, mixture: Optional[MixtureParam] = None,
               extra_body: Optional[Mapping[str, Any]] = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               timeout: Any = NOT_GIVEN, max_retries: Optional[int] = None) -> Stream[StreamEvent]:
        """Ask one question with ``stream: true``; iterate the result for ``StreamEvent``s."""
        opts = self._reason_options(
            question, stream=True, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos, latent=latent,
            return_latent_trace=return_latent_trace, latent_trace_top_k=latent_trace_top_k,
            model=model, n=n, mixture=mixture, extra_body=extra_body,
            extra_headers=extra_headers, timeout=timeout, max_retries=max_retries)
        return Stream(lambda: self._send(opts), StreamEvent)

    def models(self, *, extra_headers: Optional[Mapping[str, str]] = None, timeout: Any = NOT_GIVEN,
               max_retries: Optional[int] = None) -> List[Model]:
        """The served models (``GET /v1/models``)."""
        return self._model_list(self._send(self._get_options("/v1/models", extra_headers, timeout,
                                                             max_retries)))

    def health(self, *, timeout: Any = NOT_GIVEN, max_retries: Optional[int] = None) -> Health:
        """Liveness (``GET /health``); raises if the server is down or unhealthy."""
        return self._parse(self._send(self._get_options("/health", None, timeout, max_retries)),
                           Health)

    def ready(self, *, timeout: Any = NOT_GIVEN) -> bool:
        """Readiness (``GET /ready``, one attempt): ``True`` on 200, ``False`` on 503.

        Other statuses and connection failures raise, so "not ready" and "not there"
        stay distinguishable.
        """
        try:
            self._send(self._get_options("/ready", None, timeout, 0))
        except OverloadedError:
            return False
        return True

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool if this client created it (idempotent)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "CoconutClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
