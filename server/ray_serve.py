"""``engine serve --replicas N``: the same FastAPI app as N Ray Serve replicas.

Each replica is a Ray actor that builds the app with ``create_app(settings,
replica_name=...)``, so it loads its own engine in the app's lifespan exactly as the
single server does and drains it the same way when Ray stops the replica. Ray Serve's
proxy (one per node) takes the HTTP connections and routes each request to a lightly
loaded replica (power of two choices on ongoing requests). What this module adds:

- **Backpressure stays ours.** ``max_ongoing_requests`` is set well above what one engine
  holds (``max_batch_size + max_queue``), so Ray never parks requests in its own queue: a
  replica whose queue is full answers the server's usual 503 with ``Retry-After``, and the
  router only picks a full replica when the others are full too.
- **Replica identity.** Every response carries ``x-coconut-replica`` (Ray's replica tag);
  ``/ready`` reports it.
- **Metrics.** Each replica pushes its Prometheus text every ``PUSH_PERIOD_S`` to one small
  named actor (``MetricsHub``); ``/metrics``, served by whichever replica Ray picks,
  returns every live replica's samples, each labelled ``replica``
  (``server.metrics_merge``). A replica silent for ``STALE_AFTER_S`` drops out.
- **Health.** Ray calls ``check_health`` on each replica; once its engine loop has died
  the replica reports unhealthy and Ray replaces it (as it replaces a killed one).
- **Autoscaling.** ``--autoscale MIN:MAX`` hands Ray Serve an autoscaling config whose
  target is ``--autoscale-target-ongoing-requests`` (default: ``max_batch_size``).
- **Ingress.** ``--ray-ingress proxy`` (default) is Ray Serve's Python proxy;
  ``haproxy`` switches on Ray's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY``, a feature
  flag of Ray 2.60), which forwards HTTP to the replicas with far less work per request
  (``engine bench replicas`` measures both).
- **Shutdown.** SIGTERM / SIGINT delete the application: Ray stops routing to it, waits
  up to ``drain_timeout_s`` for the ongoing requests of every replica, then each app's
  lifespan drains its engine; the process exits 0.

Ray is imported only here and only when asked for; without the extra, asking for
replicas is a ``RuntimeError`` naming it. On a remote cluster (``--ray-address``) every
node must have this package installed (the container image, or a runtime_env); this
module does not ship code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time

from server.app import create_app
from server.metrics_merge import merge_expositions
from server.settings import ServerSettings

log = logging.getLogger(__name__)

RAY_EXTRA_HINT = ('Ray Serve is not installed; --replicas, --autoscale and --ray-address need the optional '
                  'extra: pip install -e ".[ray]"')
APP_NAME = "coconut"
DEPLOYMENT_NAME = "coconut"
NAMESPACE = "coconut"
HUB_NAME = "coconut-metrics-hub"
PUSH_PERIOD_S = 2.0
STALE_AFTER_S = 10.0
#: Ray Serve's proxy checks (5 s / 10 s by default) fail on a small machine whose cores are
#: busy, and Ray then kills the proxy it has just started; a local cluster gets these.
PATIENT_PROXY_CHECKS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def require_ray():
    """(ray, ray.serve), or a ``RuntimeError`` that names the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RuntimeError(RAY_EXTRA_HINT) from None
    return ray, serve


class MetricsHub:
    """The latest metrics text of every replica (run as one named Ray actor)."""

    def __init__(self):
        self.latest: dict[str, tuple[float, str]] = {}

    def push(self, replica: str, text: str) -> None:
        self.latest[replica] = (time.monotonic(), text)

    def drop(self, replica: str) -> None:
        self.latest.pop(replica, None)

    def collect(self) -> dict[str, str]:
        now = time.monotonic()
        self.latest = {r: (t, text) for r, (t, text) in self.latest.items() if now - t < STALE_AFTER_S}
        return {r: text for r, (_, text) in self.latest.items()}


