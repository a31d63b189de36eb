"""``AsyncCoconutClient``: the asynchronous client (``httpx.AsyncClient`` underneath).

Contract: the mirror of ``CoconutClient`` (same arguments, same results, same errors,
same retries: only the transport calls are awaited). ``stream`` is a plain method that
returns an ``AsyncStream``, so ``async for ev in client.stream(...)`` works directly; the
request is sent when iteration starts or ``async with`` is entered. The client owns the
``httpx.AsyncClient`` it creates (closed by ``await close()`` or ``async with``); one
passed in as ``http_client`` stays the caller's. ``sleep`` is an async function waited
with between attempts (inject a fake one in tests).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, List, Mapping, Optional, Sequence, Union

import httpx

from ._base import (DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, NOT_GIVEN, BaseClient, RequestOptions,
                    TimeoutParam)
from ._errors import OverloadedError, status_error
from ._retry import RetryPolicy
from ._streaming import AsyncStream
from ._types import Health, LatentParam, MixtureParam, Model, ReasonResult, StreamEvent


class AsyncCoconutClient(BaseClient):
    """Asynchronous client of the COCONUT server.

    >>> async with AsyncCoconutClient("http://127.0.0.1:8000") as c:   # doctest: +SKIP
    ...     r = await c.reason("Is Tom a wumpus?", max_tokens=32)
    ...     async for ev in c.stream("Is Tom a wumpus?", max_tokens=32):
    ...         print(ev.delta, end="")
    """

    _http: httpx.AsyncClient

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 timeout: TimeoutParam = DEFAULT_TIMEOUT, connect_timeout: Optional[float] = None,
                 read_timeout: Optional[float] = None, max_retries: int = DEFAULT_MAX_RETRIES,
                 retry_policy: Optional[RetryPolicy] = None,
                 default_headers: Optional[Mapping[str, str]] = None,
                 http_client: Optional[httpx.AsyncClient] = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        super().__init__(base_url=base_url, api_key=api_key, timeout=timeout,
                         connect_timeout=connect_timeout, read_timeout=read_timeout,
                         max_retries=max_retries, retry_policy=retry_policy,
                         default_headers=default_headers)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(timeout=self.timeout)
        self._sleep = sleep

    # -- transport ---------------------------------------------------------------------

    async def _send(self, opts: RequestOptions) -> httpx.Response:
        """Send with retries; a 2xx response (still open when ``opts.stream``) or raise."""
        request = self._build_request(opts)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=opts.stream)
                if not response.is_success:
                    try:
                        await response.aread()  # the error body, for the exception
                    finally:
                        await response.aclose()
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
            await self._sleep(delay)
            attempt += 1

    # -- API ---------------------------------------------------------------------------

    async def reason(self, question: str, *, max_tokens: Optional[int] = None,
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
        return self._parse(await self._send(opts), ReasonResult)

    def stream(self, question: str, *, max_tokens: Optional[int] = None,
               temperature: Optional[float] = None, top_p: Optional[float] = None,
               top_k: Optional[int] = None, seed: Optional[int] = None,
               stop: Union[str, Sequence[str], None] = None, ignore_eos: Optional[bool] = None,
               latent: Optional[LatentParam] = None, return_latent_trace: Optional[bool] = None,
               latent_trace_top_k: Optional[int] = None, model: Optional[str] = None,
               n: Optional[int] = None, mixture: Optional[MixtureParam] = None,
               extra_body: Optional[Mapping[str, Any]] = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               timeout: Any = NOT_GIVEN, max_retries: Optional[int] = None) -> AsyncStream[StreamEvent]:
        """Ask one question with ``stream: true``; iterate the result for ``StreamEvent``s."""
        opts = self._reason_options(
            question, stream=True, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos, latent=latent,
            return_latent_trace=return_latent_trace, latent_trace_top_k=latent_trace_top_k,
            model=model, n=n, mixture=mixture, extra_body=extra_body,
            extra_headers=extra_headers, timeout=timeout, max_retries=max_retries)
        return AsyncStream(lambda: self._send(opts), StreamEvent)

    async def models(self, *, extra_headers: Optional[Mapping[str, str]] = None, timeout: Any = NOT_GIVEN,
               max_retries: Optional[int] = None) -> List[Model]:
        """The served models (``GET /v1/models``)."""
        return self._model_list(await self._send(self._get_options("/v1/models", extra_headers, timeout,
                                                             max_retries)))

    async def health(self, *, timeout: Any = NOT_GIVEN, max_retries: Optional[int] = None) -> Health:
        """Liveness (``GET /health``); raises if the server is down or unhealthy."""
        return self._parse(await self._send(self._get_options("/health", None, timeout, max_retries)),
                           Health)

    async def ready(self, *, timeout: Any = NOT_GIVEN) -> bool:
        """Readiness (``GET /ready``, one attempt): ``True`` on 200, ``False`` on 503.

        Other statuses and connection failures raise, so "not ready" and "not there"
        stay distinguishable.
        """
        try:
            await self._send(self._get_options("/ready", None, timeout, 0))
        except OverloadedError:
            return False
        return True

    # -- lifecycle ---------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection pool if this client created it (idempotent)."""
        if self._owns_http:
            await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> "AsyncCoconutClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
