"""Server-sent events: ``data: {JSON}\\n\\n`` per event, ``data: [DONE]`` at the end.

``event_stream`` turns an async iterator of payload dicts (or frames already encoded, as
``delta_frames`` makes them) into an SSE response. A
failure after the response has started cannot change the status code any more, so it
is sent in-band as one ``data: {"error": {...}}`` event and the stream ends *without*
``[DONE]`` (clients treat a stream without ``[DONE]`` as failed).

``EventStreamResponse`` is Starlette's ``StreamingResponse`` cut to what a stream of
events needs: the frames go out as they come, in the request's own task, under the
request's ``DisconnectGuard`` (``server.disconnect``), whose one watcher task cancels the
stream when the client leaves (the generation is then aborted by the iterator's own
cleanup). Starlette runs an anyio task group per response for that.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from starlette.responses import Response

from server.disconnect import DisconnectGuard
from server.errors import ApiError, ClientDisconnected, error_body

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encode(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def delta_frames(head: dict):
    """``delta -> frame`` of the event ``{**head, "delta": delta, "finish_reason": None}``: the
    bytes ``encode`` gives, with ``head`` (a non-empty dict) serialised once per stream
    rather than once per token."""
    prefix = b"data: " + json.dumps(head, ensure_ascii=False)[:-1].encode() + b', "delta": '
    suffix = b', "finish_reason": null}\n\n'
    return lambda delta: prefix + json.dumps(delta, ensure_ascii=False).encode() + suffix


async def _frames(payloads: AsyncIterator[dict | bytes], request_id: str | None) -> AsyncIterator[bytes]:
    """Frames of the payloads: a dict is encoded, bytes are a frame already."""
    try:
        async for payload in payloads:
            yield payload if isinstance(payload, bytes) else encode(payload)
    except ApiError as e:
        yield encode(error_body(e.status, e.message, e.type, request_id, e.param))
        return
    except Exception as e:  # never leave a stream hanging without a word
        log.exception("stream %s failed", request_id)
        yield encode(error_body(500, f"the stream failed: {type(e).__name__}: {e}", "internal_error",
                                request_id))
        return
    yield DONE


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of ready frames (bytes). ``guard``: the
    request's ``DisconnectGuard`` when it has one already (else one is made here)."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], headers: dict[str, str] | None = None,
                 guard: DisconnectGuard | None = None):
        self.frames = frames
        self.guard = guard
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def _send_frames(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for frame in self.frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        guard = self.guard or DisconnectGuard(receive)
        try:
            await guard.run(self._send_frames(send))
        except ClientDisconnected:
            pass                 # nobody left to tell; the frames' cleanup aborted the generation
        finally:
            guard.close()
            await self.frames.aclose()


def event_stream(payloads: AsyncIterator[dict | bytes], request_id: str | None,
                 guard: DisconnectGuard | None = None) -> EventStreamResponse:
    return EventStreamResponse(_frames(payloads, request_id), headers=HEADERS, guard=guard)
