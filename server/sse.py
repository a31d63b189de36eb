"""Server-sent events: ``data: {JSON}\\n\\n`` per event, ``data: [DONE]`` at the end.

``event_stream`` turns an async iterator of payload dicts into an SSE response. A
failure after the response has started cannot change the status code any more, so it
is sent in-band as one ``data: {"error": {...}}`` event and the stream ends *without*
``[DONE]`` (clients treat a stream without ``[DONE]`` as failed).
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from server.errors import ApiError, error_body

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encode(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


async def _frames(payloads: AsyncIterator[dict], request_id: str | None) -> AsyncIterator[bytes]:
    try:
        async for payload in payloads:
            yield encode(payload)
    except ApiError as e:
        yield encode(error_body(e.status, e.message, e.type, request_id, e.param))
        return
    except Exception as e:  # never leave a stream hanging without a word
        log.exception("stream %s failed", request_id)
        yield encode(error_body(500, f"the stream failed: {type(e).__name__}: {e}", "internal_error",
                                request_id))
        return
    yield DONE


def event_stream(payloads: AsyncIterator[dict], request_id: str | None) -> StreamingResponse:
    return StreamingResponse(_frames(payloads, request_id), media_type="text/event-stream", headers=HEADERS)
