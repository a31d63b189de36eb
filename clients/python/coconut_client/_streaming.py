"""Server-sent events: the line decoder and the sync/async stream objects.

Contract:

- ``SSEDecoder`` turns lines into events as the SSE spec says (``data:`` lines of one
  event are joined with newlines, a blank line ends an event, ``:`` lines are comments,
  one space after the colon is dropped). It does no I/O.
- ``Stream`` / ``AsyncStream`` yield typed ``StreamEvent`` objects. The HTTP request is
  sent (with the client's retries) when iteration starts or the ``with`` block is
  entered, so status errors (422, 401, 503 after retries ...) surface there.
- Once the 2xx response is open nothing is retried. A broken connection raises
  ``APIConnectionError`` (``APITimeoutError`` on a read timeout); an ``error`` event
  (``event: error`` or a ``data`` object with an ``error`` key) raises ``APIStreamError``;
  a stream that ends without ``data: [DONE]`` raises ``IncompleteStreamError``.
- The response is closed whatever happens: after ``[DONE]``, on any exception, on
  ``close()``, on leaving the ``with`` block, on ``break`` once the stream object is
  dropped, and on garbage collection (async: via the event loop's async-generator
  finalizer, so prefer ``async with`` when closing must be immediate).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import (Any, AsyncIterator, Awaitable, Callable, Generic, Iterator, List, Optional,
                    Type, TypeVar, Union)

import httpx
import pydantic

from ._errors import (REQUEST_ID_HEADER, APIConnectionError, APIResponseValidationError,
                      APIStreamError, APITimeoutError, IncompleteStreamError, decode_body,
                      error_message)

T = TypeVar("T", bound=pydantic.BaseModel)

DONE_MARKER = "[DONE]"


@dataclass
class ServerSentEvent:
    data: str
    event: Optional[str] = None
    id: Optional[str] = None


class SSEDecoder:
    """Feed it one line at a time (without the line terminator)."""

    def __init__(self) -> None:
        self._data: List[str] = []
        self._event: Optional[str] = None
        self._id: Optional[str] = None

    def decode(self, line: str) -> Optional[ServerSentEvent]:
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # "retry" and unknown fields are ignored, as the spec says

    def flush(self) -> Optional[ServerSentEvent]:
        """The pending event, if any (at a blank line, or when the body ends without one)."""
        if not self._data and self._event is None:
            return None
        sse = ServerSentEvent(data="\n".join(self._data), event=self._event, id=self._id)
        self._data, self._event = [], None
        return sse


_DONE = object()


class _StreamBase(Generic[T]):
    """What the sync and async streams share: turning SSE events into results or errors."""

    _response: Optional[httpx.Response]

    def __init__(self, event_type: Type[T]):
        self._event_type = event_type
        self._response = None
        self._closed = False
        self._done = False
        self.text = ""
        self.final_event: Optional[T] = None
        # The iterator is held weakly: a ``for`` loop owns it, so leaving the loop early
        # (break, exception) finalizes it at once and its ``finally`` closes the response.
        # A strong reference would make a cycle (the iterator's frame holds ``self``)
        # that only the cyclic GC could free. ``next(stream)`` keeps a strong one.
        self._started = False
        self._iterator_ref: Optional[weakref.ReferenceType] = None
        self._next_iterator: Any = None

    def _live_iterator(self) -> Any:
        return None if self._iterator_ref is None else self._iterator_ref()

    @property
    def response(self) -> Optional[httpx.Response]:
        """The open HTTP response (``None`` until the request has been sent)."""
        return self._response

    @property
    def request_id(self) -> Optional[str]:
        return None if self._response is None else self._response.headers.get(REQUEST_ID_HEADER)

    def _check_content_type(self, response: httpx.Response) -> Optional[str]:
        ctype = response.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "text/event-stream":
            return f"expected a text/event-stream response, got {ctype or 'no content type'!r}"
        return None

    def _interpret(self, sse: ServerSentEvent) -> Any:
        """An event to yield, ``_DONE``, or ``None`` (nothing to yield); raises on errors."""
        if sse.data.strip() == DONE_MARKER:
            self._done = True
            return _DONE
        if not sse.data and sse.event != "error":
            return None
        try:
            payload = json.loads(sse.data) if sse.data else {}
        except json.JSONDecodeError:
            if sse.event == "error":
                raise self._stream_error(sse.data, sse.data) from None
            raise self._validation_error(f"stream event is not JSON: {sse.data[:200]!r}", sse.data) from None
        if sse.event == "error" or (isinstance(payload, dict) and payload.get("error") is not None):
            raise self._stream_error(error_message(payload, "the server reported an error in the stream"),
                                     payload)
        try:
            event = self._event_type.model_validate(payload)
        except pydantic.ValidationError as exc:
            raise self._validation_error(f"unexpected stream event {payload!r}: {exc}", payload) from exc
        self.text += getattr(event, "delta", "") or ""
        if getattr(event, "finish_reason", None) is not None:
            self.final_event = event
        return event

    def _stream_error(self, message: str, body: Any) -> APIStreamError:
        request = self._response.request if self._response is not None else None
        return APIStreamError(message, request=request, body=body, request_id=self.request_id)

    def _validation_error(self, message: str, body: Any) -> APIResponseValidationError:
        assert self._response is not None
        return APIResponseValidationError(message, response=self._response, body=body)

    def _incomplete(self) -> IncompleteStreamError:
        request = self._response.request if self._response is not None else None
        return IncompleteStreamError("the stream ended without data: [DONE]; the answer may be "
                                     "incomplete", request=request, request_id=self.request_id)

    def _transport_error(self, exc: httpx.TransportError) -> APIConnectionError:
        request = self._response.request if self._response is not None else None
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"timed out reading the stream: {exc}", request)
        return APIConnectionError(f"the connection broke during the stream: {exc}", request)

    @property
    def finish_reason(self) -> Optional[str]:
        return None if self.final_event is None else getattr(self.final_event, "finish_reason", None)

    @property
    def answer(self) -> Optional[str]:
        """The final event's ``answer`` (the text after the answer prefix), once seen."""
        return None if self.final_event is None else getattr(self.final_event, "answer", None)

    @property
    def usage(self) -> Any:
        return None if self.final_event is None else getattr(self.final_event, "usage", None)


