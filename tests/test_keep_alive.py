"""Idle keep-alive connections: the server holds them longer than clients do.

A client pool (httpx, and so the openai SDK) reuses an idle connection for up to 5 s. Had the
server closed idle connections after 5 s too (uvicorn's default), a request sent on one just
as the server closed it would fail with a ReadError: seen in CI, where 1000 requests from one
client on a 2-core machine left part of its 64-connection pool idle for 5 s
(``test_bundled_model``). The server's ``--keep-alive-timeout-s`` (default 90 s, as Ray Serve's
own proxy) sets how long. Both cases here use a raw socket, so no client pool hides a closed
connection by opening a new one.
"""

from __future__ import annotations

import socket
import time

import httpx

from server.settings import ServerSettings
from tests.live_server import LiveServer

REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _ask(sock: socket.socket) -> bytes:
    """Send one GET on ``sock`` and read its whole response (headers and a Content-Length body);
    ``b""`` when the server had closed the connection."""
    sock.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_the_default_outlasts_the_idle_expiry_of_httpx_and_the_openai_sdk():
    assert ServerSettings().keep_alive_timeout_s > httpx.Limits().keepalive_expiry


def test_an_idle_connection_is_reused_after_a_clients_5_s_expiry():
    with LiveServer(None, "--max-batch-size", "2") as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        assert _ask(sock).startswith(b"HTTP/1.1 200")
        time.sleep(httpx.Limits().keepalive_expiry + 1.0)
        assert _ask(sock).startswith(b"HTTP/1.1 200"), "the server closed an idle connection within 6 s"


def test_the_flag_sets_when_the_server_closes_an_idle_connection():
    with LiveServer(None, "--max-batch-size", "2", "--keep-alive-timeout-s", "2") as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        assert _ask(sock).startswith(b"HTTP/1.1 200")
        assert not _closed_by_server(sock, within_s=1.0)       # still open after 1 s idle
        assert _closed_by_server(sock, within_s=3.0)           # closed by 4 s idle
