"""The FastAPI application: ``create_app(settings)`` builds one server around one engine.

    app = create_app(ServerSettings(model="/ckpt", max_batch_size=32))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The lifespan starts one running engine whose loop owns the model (every request goes
through it, so concurrent requests share forward passes): a ``ProcessEngine`` (the loop
in a child process, the default) or, with ``engine_process`` off or an ``Engine`` passed
in (as tests do), an ``AsyncEngine`` (the loop in a thread). On shutdown it drains it:
uvicorn first stops accepting connections and waits for the open ones (in-flight
requests finish), then ``shutdown(drain=True)`` stops the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os

from fastapi import FastAPI

import engine as engine_pkg
from engine.async_engine import AsyncEngine
from engine.sync_engine import Engine
from server import errors
from server.fast_lane import ROUTES as LANE_ROUTES, FastLane
from server.metrics import ServerMetrics
from server.middleware import AuthMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from server.openai_schemas import ChatCompletionChunk, CompletionChunk
from server.routes import openai, ops, playground, reason
from server.schemas import ReasonStreamEvent, add_component_schemas
from server.service import GenerationService
from server.settings import ServerSettings

log = logging.getLogger(__name__)

#: The events of the streamed replies: the routes' ``text/event-stream`` schemas refer to
#: them (``server.schemas.sse_response``), so the OpenAPI document's components hold them.
STREAM_EVENT_MODELS = [ReasonStreamEvent, CompletionChunk, ChatCompletionChunk]


def resolve_served_model(settings: ServerSettings) -> ServerSettings:
    """The settings with ``model`` as a local directory: a Hub id resolved in the Hub's cache,
    a ``.gguf`` file dequantized once into a temporary directory that lives as long as this
    process (so an engine process, and each one that replaces it, loads a plain directory).
    ``served_model_name`` defaults to what the user named (the Hub id, the GGUF file's stem).
    Raises ``CheckpointError`` naming the model and the reason."""
    from engine.gguf import local_directory
    from engine.sources import resolve_model

    source = resolve_model(settings.model_spec(), settings.revision)
    directory = local_directory(source, settings.resolved_dtype())
    return settings.model_copy(update={"model": str(directory), "revision": None,
                                       "served_model_name": settings.served_model_name or source.name})


def engine_options(settings: ServerSettings) -> dict:
    """``Engine.from_pretrained`` keyword arguments from the settings."""
    return dict(device=settings.resolved_device(), dtype=settings.resolved_dtype(), revision=settings.revision,
                max_batch_size=settings.max_batch_size, max_seq_len=settings.max_seq_len,
                max_prefill_tokens=settings.max_prefill_tokens, prefill_delay_factor=settings.resolved_prefill_delay_factor(),
                seed=settings.seed, compile=settings.compile, pack_weights=settings.pack_weights,
                lean_decode=settings.lean_decode, prefix_caching=settings.prefix_caching,
                kv_cache_memory=settings.kv_cache_memory, coconut=settings.coconut_overrides(),
                **settings.request_defaults())


#: Weights at least this large (bytes of safetensors) get every CPU in the engine process;
#: smaller ones leave one CPU to the API process. Measured on 2 cores: SmolLM2-135M (538 MB)
#: streams 91.8 / 119.8 output tok/s at 16 / 32 streams with 2 passive threads against
#: 78.5 / 101.5 with one (``engine bench peers``); the bundled 11 MB model serves 8-10% fewer
#: requests/s with two (81.4 against 88.2 at 32 clients, ``engine bench serve``): its
#: products are too small to split, and the API process wants the second core. Between the
#: two sizes nothing was measured; the bound sits near the larger.
PARALLEL_WEIGHTS_BYTES = 100 * 2 ** 20


def engine_process_threads(settings: ServerSettings) -> int:
    """The engine process's torch threads: ``--torch-threads``, else every usable CPU for
    weights of ``PARALLEL_WEIGHTS_BYTES`` or more and every CPU but one for smaller ones.
    Its OpenMP threads sleep when idle rather than spin (``OMP_WAIT_POLICY=PASSIVE``, with
    ``GOMP_SPINCOUNT=100000``: about a millisecond of spinning first, so not between a
    forward's parallel regions; set by ``engine.process_engine`` unless the environment sets
    them), so they give the API process its CPU back between steps: two threads spinning
    without bound served SmolLM2 at 59.0 / 79.5 tok/s (16 / 32 streams), fighting the API
    process for the cores."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus if weights_bytes(settings.model_spec()) >= PARALLEL_WEIGHTS_BYTES else max(1, cpus - 1)


def weights_bytes(model: str) -> int:
    """Bytes of the safetensors files of a model directory (0 when it is not a directory)."""
    from pathlib import Path

    directory = Path(model)
    if not directory.is_dir():
        return 0
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def load_engine(settings: ServerSettings) -> Engine:
    if settings.torch_threads is not None:
        import torch
        torch.set_num_threads(settings.torch_threads)
    return Engine.from_pretrained(settings.model_spec(), **engine_options(settings))


async def start_engine(settings: ServerSettings, engine: Engine | None, on_step, on_restart=None,
                       on_give_up=None):
    """The running engine the routes drive: ``AsyncEngine`` over ``engine`` (or one loaded from
    the settings), or with ``settings.engine_process`` a ``ProcessEngine``, which replaces a
    dead child as the settings' restart policy says (``on_restart`` / ``on_give_up``)."""
    if engine is None and settings.engine_process:
        from engine.process_engine import ProcessEngine, RestartPolicy

        policy = RestartPolicy(max_restarts=settings.max_engine_restarts, window_s=settings.engine_restart_window_s,
                               backoff_s=settings.engine_restart_backoff_s)
        running = await asyncio.to_thread(ProcessEngine, settings.model_spec(), engine_options(settings),
                                          settings.max_queue, engine_process_threads(settings), on_step, policy,
                                          on_restart, on_give_up)
    else:
        core = engine if engine is not None else await asyncio.to_thread(load_engine, settings)
        running = AsyncEngine(core, max_queue=settings.max_queue, on_step=on_step)
    await running.start()
    return running


def create_app(settings: ServerSettings | None = None, engine: Engine | None = None,
               replica_name: str | None = None) -> FastAPI:
    """``replica_name``: set when the app runs as one of several replicas (``server.ray_serve``);
    every response then carries it in ``x-coconut-replica``, and ``/ready`` reports it.
    ``app.state.render_metrics`` (an async callable returning the exposition bytes) may be
    set afterwards to serve more than this app's own metrics on ``/metrics``.

    When the engine process gives up (``--max-engine-restarts``), ``app.state.engine_failure``
    holds the reason and ``app.state.exit_server()`` is called if set (``engine serve`` sets
    it to stop uvicorn, then exits non-zero)."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()

    def give_up(reason: str) -> None:
        app.state.engine_failure = reason
        if app.state.exit_server is not None:
            log.error("stopping the server: the engine process kept failing")
            app.state.exit_server()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        served = settings if engine is not None else await asyncio.to_thread(resolve_served_model, settings)
        async_engine = await start_engine(served, engine, metrics.on_step,
                                          on_restart=lambda reason: metrics.engine_restarts.inc(),
                                          on_give_up=give_up)
        metrics.bind_engine(lambda: async_engine.num_waiting, lambda: async_engine.num_running)
        core = async_engine.engine
        name = served.served_model_name or core.model_name
        app.state.service = GenerationService(async_engine, metrics, name, settings.retry_after_s)
        app.state.engine = async_engine
        log.info("serving %s (max_batch_size=%d, max_queue=%d, max_seq_len=%d%s)", name,
                 settings.max_batch_size if engine is None else core.config.max_batch_size, settings.max_queue,
                 core.max_seq_len, ", engine in its own process" if engine is None and settings.engine_process else "")
        try:
            yield
        finally:
            log.info("shutting down: draining %d waiting and %d running requests",
                     async_engine.num_waiting, async_engine.num_running)
            await async_engine.shutdown(drain=True, timeout=settings.drain_timeout_s)

    app = ServerApp(title="coconut-serve", version=engine_pkg.__version__, lifespan=lifespan,
                  description="Inference server for latent-reasoning (COCONUT) language models.",
                  **_without_telemetry())
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = None
    app.state.service = None
    app.state.replica_name = replica_name
    app.state.render_metrics = None
    app.state.engine_failure = None     # why the engine process was given up on
    app.state.exit_server = None        # set by whoever runs uvicorn
    errors.install(app)
    _add_stream_schemas(app)
    routers = (ops.router, reason.router, openai.router, playground.router)
    for router in routers:
        app.include_router(router)
    routes = frozenset(r.path for router in routers for r in router.routes) | {"/openapi.json", "/docs"}
    # Innermost first: the request context wraps everything, so even an auth or body-size
    # refusal carries an x-request-id and is counted and logged.
    inner = _Dispatch(app)
    inner = BodyLimitMiddleware(inner, max_body_bytes=settings.max_body_bytes)
    inner = AuthMiddleware(inner, api_key=settings.api_key.get_secret_value() if settings.api_key else None)
    replica_header = [(b"x-coconut-replica", replica_name.encode())] if replica_name else []
    app.front = RequestContextMiddleware(inner, metrics=metrics, routes=routes, extra_headers=replica_header,
                                         proxy_sets_request_id=replica_name is not None)
    return app


class ServerApp(FastAPI):
    """The FastAPI app behind the server's own middlewares (``front``), which route the hot
    requests to ``server.fast_lane`` and the rest to FastAPI. ``fast_lane`` off sends every
    request through FastAPI (the lane's tests compare the two)."""

    front = None
    fast_lane = True

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.front is not None:
            return await self.front(scope, receive, send)
        return await super().__call__(scope, receive, send)


class _Dispatch:
    def __init__(self, app: ServerApp):
        self.app = app
        self.framework = super(ServerApp, app).__call__
        self.lane = FastLane(app, self.framework)

    async def __call__(self, scope, receive, send) -> None:
        if self.app.fast_lane and (scope["method"], scope["path"]) in LANE_ROUTES:
            return await self.lane(scope, receive, send)
        return await self.framework(scope, receive, send)


def _without_telemetry() -> dict:
    """FastAPI >= 0.165 asks OpenTelemetry for its providers on every request (4% of the API
    process's CPU under load, py-spy); the server has its own Prometheus metrics and access
    log, so that is turned off where the option exists."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _add_stream_schemas(app: FastAPI) -> None:
    """FastAPI puts in the components only the models of JSON bodies; the stream events'
    models are added to the document it generates (once, then cached like FastAPI's)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = add_component_schemas(generate(), STREAM_EVENT_MODELS)
        return app.openapi_schema

    app.openapi = openapi
