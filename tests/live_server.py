"""Start the real server (``engine serve``) as a subprocess on 127.0.0.1 for tests.

    with LiveServer(model_dir, "--max-batch-size", "8") as server:
        httpx.get(server.url + "/ready")

``model_dir=None`` leaves ``--model`` out (the bundled default model). The server gets a free port
(another one, up to three times, when a process took it before the server bound it), its output
goes to a log file (shown when it fails to start), and leaving the block sends SIGTERM and waits
for a clean exit. Extra
environment variables can be passed with ``env``. While a server runs it is in ``RUNNING``:
when a test fails, ``tests/conftest.py`` adds the tail of each running server's log to the
failure report, and of each one an exception stopped (``LEFT_BY_ERROR``), so a server-side
cause, or its absence, shows in CI's output.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """The server could not bind its port: another process took it first."""


# how each listener says its port was taken: uvicorn ("[Errno 98] ... address already in use"),
# Ray Serve's proxy ("Failed to bind"), Ray's HAProxy ingress ("cannot bind socket (Address
# already in use)")
_BIND_FAILURES = ("address already in use", "failed to bind", "cannot bind socket")


def port_was_taken(output: str, port: int) -> bool:
    """Whether a server's log says it could not bind ``port`` (not some other failure)."""
    lowered = output.lower()
    return str(port) in output and any(failure in lowered for failure in _BIND_FAILURES)


#: the servers started and not yet stopped, for the failure report's log tails
RUNNING: list["LiveServer"] = []
#: (url, log tail) of servers whose ``with`` block an exception left, until the next report
LEFT_BY_ERROR: list[tuple[str, str]] = []


class LiveServer:
    def __init__(self, model_dir: str | Path | None, *args: str, env: dict[str, str] | None = None,
                 startup_timeout: float = 120.0):
        self.model_dir = None if model_dir is None else Path(model_dir)  # None: the server's default
        self.args = list(args)
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log", delete=False)

    def __enter__(self) -> "LiveServer":
        for attempt in range(3):
            try:
                self._start()
                break
            except PortTaken:
                # free_port() released the port before the server bound it, and another process
                # (Ray starts many) took it in between: try again on a fresh port
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                self.log.seek(0)
                self.log.truncate()
        else:
            self._start()
        RUNNING.append(self)     # once ready: a failed start's own error carries the log
        return self

    def _start(self) -> "LiveServer":
        model = [] if self.model_dir is None else ["--model", str(self.model_dir)]
        cmd = [sys.executable, "-m", "engine.cli", "serve", *model,
               "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                if port_was_taken(output, self.port):
                    raise PortTaken(self.port)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{output}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {self.startup_timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's output so far."""
        return "\n".join(self.output().splitlines()[-lines:])

    def __exit__(self, *exc) -> None:
        if self in RUNNING:
            RUNNING.remove(self)
        self.stop()
        if exc[0] is not None:
            try:
                LEFT_BY_ERROR.append((self.url, self.tail()))
            except OSError:
                pass
        self.log.close()
        os.unlink(self.log.name)
