"""ProcessEngine: the engine loop in its own process, so that it never waits for the GIL.

``AsyncEngine`` runs the engine loop in a thread of the caller's process: the HTTP event
loop and the model's Python code then take turns on one interpreter lock, and a server
uses about one core whatever the machine has. ``ProcessEngine`` has the same interface
(``start``, ``generate``, ``abort``, ``make_request``, ``shutdown``, ``is_healthy``,
``accepting``, ``num_waiting``, ``num_running``, ``on_step``) and runs the loop in a child
process (vLLM's engine-core process, in miniature):

- the parent validates and tokenizes (``make_request``, with ``Engine.frontend``: the
  tokenizer and the limits, no weights; the sequence limit is the one each child reports
  when it is ready, which its KV cache was sized for) and sends each ``Request`` to the
  child over a pipe;
- the child owns the model and the KV cache (``Engine.from_pretrained(path, **config)``)
  and after every step sends that step's ``RequestOutput`` list, its ``StepStats`` and its
  queue counts in one message;
- a reader thread of the parent receives them (unpickling is all it does; blocking reads
  on a pipe of their own, whatever event loop the caller runs) and hands each step's
  outputs to the event loop in one call.

Errors: a request the child refuses gets the exception; if the child dies, every waiting
caller gets ``EngineCrashedError`` at once and ``is_healthy`` turns false. Without a
``RestartPolicy`` it stays so; with one, a new child is started after a backoff (1 s, 2 s,
4 s, ... by default) while ``restarting`` is true and requests are refused, and serving
resumes by itself; more than ``max_restarts`` failures within ``window_s`` (a child that
dies or one that fails to load) give up: ``on_give_up(reason)`` is called and the engine
stays dead. Each failure is logged with the child's exit code or signal; ``on_restart`` is
called for every new child started. Aborts and the ``drain`` of ``shutdown`` behave as in
``AsyncEngine``. The cost: each step's outputs are pickled
once, and start-up spawns a Python process. The child also detokenizes: moving that to the
parent (vLLM's split) was measured here and cost more CPU per request (7.7 against 6.8 ms
over HTTP), the parent's interpreter lock being the one the HTTP work needs. This module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib.util
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Callable

from engine.async_engine import EngineCrashedError, EngineDeadError, RequestStreams
from engine.config import EngineConfig
from engine.core import StepStats
from engine.output import RequestOutput
from engine.request import Request
from engine.sync_engine import Engine

log = logging.getLogger(__name__)


def _logging_of_this_process() -> tuple[int, logging.Formatter | None] | None:
    """The root logger's level and its first handler's formatter, for a child to log as
    this process does (None where the formatter does not pickle, or nothing is set up)."""
    import pickle

    root = logging.getLogger()
    if not root.handlers:
        return None
    formatter = root.handlers[0].formatter
    try:
        pickle.dumps(formatter)
    except Exception:
        formatter = None
    return root.level, formatter


def _log_like_parent(setup: tuple[int, logging.Formatter | None] | None) -> None:
    """The child's records at the parent's level and in its format, to stderr (which the
    child shares with the parent): the engine's start-up lines (weights packed, KV cache,
    whether the step is compiled and why not) reach the server's log."""
    if setup is None:
        return
    level, formatter = setup
    handler = logging.StreamHandler(sys.stderr)
    if formatter is not None:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _child_main(inbox, conn, path: str, config: dict, torch_threads: int | None,
                log_setup: tuple[int, logging.Formatter | None] | None = None) -> None:
    """The engine loop of the child process: add, abort, step, report. ``inbox``: the
    parent's messages; ``conn``: this process's reports; ``log_setup``: the parent's
    logging (``_logging_of_this_process``)."""
    import signal

    _log_like_parent(log_setup)
    # Ctrl-C reaches the whole process group: the parent drains and then stops this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        from transformers.utils import logging as hf_logging

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        # no "Loading weights" bar in the server's log; and tqdm's lock is a named semaphore
        # that a killed child would leave behind until the server exits
        hf_logging.disable_progress_bar()
        engine = Engine.from_pretrained(path, **config)
    except BaseException as e:  # the parent reports it and fails its start
        conn.send(("dead", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", engine.max_seq_len))   # the limit its KV cache was sized for
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


#: libgomp busy-wait spins of the engine's OpenMP threads before they sleep (about 1 ms).
ENGINE_SPIN_COUNT = "100000"
#: glibc malloc settings of the engine's process (``GLIBC_TUNABLES``, unless set): blocks
#: up to 32 MiB come from the heap, and the heap is not trimmed back to the kernel.
ENGINE_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def engine_environment() -> dict[str, str]:
    """The variables the engine process runs under where the environment does not set them
    (``_context`` explains each): OpenMP threads that spin about a millisecond and then sleep,
    and glibc malloc keeping freed blocks. ``engine bench peers`` runs its floors under them
    too, so that the step it times is the step the server runs."""
    return {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": ENGINE_SPIN_COUNT,
            "GLIBC_TUNABLES": ENGINE_MALLOC_TUNABLES}


def _context(model_type: str | None = None):
    """Children come from a fork server that has imported the engine (torch, transformers and
    the checkpoint's modeling module) once, so a replacement child only loads the weights: on
    this project's shared 2-core machine those imports take 4-8 s, a tiny model's weights
    0.1 s. The fork server starts no threads and never touches CUDA before forking (it is
    started with the first child, so the preload list applies to this process's first
    checkpoint). Where there is no fork server (Windows): spawn."""
    # the engine's OpenMP threads sleep between steps instead of spinning against the API
    # process on the same cores, after spinning about a millisecond (libgomp's spins, ~100
    # per microsecond) so that they do not sleep between the forward's ~300 parallel
    # regions: SmolLM2-135M on 2 cores, 16 / 32 streams: 144.7-158.3 / 207.4-210.3 output
    # tok/s against 122.3-140.8 / 186.6-190.8 with no spin, pair by pair (read when the
    # child's OpenMP runtime loads: set before the fork server or a spawned child starts;
    # values the user set are kept)
    # glibc hands blocks over 128 KiB-32 MiB straight back to the kernel when freed, so every
    # step's activations (a prefill's [tokens, 1536] MLP states, the [rows, vocabulary]
    # logits) fault fresh zeroed pages in again: read at the child's start, these keep them
    # in the heap (what tcmalloc or jemalloc would do). SmolLM2-135M, a 704-token prefill on
    # 2 cores: 1.45 s against 1.95 s; a decode step did not change
    for name, value in engine_environment().items():
        os.environ.setdefault(name, value)
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    preload = ["engine.process_engine"]
    if model_type and model_type.isidentifier():
        module = f"transformers.models.{model_type}.modeling_{model_type}"
        if importlib.util.find_spec(f"transformers.models.{model_type}") is not None:
            preload.append(module)  # a module that fails to import is skipped by the fork server
    context.set_forkserver_preload(preload)
    return context


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """How a dead engine child is replaced: the n-th failure within ``window_s`` waits
    ``backoff_s * 2**(n-1)`` seconds (at most ``max_backoff_s``) and starts a new child; the
    failure that would make more than ``max_restarts`` restarts within ``window_s`` gives up
    (``max_restarts=0``: the first failure does)."""

    max_restarts: int = 5
    window_s: float = 600.0
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __post_init__(self):
        if self.max_restarts < 0 or self.window_s <= 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"invalid restart policy {self}: max_restarts >= 0, window_s > 0, backoffs >= 0")

    def delay(self, failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, failures - 1))