class Stream(_StreamBase[T]):
    """A synchronous iterator of events; use it in a ``with`` block or iterate it to the end."""

    def __init__(self, open_response: Callable[[], httpx.Response], event_type: Type[T]):
        super().__init__(event_type)
        self._open = open_response

    def _ensure_open(self) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the stream is closed")
        if self._response is None:
            self._response = self._open()
            problem = self._check_content_type(self._response)
            if problem:
                try:
                    self._response.read()
                    raise self._validation_error(problem, decode_body(self._response))
                finally:
                    self._release()
        return self._response

    def _events(self) -> Iterator[T]:
        try:
            response = self._ensure_open()
            decoder = SSEDecoder()
            try:
                for line in response.iter_lines():
                    sse = decoder.decode(line)
                    item = None if sse is None else self._interpret(sse)
                    if item is _DONE:
                        return
                    if item is not None:
                        yield item
                sse = decoder.flush()
                if sse is not None and self._interpret(sse) is _DONE:
                    return
            except httpx.TransportError as exc:
                raise self._transport_error(exc) from exc
            raise self._incomplete()
        finally:
            self._release()

    def __iter__(self) -> Iterator[T]:
        gen = self._live_iterator()
        if gen is None:
            if self._started:
                return iter(())
            self._started = True
            gen = self._events()
            self._iterator_ref = weakref.ref(gen)
        return gen

    def __next__(self) -> T:
        if self._next_iterator is None:
            self._next_iterator = iter(self)
        return next(self._next_iterator)

    def __enter__(self) -> "Stream[T]":
        self._ensure_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _release(self) -> None:
        self._closed = True
        if self._response is not None:
            self._response.close()  # idempotent

    def close(self) -> None:
        """Close the HTTP response (idempotent); iteration stops."""
        gen = self._live_iterator()
        if gen is not None:
            gen.close()  # type: ignore[attr-defined]  (runs its finally; a no-op once finished)
        self._release()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # never raise from a finalizer
            pass


class AsyncStream(_StreamBase[T]):
    """An asynchronous iterator of events; use it in ``async with`` or iterate it to the end."""

    def __init__(self, open_response: Callable[[], Awaitable[httpx.Response]], event_type: Type[T]):
        super().__init__(event_type)
        self._open = open_response

    async def _ensure_open(self) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the stream is closed")
        if self._response is None:
            self._response = await self._open()
            problem = self._check_content_type(self._response)
            if problem:
                try:
                    await self._response.aread()
                    raise self._validation_error(problem, decode_body(self._response))
                finally:
                    await self._release()
        return self._response

    async def _events(self) -> AsyncIterator[T]:
        try:
            response = await self._ensure_open()
            decoder = SSEDecoder()
            try:
                async for line in response.aiter_lines():
                    sse = decoder.decode(line)
                    item = None if sse is None else self._interpret(sse)
                    if item is _DONE:
                        return
                    if item is not None:
                        yield item
                sse = decoder.flush()
                if sse is not None and self._interpret(sse) is _DONE:
                    return
            except httpx.TransportError as exc:
                raise self._transport_error(exc) from exc
            raise self._incomplete()
        finally:
            await self._release()

    def __aiter__(self) -> AsyncIterator[T]:
        gen = self._live_iterator()
        if gen is None:
            if self._started:
                return _empty_async_iterator()
            self._started = True
            gen = self._events()
            self._iterator_ref = weakref.ref(gen)
        return gen

    async def __anext__(self) -> T:
        if self._next_iterator is None:
            self._next_iterator = self.__aiter__()
        return await self._next_iterator.__anext__()

    async def __aenter__(self) -> "AsyncStream[T]":
        await self._ensure_open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _release(self) -> None:
        self._closed = True
        if self._response is not None:
            await self._response.aclose()  # idempotent

    async def close(self) -> None:
        """Close the HTTP response (idempotent); iteration stops."""
        gen = self._live_iterator()
        if gen is not None:
            await gen.aclose()  # type: ignore[attr-defined]  (runs its finally; a no-op once finished)
        await self._release()


async def _empty_async_iterator() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover  (makes this an async generator)


AnyStream = Union[Stream[T], AsyncStream[T]]
