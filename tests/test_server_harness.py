"""Helpers for the server tests (this module holds no tests itself).

- ``InProcessServer``: the real app under real uvicorn on 127.0.0.1, in a thread of the
  test process, so a test can reach into the engine (inject a fault with monkeypatch)
  without any test-only hook in the server. Cheap to start: torch is imported already.
- ``read_metrics``: the server's Prometheus samples as ``{"name{labels}": value}``.
- ``sse_payloads``: the ``data:`` payloads of an SSE body, ``[DONE]`` included.
- ``wait_for``: poll a condition with a generous deadline (no timing assertions).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessServer:
    def __init__(self, model_dir: str | Path, engine=None, **settings):
        from server.settings import ServerSettings

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = ServerSettings(model=Path(model_dir), host="127.0.0.1", port=self.port,
                                       device="cpu", dtype="float32", **settings)
        self.engine = engine
        self.app = None
        self.server = None
        self.thread = None

    @property
    def async_engine(self):
        return self.app.state.engine

    def __enter__(self) -> "InProcessServer":
        import uvicorn

        from server.app import create_app

        self.app = create_app(self.settings, engine=self.engine)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                access_log=False, lifespan="on", timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), timeout=120,
                 what="uvicorn to start")
        if not self.server.started:
            raise RuntimeError("the in-process server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def read_metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=headers or {}).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def finished_count(url: str, reason: str) -> float:
    """coconut_requests_finished_total for one finish reason (0 before the first)."""
    return read_metrics(url).get(f'coconut_requests_finished_total{{reason="{reason}"}}', 0)


def post_on_raw_socket(port: int, path: str, body: dict) -> socket.socket:
    """Send a JSON POST on a bare socket and return it unread, so that a test can drop the
    connection mid-request (a client that goes away)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))
    return sock


def sse_payloads(body: str) -> list:
    """Each ``data:`` payload, decoded from JSON (``"[DONE]"`` stays a string)."""
    out = []
    for block in body.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(condition, timeout: float = 60.0, interval: float = 0.02, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def one_thread_server(model_dir, **settings):
    """An ``InProcessServer`` with this process's torch on one thread while it runs (small
    models on a busy 2-core machine), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with InProcessServer(model_dir, **settings) as live:
            yield live
    finally:
        torch.set_num_threads(threads)
