"""The test harness's own contract: ``LiveServer`` moves to a fresh port when another process
holds the one it picked (the Ray tests failed in CI when HAProxy found its port taken).

The uvicorn case is real: a socket in this test listens on the port first. The Ray proxy and
HAProxy cases use those processes' own log lines, copied from failed runs.
"""

from __future__ import annotations

import socket

import httpx

from tests import conftest
from tests.live_server import LEFT_BY_ERROR, RUNNING, LiveServer, port_was_taken

HAPROXY_LINE = ("[ALERT]    (21417) : Binding [/tmp/haproxy-serve/cfbac4/haproxy.cfg:50] for frontend "
                "http_frontend: cannot bind socket (Address already in use) for [127.0.0.1:42883]")
RAY_PROXY_LINE = "Failed to bind to address '127.0.0.1:42883'."


def test_each_listeners_bind_failure_is_recognised_and_only_for_its_own_port():
    assert port_was_taken(HAPROXY_LINE, 42883)
    assert port_was_taken(RAY_PROXY_LINE, 42883)
    assert port_was_taken("[Errno 98] error while attempting to bind on address ('127.0.0.1', 42883): "
                          "address already in use", 42883)
    assert not port_was_taken(HAPROXY_LINE, 42884)
    assert not port_was_taken("RuntimeError: model directory 42883 not found", 42883)


def test_a_server_whose_port_is_held_starts_on_another():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        live = LiveServer(None, "--max-batch-size", "2")
        live.port, live.url = held, f"http://127.0.0.1:{held}"
        with live:
            assert live.port != held
            assert httpx.get(live.url + "/ready", timeout=10).status_code == 200


class _Report:
    def __init__(self, failed: bool):
        self.failed, self.sections = failed, []


class _Outcome:
    def __init__(self, report):
        self.report = report

    def get_result(self):
        return self.report


def _report_through_the_hook(failed: bool) -> _Report:
    hook = conftest.pytest_runtest_makereport(item=None, call=None)
    next(hook)
    report = _Report(failed)
    try:
        hook.send(_Outcome(report))
    except StopIteration:
        pass
    return report


def test_a_failed_tests_report_carries_the_running_servers_log_tail():
    server = LiveServer(None)          # not started: its log is written here
    server.log.write("".join(f"line {i}\n" for i in range(100)))
    RUNNING.append(server)
    try:
        failed = _report_through_the_hook(failed=True)
        passed = _report_through_the_hook(failed=False)
    finally:
        RUNNING.remove(server)
        server.__exit__(None, None, None)
    assert passed.sections == []
    [(title, text)] = failed.sections
    assert server.url in title
    assert text.splitlines() == [f"line {i}" for i in range(60, 100)]


def test_a_server_an_exception_stopped_is_reported_with_the_next_failure_only():
    server = LiveServer(None)
    server.log.write("the server's last words\n")
    server.__exit__(AssertionError, AssertionError("x"), None)     # as a failing ``with`` block does
    assert [url for url, _ in LEFT_BY_ERROR] == [server.url]
    [(title, text)] = _report_through_the_hook(failed=True).sections
    assert server.url in title and text == "the server's last words"
    assert LEFT_BY_ERROR == [] and _report_through_the_hook(failed=True).sections == []
