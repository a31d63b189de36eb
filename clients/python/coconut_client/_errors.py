"""Exceptions raised by the SDK, one class per kind of failure.

Hierarchy (catch as broad or as narrow as you like)::

    CoconutError
    └── APIError                      message, request, body
        ├── APIStatusError            status_code, request_id, response  (non-2xx answer)
        │   ├── BadRequestError           400
        │   │   └── UnprocessableEntityError  422 (invalid fields)
        │   ├── AuthenticationError       401
        │   ├── PermissionDeniedError     403
        │   ├── NotFoundError             404
        │   ├── RateLimitError            429
        │   └── InternalServerError       >= 500
        │       └── OverloadedError       503 (alias ServiceUnavailableError)
        ├── APIConnectionError        the server could not be reached / the connection broke
        │   └── APITimeoutError       connect or read timeout
        ├── APIResponseValidationError  a 2xx body that does not match the API schema
        └── APIStreamError            an ``error`` event inside an SSE stream
            └── IncompleteStreamError the stream ended without ``data: [DONE]``

``status_error(response)`` maps a response to its class; the message is taken from the
JSON body whatever shape the server uses (``{"error": {"message"}}``, ``{"message"}``,
``{"detail": "..."}`` or FastAPI's ``{"detail": [{"loc", "msg"}]}`` field errors, which
are rendered as ``"body.max_tokens: Input should be ..."`` so the field is named).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import httpx

REQUEST_ID_HEADER = "x-request-id"


class CoconutError(Exception):
    """Base class of every exception this package raises."""


class APIError(CoconutError):
    message: str
    request: Optional[httpx.Request]
    body: Any

    def __init__(self, message: str, request: Optional[httpx.Request] = None, *, body: Any = None):
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIStatusError(APIError):
    """The server answered with a non-success status code.

    ``type`` and ``param`` come from the body's ``error`` object when it has one (e.g.
    ``"invalid_request_error"`` and ``"max_tokens"``); ``request_id`` from the
    ``x-request-id`` header, else from the body.
    """

    status_code: int
    request_id: Optional[str]
    response: httpx.Response
    type: Optional[str]
    param: Optional[str]

    def __init__(self, message: str, *, response: httpx.Response, body: Any = None):
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        self.type = err.get("type") if isinstance(err.get("type"), str) else None
        self.param = err.get("param") if isinstance(err.get("param"), str) else None
        body_id = err.get("request_id") if isinstance(err.get("request_id"), str) else None
        self.request_id = response.headers.get(REQUEST_ID_HEADER) or body_id

    def __str__(self) -> str:
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"HTTP {self.status_code}: {self.message}{rid}"


class BadRequestError(APIStatusError):
    """400, or 422 (see ``UnprocessableEntityError``): the request itself is wrong."""


class UnprocessableEntityError(BadRequestError):
    """422: one or more request fields are invalid; the message names them."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: unknown route or model."""


class RateLimitError(APIStatusError):
    """429."""


class InternalServerError(APIStatusError):
    """Any 5xx answer."""


class OverloadedError(InternalServerError):
    """503: the server's queue is full or it is not ready; retry after ``Retry-After``."""


ServiceUnavailableError = OverloadedError


class APIConnectionError(APIError):
    """The request could not be sent or the response could not be read in full."""

    def __init__(self, message: str = "Connection error.", request: Optional[httpx.Request] = None):
        super().__init__(message, request)


class APITimeoutError(APIConnectionError):
    def __init__(self, message: str = "Request timed out.", request: Optional[httpx.Request] = None):
        super().__init__(message, request)


class APIResponseValidationError(APIError):
    """A success response whose body is not what the API promises."""

    def __init__(self, message: str, *, response: httpx.Response, body: Any = None):
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code
        self.request_id = response.headers.get(REQUEST_ID_HEADER)


class APIStreamError(APIError):
    """The server reported an error inside an SSE stream (after the 200 status)."""

    def __init__(self, message: str, *, request: Optional[httpx.Request] = None, body: Any = None,
                 request_id: Optional[str] = None):
        super().__init__(message, request, body=body)
        self.request_id = request_id

    def __str__(self) -> str:
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.message}{rid}"


class IncompleteStreamError(APIStreamError):
    """The stream ended before ``data: [DONE]``: the answer may be truncated."""


_BY_STATUS = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: OverloadedError,
}


def decode_body(response: httpx.Response) -> Any:
    """The response body as JSON when it is JSON, else as text (the body must be read)."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return response.text


def _field_errors(details: list) -> str:
    parts = []
    for item in details:
        if isinstance(item, dict):
            loc = ".".join(str(p) for p in item.get("loc", ()) if p is not None)
            msg = str(item.get("msg", item))
            parts.append(f"{loc}: {msg}" if loc else msg)
        else:
            parts.append(str(item))
    return "; ".join(parts)


def error_message(body: Any, default: str) -> str:
    """Find the human-readable message in an error body of any common shape."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message = err.get("message")
            details = err.get("details") or err.get("detail")
            if isinstance(details, list) and details:
                fields = _field_errors(details)
                return f"{message}: {fields}" if message else fields
            if message:
                return str(message)
        if isinstance(err, str) and err:
            return err
        if isinstance(body.get("message"), str) and body["message"]:
            return body["message"]
        detail = body.get("detail")
        if isinstance(detail, list) and detail:
            return _field_errors(detail)
        if isinstance(detail, str) and detail:
            return detail
    if isinstance(body, str) and body.strip():
        return body.strip()[:1000]
    return default


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for a (fully read) non-success response."""
    body = decode_body(response)
    default = f"{response.status_code} {response.reason_phrase}".strip()
    message = error_message(body, default)
    status = response.status_code
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    return cls(message, response=response, body=body)
