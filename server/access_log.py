"""Structured logging: one JSON object per line.

``log_request(fields)`` writes the access-log line of one HTTP request (logger
``server.access``): request id, method, route, status, duration, client, and for
generations the engine request id, prompt tokens, latent thoughts, completion tokens and
finish reason. ``configure(level)`` makes every logger of the process write JSON lines
to stderr (uvicorn's own loggers included), so log shippers need one parser.
"""

from __future__ import annotations

import json
import logging
import sys

access_log = logging.getLogger("server.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        else:
            payload["message"] = record.getMessage()
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Our access line replaces uvicorn's (which knows neither request ids nor tokens).
    logging.getLogger("uvicorn.access").disabled = True
    access_log.setLevel(logging.INFO)


def log_request(fields: dict) -> None:
    fields = {"event": "request", **fields}
    access_log.info("request", extra={"fields": fields})
