"""Operations: ``GET /health`` (liveness), ``GET /ready`` (readiness), ``GET /metrics``.

- ``/health`` answers 200 while the process can serve or recover (also while a dead engine
  process is being replaced); 503 once the engine loop has died for good (nothing but a
  restart of the server helps then).
- ``/ready`` answers 200 only when the model is loaded and the engine loop is alive and
  accepting requests; 503 otherwise, with the reason (``status``: ``loading``,
  ``restarting``, ``dead``, ``draining``).
- ``/metrics`` is the Prometheus text format (see ``server.metrics``); on Ray Serve, every
  replica's samples, each labelled ``replica`` (``server.ray_serve``).

None of them needs the API key.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.metrics import CONTENT_TYPE_LATEST

router = APIRouter(tags=["operations"])


def _engine(request: Request):
    return getattr(request.app.state, "engine", None)


@router.get("/health")
async def health(request: Request):
    engine = _engine(request)
    if engine is not None and not engine.is_healthy and not engine.restarting:  # set only once started
        return JSONResponse({"status": "dead", "detail": engine.unavailable_reason or "the engine loop has stopped"},
                            status_code=503)
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    engine = _engine(request)
    if engine is None:
        return JSONResponse({"status": "loading", "detail": "the model is not loaded yet"}, status_code=503)
    if engine.restarting:
        return JSONResponse({"status": "restarting", "detail": engine.unavailable_reason}, status_code=503,
                            headers={"Retry-After": str(request.app.state.settings.retry_after_s)})
    if not engine.is_healthy:
        return JSONResponse({"status": "dead", "detail": engine.unavailable_reason or "the engine loop has stopped"},
                            status_code=503)
    if not engine.accepting:
        return JSONResponse({"status": "draining", "detail": "shutting down"}, status_code=503)
    body = {"status": "ready", "model": request.app.state.service.model_name,
            "waiting": engine.num_waiting, "running": engine.num_running}
    if request.app.state.replica_name:
        body["replica"] = request.app.state.replica_name
    return body


@router.get("/metrics", response_class=Response)
async def metrics(request: Request):
    render = request.app.state.render_metrics   # several replicas' metrics (server.ray_serve)
    body = await render() if render is not None else request.app.state.metrics.render()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