def describe_exit(exitcode: int | None) -> str:
    """A child's end as an operator reads it: 'exit code 1', 'signal 9 (SIGKILL)'."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"signal {-exitcode} ({name})"
    return f"exit code {exitcode}"


class ProcessEngine(RequestStreams):
    def __init__(self, path, config: dict, max_queue: int = 256, torch_threads: int | None = None,
                 on_step: Callable[[StepStats], None] | None = None, restart: RestartPolicy | None = None,
                 on_restart: Callable[[str], None] | None = None,
                 on_give_up: Callable[[str], None] | None = None):
        """``path``: the checkpoint; ``config``: ``Engine.from_pretrained`` keyword arguments
        (device, dtype and ``EngineConfig`` fields) for the child's engine; ``restart``: how a
        dead child is replaced (``None``: it is not); ``on_restart(reason)`` /
        ``on_give_up(reason)``: called on the event loop when a new child is started / when
        the policy's limit is reached."""
        self.path = str(path)
        self.config = dict(config)
        self.max_queue = max_queue
        self.torch_threads = torch_threads
        self.on_step = on_step
        self.restart_policy = restart
        self.on_restart = on_restart
        self.on_give_up = on_give_up
        self.engine = Engine.frontend(self.path, max_seq_len=self.config.get("max_seq_len"),
                                      coconut=self.config.get("coconut"),
                                      max_batch_size=self.config.get("max_batch_size", EngineConfig.max_batch_size),
                                      feedback_noise=self.config.get("feedback_noise"),
                                      mixture=self.config.get("mixture"))
        try:
            with open(f"{self.path}/config.json") as f:
                self._model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            self._model_type = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._prompts: dict[str, list[int]] = {}
        self._process = None
        self._conn = None           # parent -> child
        self._reports = None        # child -> parent, read by the reader thread
        self._generation = 0        # which child the reader threads' messages come from
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: str | None = None
        self._accepting = False
        self._stopping = False
        self._restart_task: asyncio.Task | None = None
        self._failures: collections.deque[float] = collections.deque()   # monotonic times
        self.restarts = 0           # children started to replace a dead one
        self.gave_up = False
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._sent = 0              # requests sent to the current child
        self._added = 0             # ... that it has added to its scheduler
        self._waiting = 0
        self._running = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._spawn()
        self._accepting = True

    async def _spawn(self) -> None:
        """Start a child, wait until its model is loaded, start its reader thread."""
        context = _context(self._model_type)
        child_inbox, conn = context.Pipe(duplex=False)
        reports, child_reports = context.Pipe(duplex=False)
        process = context.Process(target=_child_main, name="engine-process", daemon=True,
                                  args=(child_inbox, child_reports, self.path, self.config, self.torch_threads,
                                        _logging_of_this_process()))
        process.start()
        child_inbox.close()
        child_reports.close()
        self._generation += 1
        self._process, self._conn, self._reports = process, conn, reports
        log.info("engine process started (pid %d)", process.pid)
        try:
            kind, payload = await self._loop.run_in_executor(None, reports.recv)
        except (EOFError, OSError):
            await self._loop.run_in_executor(None, process.join, 5)
            kind, payload = "dead", f"it exited while loading the model ({describe_exit(process.exitcode)})"
        if kind != "ready":
            self._fatal = payload
            await self._reap()
            raise EngineDeadError(f"the engine process did not start: {payload}")
        self._fatal = None
        self._adopt_limit(payload)
        threading.Thread(target=self._read_reports, args=(reports, process, self._generation),
                         name="engine-process-reader", daemon=True).start()

    def _adopt_limit(self, max_seq_len: int) -> None:
        """The child's sequence limit becomes the frontend's: with ``kv_cache_memory`` only the
        child, which has the weights and the device, knows what its KV cache holds."""
        if max_seq_len != self.engine.core.max_seq_len:
            log.info("max_seq_len %d (the engine process's KV cache)", max_seq_len)
            self.engine.core.max_seq_len = max_seq_len

    async def _reap(self) -> None:
        """Make sure the current child is gone and release its pipes and its handle."""
        process, self._process = self._process, None
        for end in (self._conn, self._reports):
            if end is not None:
                end.close()
        self._conn = self._reports = None
        if process is None:
            return
        await self._loop.run_in_executor(None, process.join, 5)
        if process.is_alive():
            process.kill()
            await self._loop.run_in_executor(None, process.join, 5)
        try:
            process.close()
        except ValueError:          # still running after a kill: leave the handle
            pass

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with ``drain`` wait for in-flight requests, then stop the child."""
        self._accepting = False
        if drain:
            await self._drain(timeout)
        self._stopping = True
        if self._restart_task is not None and not self._restart_task.done():
            self._restart_task.cancel()
            try:
                await self._restart_task
            except BaseException:
                pass
        if self._process is None:
            return
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
    def accepting(self) -> bool:
        """Asked once per request, so without ``is_alive`` (a ``waitpid`` each time, 3% of the
        API process's CPU under load): a dead child is reported by the reader thread (the end
        of its pipe) and ``_die`` turns ``_accepting`` off; a request sent in between fails
        with ``EngineCrashedError`` like the others in flight."""
        return self._accepting and self._fatal is None

    @property
    def restarting(self) -> bool:
        return self._restart_task is not None and not self._restart_task.done()

    @property
    def unavailable_reason(self) -> str | None:
        if self.restarting:
            return f"the engine process is restarting after a failure ({self._fatal})"
        if self.gave_up:
            return (f"the engine process failed more than {self.restart_policy.max_restarts} times within "
                    f"{self.restart_policy.window_s:g} s; the server is stopping (last: {self._fatal})")
        return None

    @property
    def pid(self) -> int | None:
        """The current child's process id (None between children)."""
        return self._process.pid if self._process is not None else None

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
        try:
            self._conn.send(("add", request))
        except OSError as e:        # the child has just died; its report is on the way
            raise EngineDeadError(f"the engine process is gone ({type(e).__name__}); retry later") from None
        for member in request.members:   # n > 1: every answer's outputs come on this stream
            self._streams[member.request_id] = stream
            self._prompts[member.request_id] = request.prompt_token_ids
        self._sent += 1
        return stream

    # ------------------------------------------------------------ the reports

    def _read_reports(self, reports, process, generation: int) -> None:
        """The reader thread of one child: one blocking receive after another, each handed
        to the loop, until the child is gone."""
        while True:
            try:
                message = reports.recv()
            except (EOFError, OSError):  # the child is gone: wait for its exit status
                process.join(5)
                message = ("exited", f"the engine process exited ({describe_exit(process.exitcode)})")
            try:
                self._loop.call_soon_threadsafe(self._on_report, generation, message)
            except RuntimeError:   # the event loop is closed
                return
            if message[0] in ("dead", "exited"):
                return

    def _on_report(self, generation: int, message) -> None:
        if generation != self._generation:
            return                 # a child already replaced
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
        """The child died (or reported a fatal error): fail every request in it at once, then
        replace it if the policy allows."""
        self._fatal = reason
        self._accepting = False
        in_flight = list(self._streams)
        policy = self.restart_policy
        if policy is None or self._stopping:
            log.error("engine process failed: %s; %d requests in flight failed", reason, len(in_flight))
            plan = ""
        elif self._count_failure() > policy.max_restarts:
            plan = (f"; giving up: {len(self._failures)} failures within {policy.window_s:g} s "
                    f"(at most {policy.max_restarts} restarts)")
        else:
            plan = "; the server restarts it"
        dead = EngineCrashedError(f"the engine process died while this request was in flight: {reason}{plan}")
        for request_id in in_flight:
            self._put(request_id, dead)
        # every stream has its error: the next child starts with an empty slate
        self._streams.clear()
        self._prompts.clear()
        self._reset_counts()
        if policy is not None and not self._stopping:
            self._after_failure(reason, len(in_flight))

    def _count_failure(self) -> int:
        """Record a failure now; the number within the policy's window."""
        now = time.monotonic()
        self._failures.append(now)
        while self._failures[0] < now - self.restart_policy.window_s:
            self._failures.popleft()
        return len(self._failures)

    def _after_failure(self, reason: str, in_flight: int) -> None:
        policy = self.restart_policy
        failures = len(self._failures)
        if failures > policy.max_restarts:
            log.error("engine process failed: %s; %d requests in flight failed; giving up after %d failures "
                      "within %g s (--max-engine-restarts %d)", reason, in_flight, failures, policy.window_s,
                      policy.max_restarts)
            self.gave_up = True
            self._restart_task = None
            if self.on_give_up is not None:
                self.on_give_up(reason)
            return
        delay = policy.delay(failures)
        log.error("engine process failed: %s; %d requests in flight failed; restarting it in %g s "
                  "(restart %d of at most %d within %g s)", reason, in_flight, delay, failures,
                  policy.max_restarts, policy.window_s)
        self._restart_task = self._loop.create_task(self._restart(reason, delay))

    async def _restart(self, reason: str, delay: float) -> None:
        began = time.monotonic()
        await self._reap()
        await asyncio.sleep(max(0.0, delay - (time.monotonic() - began)))
        self.restarts += 1
        if self.on_restart is not None:
            try:
                self.on_restart(reason)
            except Exception:
                log.exception("on_restart callback failed")
        started = time.monotonic()
        try:
            await self._spawn()
        except EngineDeadError as e:   # it did not load: another failure
            log.error("%s", e)
            self._restart_task = None
            self._fatal = str(e)
            self._count_failure()       # a replacement that failed to start: one more failure
            self._after_failure(str(e), 0)
            return
        if self._stopping:
            return
        self._accepting = True
        log.info("engine process restarted (pid %d): serving again %.1f s after the failure "
                 "(%.1f s to load)", self._process.pid, time.monotonic() - began, time.monotonic() - started)
