"""``engine serve``: run the HTTP server (uvicorn) around one engine.

Every ``ServerSettings`` field is a flag (``max_batch_size`` -> ``--max-batch-size``)
and an environment variable (``COCONUT_MAX_BATCH_SIZE``); a flag wins over the
environment. SIGTERM (or Ctrl-C) stops accepting connections, lets the in-flight
requests finish (up to ``--drain-timeout-s``), stops the engine and exits 0. An engine
process that keeps dying (more than ``--max-engine-restarts`` times within
``--engine-restart-window-s``) makes the server stop and exit 4 (``ENGINE_FAILED``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import typing

from server.settings import LOG_LEVELS, ServerSettings

log = logging.getLogger(__name__)

_INT_FIELDS = {"port", "max_batch_size", "max_queue", "max_seq_len", "max_prefill_tokens", "seed",
               "max_body_bytes", "retry_after_s", "torch_threads", "replicas",
               "autoscale_target_ongoing_requests", "max_engine_restarts", "keep_alive_timeout_s"}
_FLOAT_FIELDS = {"prefill_delay_factor", "drain_timeout_s", "num_gpus_per_replica", "engine_restart_window_s", "engine_restart_backoff_s"}
_DEST = "serve_"
ENGINE_FAILED = 4   # the exit status when the engine process kept dying  # the global `engine --log-level` already owns dest "log_level"


def _choices(name: str, annotation) -> tuple[str, ...] | None:
    if name == "log_level":
        return LOG_LEVELS
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP server (OpenAI-compatible + /v1/reason)",
                       description="Serve a COCONUT checkpoint over HTTP. Every flag can also be set "
                       "by an environment variable COCONUT_<FLAG> (e.g. COCONUT_PORT=9000).")
    for name, field in ServerSettings.model_fields.items():
        if field.annotation in (bool, bool | None):   # --compile / --no-compile
            p.add_argument("--" + name.replace("_", "-"), dest=_DEST + name, default=None,
                           action=argparse.BooleanOptionalAction, help=flag_help(name, field))
            continue
        kind = int if name in _INT_FIELDS else float if name in _FLOAT_FIELDS else str
        p.add_argument("--" + name.replace("_", "-"), dest=_DEST + name, type=kind, default=None,
                       choices=_choices(name, field.annotation), metavar=None if _choices(
                           name, field.annotation) else name.upper(),
                       help=flag_help(name, field))
    p.set_defaults(func=run)


#: What an unset setting means, for the settings whose description does not say it.
_UNSET = {"api_key": "no key, the API is open", "seed": "a random seed",
          "prefill_delay_factor": "2 for weights of 100 MiB or more, else 0",
          "compile": "where it pays"}


def flag_help(name: str, field) -> str:
    """The help of one setting's flag: its description, its default (unless the
    description already states it) and its environment variable ('%' escaped for argparse)."""
    text = (field.description or name.replace("_", " ")).replace("%", "%%")
    env = f"env COCONUT_{name.upper()}"
    if "(default:" in text:
        return f"{text} ({env})"
    if field.default is None:
        default = _UNSET.get(name, "unset")
    else:
        default = field.default
    return f"{text} (default: {default}; {env})"


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Flags given on the command line override the environment (pydantic-settings)."""
    from pydantic import ValidationError

    overrides = {name: getattr(args, _DEST + name) for name in ServerSettings.model_fields
                 if getattr(args, _DEST + name, None) is not None}
    try:
        return ServerSettings(**overrides)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"invalid server settings: {problems}") from None


def check_model(settings: ServerSettings) -> ServerSettings:
    """Before uvicorn starts: the model named, as a local directory that loads (its config,
    tokenizer and ``coconut.json`` checked, no weights read), or ``CheckpointError`` (a
    ``ValueError``: ``engine`` prints one line naming the model and the reason, and exits 2)."""
    from engine.checkpoint import load_checkpoint
    from engine.errors import CheckpointError
    from server.app import resolve_served_model

    spec = settings.model_spec()
    try:
        settings = resolve_served_model(settings)
        load_checkpoint(settings.model_spec(), weights=False, coconut=settings.coconut_overrides())
    except ValueError as e:
        message = str(e)
        raise CheckpointError(message if spec in message else f"--model {spec}: {message}") from None
    return settings


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.access_log import configure
    from server.app import create_app

    settings = settings_from_args(args)
    configure(settings.log_level)
    settings = check_model(settings)
    if settings.uses_ray():
        from server.ray_serve import serve_on_ray

        return serve_on_ray(settings)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.drain_timeout_s,
                            timeout_keep_alive=settings.keep_alive_timeout_s)
    server = uvicorn.Server(config)
    app = config.app
    app.state.exit_server = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully,
    # which under the default SIGTERM disposition would end the process with -15. A
    # drained shutdown is a success, so that re-raised SIGTERM is made a no-op.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if not server.started:
        log.error("the server did not start (see the errors above)")
        return 3
    if app.state.engine_failure is not None:
        log.error("server stopped: the engine process kept failing (%s)", app.state.engine_failure)
        return ENGINE_FAILED
    log.info("server stopped")
    return 0
