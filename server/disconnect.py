"""One watcher per request for the client's disconnect: ``DisconnectGuard``.

``guard_of(http)`` gives the request's guard (made on first use, kept in the ASGI scope's
state): one task that waits for ``http.disconnect``. ``await guard.run(awaitable)``
awaits in the caller's own task and, if the client leaves first, cancels that wait and
raises ``ClientDisconnected`` (the awaited generator's cleanup aborts the generation).
The same guard serves the wait for a stream's first output (``server.service``) and the
stream itself (``server.sse``), so a streamed request costs one extra task, where racing
the first output in two tasks and an ``asyncio.wait``, then Starlette's anyio task group for
the stream, cost three (about 7% of the API process's CPU under 64 streaming clients,
py-spy). ``close()`` stops the watcher; it also
ends by itself when the response is complete (the server then answers ``receive`` with a
disconnect).

It needs the request body read already (the next ASGI message is then the disconnect).
It knows nothing of the engine.
"""

from __future__ import annotations

import asyncio

from server.errors import ClientDisconnected

_KEY = "disconnect_guard"


class DisconnectGuard:
    def __init__(self, receive):
        self.disconnected = False
        self._guarded: set[asyncio.Task] = set()   # the tasks awaiting under run()
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        for task in self._guarded:
            task.cancel()

    async def run(self, awaitable):
        """``await awaitable``, or ``ClientDisconnected`` once the client has left. Several
        tasks may run under one guard at once (an OpenAI request with several prompts
        opens one stream per prompt); one task runs one awaitable at a time."""
        if self.disconnected:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise ClientDisconnected("the client disconnected; the request was aborted")
        task = asyncio.current_task()
        self._guarded.add(task)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if not self.disconnected:
                raise                   # cancelled from elsewhere (the server stopping)
            if hasattr(task, "uncancel"):
                task.uncancel()         # the cancel was ours, now answered
            raise ClientDisconnected("the client disconnected; the request was aborted") from None
        finally:
            self._guarded.discard(task)

    def close(self) -> None:
        self._watcher.cancel()


def guard_of(http) -> DisconnectGuard:
    """The guard of the request ``http`` (a Starlette ``Request``), made on first use."""
    state = http.scope.setdefault("state", {})
    guard = state.get(_KEY)
    if guard is None:
        guard = state[_KEY] = DisconnectGuard(http.receive)
    return guard
