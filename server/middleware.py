"""Pure ASGI middlewares (no ``BaseHTTPMiddleware``: they must not buffer streams or
swallow the client's disconnect message). Outermost first:

- ``RequestContextMiddleware``: gives every request an id (an incoming ``x-request-id``
  is honoured when it is a sane token, else one is generated), returns it in the
  ``x-request-id`` header of every response (with ``extra_headers``, such as a replica's
  ``x-coconut-replica``), counts requests by route and status,
  writes one JSON access-log line, and turns any unhandled exception into a 500 JSON
  body carrying the request id (the server stays up).
- ``AuthMiddleware``: with an API key, every path except the public ones needs
  ``Authorization: Bearer KEY`` (401 otherwise), compared in constant time. The scheme
  is case-insensitive (RFC 9110 section 11.1: ``bearer KEY`` and ``BEARER KEY`` work too);
  the key is not.
- ``BodyLimitMiddleware``: bodies over ``max_body_bytes`` answer 413, whether announced
  by ``Content-Length`` or discovered while reading a chunked body.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException

from server.access_log import log_request
from server.errors import error_body
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

#: Paths that never need the API key (probes and scrapers carry no credentials; the
#: playground page and its assets hold no secret and ask for the key themselves).
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/", "/playground/examples",
                          "/static/playground.css", "/static/playground.js", "/static/favicon.svg"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class RequestContextMiddleware:
    def __init__(self, app, metrics: ServerMetrics, routes: frozenset[str],
                 extra_headers: list[tuple[bytes, bytes]] = (), proxy_sets_request_id: bool = False):
        self.app, self.metrics, self.routes = app, metrics, routes
        # behind Ray Serve's proxy, which forwards the request's x-request-id (the client's, or
        # one it made) and writes it on the response itself: take that id, do not write a second
        self.proxy_sets_request_id = proxy_sets_request_id
        self.extra_headers = list(extra_headers)   # on every response (x-coconut-replica)
        self._extra_names = {k.lower() for k, _ in self.extra_headers} | {b"x-request-id"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = (_header(scope, b"x-request-id") or b"").decode("latin-1")
        if self.proxy_sets_request_id and incoming:
            request_id = incoming
        else:
            request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self._extra_names]
                if not self.proxy_sets_request_id:
                    headers.append((b"x-request-id", request_id.encode()))
                headers.extend(self.extra_headers)
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.http_in_progress.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if status["code"] == 0:
                status["code"] = 500
                await send_json(send_with_id, 500, error_body(
                    500, "internal server error; the request id identifies it in the server log",
                    "internal_error", request_id))
        finally:
            self.metrics.http_in_progress.dec()
            path = scope.get("path", "")
            route = path if path in self.routes else "other"  # bounded label values
            code = status["code"] or 499
            self.metrics.http_requests.labels(route, scope.get("method", ""), str(code)).inc()
            client = scope.get("client")
            log_request({"request_id": request_id, "method": scope.get("method"), "path": path,
                         "status": code, "duration_s": round(time.perf_counter() - started, 6),
                         "client": f"{client[0]}:{client[1]}" if client else None,
                         **state.get("log", {})})


def _canonical_bearer(value: bytes) -> bytes:
    """``Authorization`` credentials with the scheme spelt ``Bearer`` when it is bearer in
    any case (auth schemes are case-insensitive, RFC 9110 section 11.1), one space before
    the token; anything else unchanged."""
    scheme, space, token = value.partition(b" ")
    if not space or scheme.lower() != b"bearer":
        return value
    return b"Bearer " + token.lstrip(b" ")


class AuthMiddleware:
    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.expected is None or scope.get("path") in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        given = _header(scope, b"authorization") or b""
        if not hmac.compare_digest(_canonical_bearer(given), self.expected):
            reason = "missing" if not given else "wrong"
            return await send_json(send, 401, error_body(
                401, f"{reason} API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error", scope["state"].get("request_id")),
                [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app, max_body_bytes: int):
        self.app, self.limit = app, max_body_bytes

    def _too_large(self) -> str:
        return f"request body too large: the limit is {self.limit} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await send_json(send, 400, error_body(
                    400, f"invalid Content-Length header {declared.decode('latin-1')!r}",
                    request_id=scope["state"].get("request_id")))
            if size > self.limit:
                return await send_json(send, 413, error_body(
                    413, self._too_large(), request_id=scope["state"].get("request_id")))
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, self._too_large())
            return message

        return await self.app(scope, counting_receive, send)
