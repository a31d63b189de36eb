"""FastAPI dependencies: the per-app objects routes need, from ``app.state``."""

from __future__ import annotations

from fastapi import Request

from server.errors import ApiError
from server.service import GenerationService


async def get_service(request: Request) -> GenerationService:
    # async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a
    # thread hop per request for a dictionary lookup.
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ApiError(503, "the model is not loaded yet (see GET /ready)", "unavailable_error",
                       headers={"Retry-After": str(request.app.state.settings.retry_after_s)})
    return service