class CoconutReplica:
    """One replica: the server's app around its own engine (wrapped by ``serve.ingress()``
    and ``serve.deployment`` in ``build_application``)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.coconut_app = None   # ASGIAppReplicaWrapper owns the name `app`

    def __serve_build_asgi_app__(self):
        import ray
        from ray import serve

        name = serve.get_replica_context().replica_tag
        # a replica is a process of its own already: its engine runs in it (no child process)
        app = create_app(self.settings.model_copy(update={"engine_process": False}), replica_name=name)
        hub = metrics_hub(ray)

        async def render_metrics() -> bytes:
            own = app.state.metrics.render().decode()
            await hub.push.remote(name, own)
            texts = await hub.collect.remote()
            texts[name] = own
            return merge_expositions(dict(sorted(texts.items()))).encode()

        async def push_forever() -> None:
            while True:
                with contextlib.suppress(Exception):   # the hub may be restarting; try again later
                    await hub.push.remote(name, app.state.metrics.render().decode())
                await asyncio.sleep(PUSH_PERIOD_S)

        inner = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a):
            async with inner(a) as state:
                task = asyncio.create_task(push_forever())
                try:
                    yield state
                finally:
                    task.cancel()
                    with contextlib.suppress(Exception):
                        await hub.drop.remote(name)

        app.router.lifespan_context = lifespan
        app.state.render_metrics = render_metrics
        self.coconut_app = app
        return app

    def check_health(self) -> None:
        app = self.coconut_app
        engine = getattr(app.state, "engine", None) if app is not None else None
        if engine is not None and not engine.is_healthy:
            raise RuntimeError("the engine loop has stopped")


def metrics_hub(ray):
    """The cluster's one ``MetricsHub`` actor, started by whoever asks first (the
    ``engine serve`` driver, or a replica deployed from a config with no driver)."""
    return ray.remote(MetricsHub).options(name=HUB_NAME, namespace=NAMESPACE, get_if_exists=True,
                                          num_cpus=0, lifetime="detached").remote()


def deployment_options(settings: ServerSettings) -> dict:
    """Ray Serve deployment options for these settings (see the module docstring)."""
    per_replica = settings.max_batch_size + settings.max_queue
    options = {
        "ray_actor_options": {"num_cpus": settings.torch_threads or 1,
                              "num_gpus": settings.num_gpus_per_replica},
        "max_ongoing_requests": 4 * per_replica,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
        "health_check_period_s": 5.0,
    }
    bounds = settings.autoscale_bounds()
    if bounds is not None:
        low, high = bounds
        options["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": high,
            "initial_replicas": max(low, min(high, settings.replicas or low or 1)),
            "target_ongoing_requests": settings.autoscale_target_ongoing_requests or settings.max_batch_size,
        }
    else:
        options["num_replicas"] = settings.replicas or 1
    return options


def build_application(settings: ServerSettings):
    _, serve = require_ray()
    ingress = serve.ingress()(CoconutReplica)
    deployment = serve.deployment(ingress, name=DEPLOYMENT_NAME, **deployment_options(settings))
    return deployment.bind(settings)


def app_builder(args: dict):
    """The application for a Ray Serve config file (``serve run`` / ``serve deploy`` /
    KubeRay's ``serveConfigV2``): ``import_path: server.ray_serve:app_builder`` with
    ``args`` holding server settings by field name (``replicas``, ``max_batch_size``,
    ``model``, ...); unset ones come from the ``COCONUT_*`` environment of the process that
    builds the application (the Serve controller; give head and workers the same env)."""
    return build_application(ServerSettings(**(args or {})))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _kill_leftover_haproxy(node_id: str) -> None:
    """Ray 2.60's HAProxy manager can lose track of a process it started by a reload (after
    a replica changes) and leave it running, holding its ports, once the cluster is gone.
    Kill this node's (their config lives under ``.../haproxy-serve/<node id>/``)."""
    marker = f"/haproxy-serve/{node_id}/".encode()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"haproxy" in cmdline and marker in cmdline:
                os.kill(int(entry), signal.SIGKILL)
                log.warning("killed a leftover HAProxy process (pid %s)", entry)
        except (OSError, ValueError):
            continue


def serve_on_ray(settings: ServerSettings) -> int:
    """Deploy on Ray Serve and block until SIGTERM / SIGINT; the process's exit status."""
    ray, serve = require_ray()
    for name, value in PATIENT_PROXY_CHECKS.items():   # inherited by a local cluster's processes
        os.environ.setdefault(name, value)
    if settings.ray_ingress == "haproxy":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        if settings.ray_address is None:   # a local cluster: HAProxy's side ports need not be 9101 / 8404
            for name in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"):
                os.environ.setdefault(name, str(_free_port("127.0.0.1")))
    ray.init(address=settings.ray_address, namespace=NAMESPACE, log_to_driver=True)
    port = settings.port or _free_port(settings.host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": port,
                                  "keep_alive_timeout_s": settings.keep_alive_timeout_s})
        metrics_hub(ray)
        started = time.perf_counter()
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        replicas = settings.autoscale or settings.replicas
        log.info("Ray Serve: %s replicas of %s ready in %.1f s; listening on http://%s:%d",
                 replicas, settings.served_model_name or settings.model_spec(), time.perf_counter() - started, settings.host, port)
        node_id = ray.get_runtime_context().get_node_id()
        stop.wait()
        log.info("shutting down: draining every replica (up to %.0f s)", settings.drain_timeout_s)
        # bounded: if Ray's own processes were stopped too (a SIGTERM sent to the whole
        # process group reaches a local cluster's processes), the delete would wait forever
        drained = threading.Thread(target=lambda: (serve.delete(APP_NAME), serve.shutdown()), daemon=True)
        drained.start()
        drained.join(settings.drain_timeout_s + 30)
        if drained.is_alive():
            log.error("Ray did not finish the shutdown within %.0f s (were its processes stopped too? send "
                      "SIGTERM to this process only, not to its process group)", settings.drain_timeout_s + 30)
            os._exit(1)
        if settings.ray_ingress == "haproxy" and settings.ray_address is None:
            _kill_leftover_haproxy(node_id)
        return 0
    except Exception as e:   # a replica that cannot start (bad model, no resources) ends here
        log.error("Ray Serve deployment failed: %s", e)
        return 3
    finally:
        ray.shutdown()
