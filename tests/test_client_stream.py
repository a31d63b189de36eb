"""SDK streaming against ``httpx.MockTransport``: SSE decoding, errors, retries, closing.

The server side is a hand-written SSE body (the format of issue 4: ``data: {json}``
events with ``delta``, the last with ``finish_reason`` and ``usage``, then
``data: [DONE]``) served by a byte stream that records whether it was closed, so each
test can check that the response was released: after ``[DONE]``, on a missing
``[DONE]``, an ``error`` event, a broken connection, an early ``break``, an exception in
the caller's loop, leaving a ``with`` block, and garbage collection.
"""

from __future__ import annotations

import asyncio
import gc
import json

import httpx
import pytest

from coconut_client import (APIConnectionError, APIResponseValidationError, APIStreamError,
                            APITimeoutError, AsyncCoconutClient, CoconutClient,
                            IncompleteStreamError, OverloadedError, RetryPolicy, StreamEvent,
                            UnprocessableEntityError)
from coconut_client._streaming import SSEDecoder

BASE = "http://coconut.test"

DELTAS = ["###", " yum", "pus", " é"]
USAGE = {"prompt_tokens": 9, "latent_thoughts": 3, "completion_tokens": 4}


def sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return f"data: {data}\n\n".encode()


def events_body(deltas=DELTAS, *, done=True, final=True) -> bytes:
    out = b""
    for i, d in enumerate(deltas):
        ev = {"id": "r1", "model": "tiny", "delta": d}
        if final and i == len(deltas) - 1:
            ev.update(finish_reason="length", usage=USAGE, answer="yumpus é",
                      timings={"queue": 0.0, "prefill": 0.1, "latent": 0.2, "decode": 0.3})
        out += sse(ev)
    if done:
        out += sse("[DONE]")
    return out


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body served in chunks that can fail at the end and records closing."""

    def __init__(self, data: bytes, *, chunk: int = 0, error: Exception | None = None):
        self.chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
        self.error = error
        self.closed = False

    def __iter__(self):
        yield from self.chunks
        if self.error is not None:
            raise self.error

    async def __aiter__(self):
        for c in self.chunks:
            yield c
        if self.error is not None:
            raise self.error

    def close(self):
        self.closed = True

    async def aclose(self):
        self.closed = True


class Server:
    """MockTransport handler: answers with the given steps (last repeats), records requests
    and the bodies it handed out."""

    def __init__(self, *steps):
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []
        self.bodies: list[Body] = []

    def __call__(self, request):
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, int):
            return httpx.Response(step, json={"error": {"message": f"status {step}"}},
                                  headers={"Retry-After": "2"})
        body = step() if callable(step) else Body(step)
        self.bodies.append(body)
        return httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8",
                                            "x-request-id": "rid-s"}, stream=body)

    @property
    def all_closed(self) -> bool:
        return all(b.closed for b in self.bodies)


def sync_client(server, sleeps=None, **kw):
    sleeps = [] if sleeps is None else sleeps
    return CoconutClient(BASE, http_client=httpx.Client(transport=httpx.MockTransport(server)),
                         sleep=sleeps.append, retry_policy=RetryPolicy(random=lambda: 0.0), **kw)


def async_client(server, sleeps=None, **kw):
    sleeps = [] if sleeps is None else sleeps

    async def fake_sleep(s):
        sleeps.append(s)

    return AsyncCoconutClient(BASE, http_client=httpx.AsyncClient(transport=httpx.MockTransport(server)),
                              sleep=fake_sleep, retry_policy=RetryPolicy(random=lambda: 0.0), **kw)


# -- the SSE decoder -------------------------------------------------------------------------


def test_sse_decoder_follows_the_spec():
    d = SSEDecoder()
    lines = [": comment", "event: error", "data: line one", "data:line two", "id: 7", "retry: 100", "",
             "", "data:  two spaces", ""]
    events = [e for e in (d.decode(x) for x in lines) if e is not None]
    assert [(e.event, e.data, e.id) for e in events] == [("error", "line one\nline two", "7"),
                                                         (None, " two spaces", "7")]
    assert d.flush() is None
    d.decode("data: no blank line at the end")
    assert d.flush().data == "no blank line at the end"


# -- sync streams -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_stream_yields_typed_events_and_closes(chunk):
    # chunk=1 splits every event, and the two-byte "é", across reads.
    body = events_body().replace(b"\n\n", b"\r\n\r\n") if chunk == 7 else events_body()
    server = Server(lambda: Body(body, chunk=chunk))
    client = sync_client(server)
    stream = client.stream("q", max_tokens=4, latent={"mode": "fixed", "thoughts": 3})
    assert server.requests == []  # nothing is sent before iteration
    events = list(stream)
    assert all(isinstance(e, StreamEvent) for e in events)
    assert [e.delta for e in events] == DELTAS
    assert [e.finish_reason for e in events] == [None, None, None, "length"]
    last = events[-1]
    assert last.usage.latent_thoughts == 3 and last.usage.completion_tokens == 4
    assert last.timings.latent == 0.2 and last.answer == "yumpus é" and last.is_final
    assert stream.text == "### yumpus é" and stream.finish_reason == "length"
    assert stream.answer == "yumpus é" and stream.usage.prompt_tokens == 9
    assert stream.request_id == "rid-s"
    req = server.requests[0]
    assert json.loads(req.content) == {"question": "q", "max_tokens": 4, "stream": True,
                                       "latent": {"mode": "fixed", "thoughts": 3}}
    assert req.headers["accept"] == "text/event-stream"
    assert server.all_closed


def test_missing_done_raises_after_the_events_it_got():
    server = Server(events_body(done=False))
    got = []
    with pytest.raises(IncompleteStreamError) as info:
        for ev in sync_client(server).stream("q"):
            got.append(ev.delta)
    assert got == DELTAS  # what arrived was delivered first
    assert info.value.request_id == "rid-s"
    assert server.all_closed


@pytest.mark.parametrize("error_event", [
    b'event: error\ndata: {"error": {"message": "engine failed: boom", "type": "engine_error"}}\n\n',
    b'data: {"error": {"message": "engine failed: boom", "type": "engine_error"}}\n\n',
])
def test_an_error_event_raises(error_event):
    server = Server(events_body(DELTAS[:2], done=False, final=False) + error_event + sse("[DONE]"))
    got = []
    with pytest.raises(APIStreamError) as info:
        for ev in sync_client(server).stream("q"):
            got.append(ev.delta)
    assert got == DELTAS[:2]
    assert "engine failed: boom" in str(info.value)
    assert info.value.body["error"]["type"] == "engine_error"
    assert server.all_closed


@pytest.mark.parametrize("error,exc", [(httpx.ReadError("connection reset"), APIConnectionError),
                                       (httpx.RemoteProtocolError("peer closed"), APIConnectionError),
                                       (httpx.ReadTimeout("slow"), APITimeoutError)])
def test_a_broken_stream_is_never_retried(error, exc):
    server = Server(lambda: Body(events_body(DELTAS[:2], done=False, final=False), error=error))
    sleeps = []
    got = []
    with pytest.raises(exc):
        for ev in sync_client(server, sleeps, max_retries=5).stream("q"):
            got.append(ev.delta)
    assert got == DELTAS[:2]
    assert len(server.requests) == 1 and sleeps == []
    assert server.all_closed


def test_opening_a_stream_is_retried_honouring_retry_after():
    server = Server(503, 503, events_body())
    sleeps = []
    events = list(sync_client(server, sleeps).stream("q"))
    assert "".join(e.delta for e in events) == "### yumpus é"
    assert len(server.requests) == 3 and sleeps == [2.0, 2.0]

    server = Server(503)
    with pytest.raises(OverloadedError):
        list(sync_client(server, max_retries=1).stream("q"))
    assert len(server.requests) == 2


def test_a_status_error_surfaces_when_the_stream_opens():
    server = Server(422)
    client = sync_client(server)
    with pytest.raises(UnprocessableEntityError):
        list(client.stream("q"))
    with pytest.raises(UnprocessableEntityError):
        with client.stream("q"):
            pass  # pragma: no cover
    assert len(server.requests) == 2


def test_a_non_sse_success_is_refused_and_closed():
    body = Body(b'{"text": "not a stream"}')
    server = Server(lambda: body)

    def answer(request):
        server.requests.append(request)
        server.bodies.append(body)
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=body)

    client = CoconutClient(BASE, http_client=httpx.Client(transport=httpx.MockTransport(answer)))
    with pytest.raises(APIResponseValidationError):
        list(client.stream("q"))
    assert body.closed


def test_early_break_closes_at_once():
    server = Server(events_body())
    for ev in sync_client(server).stream("q"):
        break
    assert server.all_closed  # without gc.collect(): no reference cycle holds it open

    server = Server(events_body())
    stream = sync_client(server).stream("q")
    for ev in stream:
        break
    assert server.all_closed
    assert list(stream) == []  # a closed stream yields nothing more


def test_an_exception_in_the_loop_closes():
    server = Server(events_body())
    with pytest.raises(ZeroDivisionError):
        for ev in sync_client(server).stream("q"):
            1 / 0
    assert server.all_closed


def test_with_block_and_close_release_the_response():
    server = Server(events_body())
    client = sync_client(server)
    with client.stream("q") as stream:
        assert len(server.requests) == 1  # entering sends the request
        assert next(stream).delta == "###"
    assert server.all_closed

    server = Server(events_body())
    stream = sync_client(server).stream("q")
    assert next(stream).delta == "###"
    stream.close()
    assert server.all_closed
    stream.close()  # idempotent


def test_garbage_collection_closes_an_open_stream():
    server = Server(events_body())
    stream = sync_client(server).stream("q")
    stream.__enter__()
    assert next(stream).delta == "###"  # next() holds its iterator strongly (a cycle)
    del stream
    gc.collect()
    assert server.all_closed


# -- async streams ----------------------------------------------------------------------------


def test_async_stream_mirrors_the_sync_one():
    server = Server(lambda: Body(events_body(), chunk=3))

    async def main():
        async with async_client(server) as client:
            stream = client.stream("q", max_tokens=4)
            return [ev async for ev in stream], stream

    events, stream = asyncio.run(main())
    assert [e.delta for e in events] == DELTAS
    assert events[-1].usage.latent_thoughts == 3 and stream.finish_reason == "length"
    assert json.loads(server.requests[0].content)["stream"] is True
    assert server.all_closed


def test_async_missing_done_and_error_event_raise():
    async def drain(body):
        server = Server(body)
        got = []
        try:
            async for ev in async_client(server).stream("q"):
                got.append(ev.delta)
        finally:
            assert server.all_closed
        return got

    with pytest.raises(IncompleteStreamError):
        asyncio.run(drain(events_body(done=False)))
    with pytest.raises(APIStreamError):
        asyncio.run(drain(b'event: error\ndata: {"error": {"message": "x"}}\n\n' + sse("[DONE]")))


def test_async_broken_stream_is_never_retried():
    server = Server(lambda: Body(events_body(DELTAS[:1], done=False, final=False),
                                 error=httpx.ReadError("reset")))
    sleeps = []

    async def main():
        async for _ in async_client(server, sleeps, max_retries=5).stream("q"):
            pass

    with pytest.raises(APIConnectionError):
        asyncio.run(main())
    assert len(server.requests) == 1 and sleeps == [] and server.all_closed


def test_async_opening_is_retried():
    server = Server(503, events_body())
    sleeps = []

    async def main():
        return [ev.delta async for ev in async_client(server, sleeps).stream("q")]

    assert asyncio.run(main()) == DELTAS
    assert sleeps == [2.0] and len(server.requests) == 2


def test_async_early_exit_closes():
    async def main():
        server = Server(events_body())
        async with async_client(server).stream("q") as stream:
            async for ev in stream:
                break
        assert server.all_closed  # at once with async with

        server = Server(events_body())
        async for ev in async_client(server).stream("q"):
            break
        # Without a with block the event loop's async-generator finalizer closes it.
        for _ in range(5):
            await asyncio.sleep(0)
        assert server.all_closed

        server = Server(events_body())
        stream = async_client(server).stream("q")
        assert (await stream.__anext__()).delta == "###"
        await stream.close()
        assert server.all_closed

    asyncio.run(main())
