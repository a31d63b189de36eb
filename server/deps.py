"""FastAPI dependencies: the per-app objects routes need, from ``app.state``."""

from __future__ import annotations

from fastapi import Request

from server.errors import ApiError
from server.service import GenerationService


def get_service(request: Request) -> GenerationService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ApiError(503, "the model is not loaded yet (see GET /ready)", "unavailable_error",
                       headers={"Retry-After": str(request.app.state.settings.retry_after_s)})
    return service
