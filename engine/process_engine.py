"""ProcessEngine: the engine loop in its own process, so that it never waits for the GIL.

``AsyncEngine`` runs the engine loop in a thread of the caller's process: the HTTP event
loop and the model's Python code then take turns on one interpreter lock, and a server
uses about one core whatever the machine has. ``ProcessEngine`` has the same interface
(``start``, ``generate``, ``abort``, ``make_request``, ``shutdown``, ``is_healthy``,
``accepting``, ``num_waiting``, ``num_running``, ``on_step``) and runs the loop in a child
process (vLLM's engine-core process, in miniature):

- the parent validates and tokenizes (``make_request``, with ``Engine.frontend``: the
  tokenizer and the limits, no weights) and sends each ``Request`` to the child over a
  pipe;
- the child owns the model and the KV cache (``Engine.from_pretrained(path, **config)``)
  and after every step sends that step's ``RequestOutput`` list, its ``StepStats`` and its
  queue counts in one message;
- a reader thread of the parent receives them (unpickling is all it does; blocking reads
  on a pipe of their own, whatever event loop the caller runs) and hands each step's
  outputs to the event loop in one call.

Errors: a request the child refuses gets the exception; if the child dies, every waiting
caller gets ``EngineDeadError`` and ``is_healthy`` turns false. Aborts and the ``drain``
of ``shutdown`` behave as in ``AsyncEngine``. The cost: each step's outputs are pickled
once, and start-up spawns a Python process. The child also detokenizes: moving that to the
parent (vLLM's split) was measured here and cost more CPU per request (7.7 against 6.8 ms
over HTTP), the parent's interpreter lock being the one the HTTP work needs. This module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import threading
from typing import Callable

from engine.async_engine import EngineDeadError, RequestStreams
from engine.core import StepStats
from engine.output import RequestOutput
from engine.request import Request
from engine.sync_engine import Engine

log = logging.getLogger(__name__)


def _child_main(inbox, conn, path: str, config: dict, torch_threads: int | None) -> None:
    """The engine loop of the child process: add, abort, step, report. ``inbox``: the
    parent's messages; ``conn``: this process's reports."""
    import signal

    # Ctrl-C reaches the whole process group: the parent drains and then stops this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        engine = Engine.from_pretrained(path, **config)
    except BaseException as e:  # the parent reports it and fails its start
        conn.send(("dead", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    added = 0
    try:
        while True:
            if inbox.poll(0 if engine.has_unfinished() else 0.5):
                while inbox.poll():
                    kind, payload = inbox.recv()
                    if kind == "stop":
                        return
                    if kind == "abort":
                        engine.abort(payload)
                        continue
                    added += 1
                    try:
                        engine.add_request(payload)
                    except Exception as e:  # validated in the parent: unexpected
                        conn.send(("failed", (payload.request_id, e)))
            if engine.has_unfinished():
                outputs = [_pack(out) for out in engine.step()]
                scheduler = engine.core.scheduler
                conn.send(("step", (outputs, engine.core.last_stats, added, scheduler.num_waiting,
                                    scheduler.num_running)))
    except BaseException as e:  # the loop must never die silently
        log.exception("engine process crashed")
        try:
            conn.send(("dead", f"{type(e).__name__}: {e}"))
        except Exception:
            pass


# A step's outputs travel as tuples of their fields, without the prompt's ids, which the
# parent has (packed, pickled, unpickled and rebuilt in 0.09 ms for 64 outputs, against
# 0.16 ms for pickling the dataclasses themselves).
_FIELDS = [f.name for f in dataclasses.fields(RequestOutput)]
_PROMPT = _FIELDS.index("prompt_token_ids")


def _pack(out: RequestOutput) -> tuple:
    values = [getattr(out, name) for name in _FIELDS]
    values[_PROMPT] = None
    return tuple(values)


class ProcessEngine(RequestStreams):
    def __init__(self, path, config: dict, max_queue: int = 256, torch_threads: int | None = None,
                 on_step: Callable[[StepStats], None] | None = None):
        """``path``: the checkpoint; ``config``: ``Engine.from_pretrained`` keyword arguments
        (device, dtype and ``EngineConfig`` fields) for the child's engine."""
        self.path = str(path)
        self.config = dict(config)
        self.max_queue = max_queue
        self.torch_threads = torch_threads
        self.on_step = on_step
        self.engine = Engine.frontend(self.path, max_seq_len=self.config.get("max_seq_len"))
        self._streams: dict[str, asyncio.Queue] = {}
        self._prompts: dict[str, list[int]] = {}
        self._process = None
        self._conn = None           # parent -> child
        self._reports = None        # child -> parent, read by the reader thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: str | None = None
        self._accepting = False
        self._stopping = False
        self._sent = 0              # requests sent to the child
        self._added = 0             # ... that it has added to its scheduler
        self._waiting = 0
        self._running = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        child_inbox, self._conn = context.Pipe(duplex=False)
        self._reports, child_reports = context.Pipe(duplex=False)
        self._process = context.Process(target=_child_main, name="engine-process", daemon=True,
                                        args=(child_inbox, child_reports, self.path, self.config,
                                              self.torch_threads))
        self._process.start()
        child_inbox.close()
        child_reports.close()
        try:
            kind, payload = await self._loop.run_in_executor(None, self._reports.recv)
        except EOFError:
            kind, payload = "dead", "it exited while loading the model"
        if kind != "ready":
            self._fatal = payload
            raise EngineDeadError(f"the engine process did not start: {payload}")
        threading.Thread(target=self._read_reports, name="engine-process-reader", daemon=True).start()
        self._accepting = True

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with ``drain`` wait for in-flight requests, then stop the child."""
        self._accepting = False
        if drain:
            await self._drain(timeout)
        if self._process is None:
            return
        self._stopping = True
        if self._process.is_alive():
            try:
                self._conn.send(("stop", None))
            except OSError:
                pass
            await self._loop.run_in_executor(None, self._process.join, 10)
        if self._process.is_alive():
            self._process.kill()

    @property
    def is_healthy(self) -> bool:
        return self._process is not None and self._process.is_alive() and self._fatal is None

    @property
    def num_waiting(self) -> int:
        return (self._sent - self._added) + self._waiting

    @property
    def num_running(self) -> int:
        return self._running

    # ------------------------------------------------------------ requests

    def abort(self, request_id: str) -> None:
        if self.is_healthy:
            try:
                self._conn.send(("abort", request_id))
            except OSError:
                pass

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._prompts.pop(request_id, None)

    def _submit(self, request: Request) -> asyncio.Queue:
        self._check_admission(request)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = stream
        self._prompts[request.request_id] = request.prompt_token_ids
        self._conn.send(("add", request))
        self._sent += 1
        return stream

    # ------------------------------------------------------------ the reports

    def _read_reports(self) -> None:
        """The reader thread: one blocking receive after another, each handed to the loop."""
        while True:
            try:
                message = self._reports.recv()
            except (EOFError, OSError) as e:  # the child is gone
                message = ("exited", f"the engine process exited ({type(e).__name__})")
            try:
                self._loop.call_soon_threadsafe(self._on_report, message)
            except RuntimeError:   # the event loop is closed
                return
            if message[0] in ("dead", "exited"):
                return

    def _on_report(self, message) -> None:
        kind, payload = message
        if kind == "step":
            self._on_step(*payload)
        elif kind == "failed":
            request_id, error = payload
            self._put(request_id, error)
        elif kind == "dead" or (kind == "exited" and not self._stopping):
            self._die(payload)

    def _on_step(self, outputs: list[tuple], stats: StepStats, added: int, waiting: int,
                 running: int) -> None:
        self._added, self._waiting, self._running = added, waiting, running
        for values in outputs:
            out = RequestOutput(*values)
            out.prompt_token_ids = self._prompts.get(out.request_id, [])
            self._put(out.request_id, out)
        if self.on_step is not None:
            try:
                self.on_step(stats)
            except Exception:
                log.exception("on_step callback failed")

    def _put(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _die(self, reason: str) -> None:
        log.error("engine process failed: %s", reason)
        self._fatal = reason
        dead = EngineDeadError(f"the engine process failed: {reason}")
        for request_id in list(self._streams):
            self._put(request_id, dead)
