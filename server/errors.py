"""One error shape for every failure, and the mapping from exceptions to HTTP statuses.

Every error body is ``{"error": {"message", "type", "code", "request_id", "param"}}``
(the OpenAI shape, so the ``openai`` package reads the message), plus ``detail`` (the
list of field errors) on 422. The mapping:

==================================  ======  =====================================
malformed JSON                      400     ``invalid_request_error``
question too long for the model     400     ``context_length_exceeded`` (the limit)
missing / wrong API key             401     ``authentication_error``
unknown model name                  404     ``not_found_error``
body over ``--max-body-bytes``      413     ``request_too_large``
field errors, engine ValueError     422     ``invalid_request_error``
the engine failed this request      500     ``engine_error``
waiting queue full                  503     ``overloaded_error`` + ``Retry-After``
engine not running / shutting down  503     ``unavailable_error`` + ``Retry-After``
==================================  ======  =====================================
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import EngineDeadError, EngineOverloadedError
from engine.core import RequestTooLongError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
          422: "invalid_request_error", 500: "engine_error", 503: "unavailable_error"}


class ApiError(Exception):
    """Raise anywhere under a route to answer ``status`` with the standard body."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, detail: list | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.detail = status, message, param, detail
        self.type = type or _TYPES.get(status, "error")
        self.headers = headers or {}


class ClientDisconnected(Exception):
    """The client went away before the answer was complete; its request was aborted.
    Answered with 499 (nginx's "client closed request"), which nobody receives but the
    access log and the metrics record."""


def request_id_of(request_or_scope) -> str | None:
    scope = request_or_scope if isinstance(request_or_scope, dict) else request_or_scope.scope
    return scope.get("state", {}).get("request_id")


def error_body(status: int, message: str, type: str | None = None, request_id: str | None = None,
               param: str | None = None, detail: list | None = None) -> dict:
    body: dict = {"error": {"message": message, "type": type or _TYPES.get(status, "error"),
                            "code": status, "request_id": request_id, "param": param}}
    if detail is not None:
        body["detail"] = detail
    return body


def error_response(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.type, request_id_of(request), err.param,
                                   err.detail), status_code=err.status, headers=err.headers)


def from_engine_exception(exc: BaseException, retry_after_s: int) -> ApiError | None:
    """The ApiError for an exception raised when a request enters the engine, if known."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, RequestTooLongError):
        return ApiError(400, str(exc), "context_length_exceeded", param="question")
    if isinstance(exc, EngineOverloadedError):
        return ApiError(503, f"{exc}; retry later", "overloaded_error", headers=retry)
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), "unavailable_error", headers=retry)
    if isinstance(exc, ValueError):
        return ApiError(422, str(exc), "invalid_request_error")
    return None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _clean_loc(loc) -> list:
    """Drop pydantic's union-member tags ('str', 'list[...]', 'constrained-str') from an
    error location, which name the field path a client sent."""
    return [p for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or "-" in p))]


def _field_errors(exc: RequestValidationError) -> list[dict]:
    out = []
    for e in exc.errors():
        item = {"loc": _clean_loc(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        value = e.get("input")
        if "input" in e and isinstance(value, (str, int, float, bool, type(None))) and \
                not (isinstance(value, float) and not math.isfinite(value)):   # NaN/inf are not JSON
            item["input"] = value
        out.append(item)
    return out


async def disconnected_response(request: Request, exc: ClientDisconnected) -> JSONResponse:
    return error_response(request, ApiError(499, str(exc), "client_disconnected"))


async def internal_error_response(request: Request, exc: Exception) -> JSONResponse:
    """An unhandled exception's 500 (logged by ``RequestContextMiddleware``, which the
    exception reaches after this body is sent). Async, as every handler here: Starlette
    runs a plain function in its thread pool."""
    return error_response(request, ApiError(500, "internal server error; the request id identifies it in "
                                                 "the server log", "internal_error"))


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc)

    app.add_exception_handler(ClientDisconnected, disconnected_response)
    app.add_exception_handler(Exception, internal_error_response)   # Starlette's ServerErrorMiddleware

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = _field_errors(exc)
        bad_json = [e for e in errors if e["type"] == "json_invalid"]
        if bad_json:
            ctx = exc.errors()[0].get("ctx", {})
            return error_response(request, ApiError(
                400, f"malformed JSON body: {ctx.get('error', 'cannot parse')} "
                     f"(expected one JSON object)", detail=errors))
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                            for e in errors)
        first = next((e["loc"] for e in errors if e["loc"]), None)
        param = ".".join(str(p) for p in first if p != "body") if first else None
        return error_response(request, ApiError(422, f"invalid request: {summary}", param=param or None,
                                                detail=errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(request, ApiError(exc.status_code, str(exc.detail),
                                                headers=dict(exc.headers or {})))
