"""The hot routes without the framework: ``POST /v1/reason``, ``/v1/completions`` and
``/v1/chat/completions`` answered by a plain ASGI handler.

Under 64 streaming clients FastAPI's layers (its middleware stack, routing, dependency
resolution, body handling and response validation) were the largest share of the API
process's CPU after uvicorn itself (py-spy, ``docs/bench/http_frontend.md``). The lane
serves the requests that need none of it and hands everything else to FastAPI:

- it takes a request whose content type is ``application/json`` and whose body is a JSON
  object that validates as the route's request model, while the service is up; it then
  calls the route's own function (``server.routes``) and sends what it returns: the route's
  SSE response, or its response model dumped as FastAPI dumps it (``exclude_none``, by
  alias, which every lane route declares);
- anything else (malformed JSON, field errors, other content types, no service yet) goes
  to the FastAPI app with the body replayed, so every refusal is the framework's own, byte
  for byte, as are the OpenAPI document and the other routes;
- ``ApiError`` and ``ClientDisconnected`` raised by the route get the bodies of the
  app's exception handlers (``server.errors``).

The lane runs inside the same request-context, auth and body-limit middlewares as every
other route (``server.app``). It knows the three routes in ``ROUTES``.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from server.errors import ApiError, ClientDisconnected, disconnected_response, error_response
from server.openai_schemas import ChatRequest, CompletionRequest
from server.routes.openai import chat_completions, completions
from server.routes.reason import reason
from server.schemas import ReasonRequest

#: (method, path) -> (the body's model, the route function ``(body, request, service)``)
ROUTES = {
    ("POST", "/v1/reason"): (ReasonRequest, reason),
    ("POST", "/v1/completions"): (CompletionRequest, completions),
    ("POST", "/v1/chat/completions"): (ChatRequest, chat_completions),
}


def _json_content_type(scope) -> bool:
    """``application/json`` (parameters such as a charset allowed): the bodies every FastAPI
    version parses as JSON; no content type (which FastAPI refuses or parses, by version)
    and ``+json`` types go to FastAPI."""
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


def _replay(body: bytes, receive):
    """A ``receive`` that gives the body already read once, then the connection's own."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class FastLane:
    def __init__(self, app, fallback):
        self.app = app              # the FastAPI app: its state holds the service
        self.fallback = fallback    # the FastAPI app's own ASGI entry

    async def __call__(self, scope, receive, send) -> None:
        model, route = ROUTES[(scope["method"], scope["path"])]
        request = Request(scope, receive)
        try:
            body = await request.body()
        except HTTPException as e:            # the body limit, discovered while reading
            return await error_response(request, ApiError(e.status_code, str(e.detail)))(scope, receive, send)
        parsed = _parse(scope, body, model)
        service = getattr(self.app.state, "service", None)
        if parsed is None or service is None:
            return await self.fallback(scope, _replay(body, receive), send)
        scope["app"] = self.app
        try:
            result = await route(parsed, request, service)
        except ApiError as e:
            response = error_response(request, e)
        except ClientDisconnected as e:
            response = await disconnected_response(request, e)
        else:
            response = result if isinstance(result, Response) else Response(
                result.model_dump_json(exclude_none=True, by_alias=True), media_type="application/json")
        await response(scope, receive, send)


def _parse(scope, body: bytes, model: type[BaseModel]) -> BaseModel | None:
    if not body or not _json_content_type(scope):
        return None
    try:
        data = json.loads(body)
        return model.model_validate(data) if isinstance(data, dict) else None
    except (ValueError, ValidationError):      # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
