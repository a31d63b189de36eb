"""AsyncEngine: one background thread owns the model; asyncio callers submit and stream.

    engine = AsyncEngine(Engine.from_pretrained(path), max_queue=256)
    await engine.start()
    async for out in engine.generate(question, sampling, latent):   # RequestOutput snapshots
        print(out.delta, end="")

Contract:

- ``generate`` validates and tokenizes before anything is queued: bad input raises
  ``ValueError`` (``RequestTooLongError`` when it can never fit), a full waiting queue
  raises ``EngineOverloadedError``, a stopped engine ``EngineDeadError``.
- Every request added shares the loop thread's forward passes with all others running.
- Leaving the ``async for`` early (client disconnect, cancellation) aborts the request;
  its batch slot is freed at the next engine step.
- A request with ``sampling.n`` > 1 streams the outputs of all its answers, interleaved
  (``RequestOutput.index`` says whose); the iterator ends when every answer has.
- A failing step fails only the requests in it (finish_reason ``error``); if the loop
  thread itself dies, ``is_healthy`` turns false and waiting callers get ``EngineDeadError``.
- ``shutdown(drain=True)`` stops accepting, lets running requests finish, then stops.

``on_step`` (optional) is called in the loop thread after every step with the core's
``StepStats``, for metrics. This module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

from engine.core import StepStats
from engine.sync_engine import Engine
from engine.output import RequestOutput
from engine.params import LatentPolicy, SamplingParams
from engine.request import Request

log = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; retry later."""


class EngineDeadError(RuntimeError):
    """The engine loop is not running (stopped, or crashed)."""


class EngineCrashedError(EngineDeadError):
    """The engine loop (or its process) died while this request was in it."""


class RequestStreams:
    """What ``AsyncEngine`` and ``engine.process_engine.ProcessEngine`` share: validation in
    the caller's thread and one asyncio queue of outputs per request. A subclass provides
    ``engine`` (validates and tokenizes), ``_streams``, ``_submit(request) -> queue`` and
    ``abort(request_id)``."""

    engine: Engine
    max_queue: int
    _streams: dict[str, asyncio.Queue]
    _accepting: bool
    is_healthy: bool
    #: True while a dead engine is being replaced (``ProcessEngine`` with a restart policy);
    #: ``unavailable_reason`` then says why requests are refused.
    restarting: bool = False
    unavailable_reason: str | None = None

    def make_request(self, question: str, sampling: SamplingParams | None = None,
                     latent: LatentPolicy | None = None, request_id: str | None = None) -> Request:
        """Validate, tokenize and check the length limit (raises ValueError)."""
        request = self.engine.make_request(question, sampling, latent, request_id)
        self.engine.core.check_fits(request)
        return request

    async def generate(self, question: str | Request, sampling: SamplingParams | None = None,
                       latent: LatentPolicy | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        request = question if isinstance(question, Request) else self.make_request(
            question, sampling, latent, request_id)
        stream = self._submit(request)
        # n > 1: the outputs of every answer (``RequestOutput.index``) come on this one stream
        unfinished = {member.request_id for member in request.members}
        try:
            while unfinished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield item
        finally:
            for member in request.members:
                self._forget(member.request_id)
            for request_id in unfinished:
                self.abort(request_id)

    @property
    def accepting(self) -> bool:
        return self._accepting and self.is_healthy

    async def _drain(self, timeout: float | None) -> None:
        """Wait until every stream has ended (or the engine failed, or ``timeout`` passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._streams and self.is_healthy:
            if deadline is not None and time.monotonic() > deadline:
                return
            await asyncio.sleep(0.02)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _check_admission(self, request: Request) -> None:
        """Raise if the request cannot be queued now (engine down, queue full, id in use)."""
        if not self.accepting:
            raise EngineDeadError("the engine is not accepting requests (shutting down or failed)")
        if self.num_waiting >= self.max_queue:
            raise EngineOverloadedError(f"the waiting queue is full ({self.max_queue} requests)")
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")

    def _submit(self, request: Request) -> asyncio.Queue:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError


class AsyncEngine(RequestStreams):
    def __init__(self, engine: Engine, max_queue: int = 256,
                 on_step: Callable[[StepStats], None] | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.on_step = on_step
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: BaseException | None = None
        self._pending = 0           # submitted, not yet admitted into the batch
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with ``drain`` wait for in-flight requests, then stop the loop."""
        self._accepting = False
        if drain:
            await self._drain(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    @property
    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._fatal is None

    @property
    def num_waiting(self) -> int:
        return self._pending + self.engine.core.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.engine.core.scheduler.num_running

    # ------------------------------------------------------------ requests

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _submit(self, request: Request) -> asyncio.Queue:
        with self._lock:
            self._check_admission(request)
            self._pending += 1
        stream: asyncio.Queue = asyncio.Queue()
        for member in request.members:
            self._streams[member.request_id] = stream
        self._inbox.put(request)
        self._wake.set()
        return stream

    # ------------------------------------------------------------ loop thread

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)

    def _publish(self, items: list[tuple[str, object]]) -> None:
        """Hand items to the event loop: one wake-up per call, however many items."""
        if items:
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _admit_inbox(self) -> None:
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self._pending -= 1
            try:
                self.engine.add_request(request)
            except Exception as e:  # validated already; anything here is unexpected
                self._publish([(request.request_id, e)])

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._admit_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._publish([(out.request_id, out) for out in self.engine.step()])
                if self.on_step is not None:
                    try:
                        self.on_step(self.engine.core.last_stats)
                    except Exception:
                        log.exception("on_step callback failed")
        except BaseException as e:  # the loop must never die silently
            log.exception("engine loop crashed")
            self._fatal = e
            dead = EngineCrashedError(f"the engine loop crashed: {type(e).__name__}: {e}")
            self._publish([(request_id, dead) for request_id in list(self._streams)])
