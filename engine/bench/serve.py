"""``engine bench serve``: drive a running server with streamed requests; compare with the
engine driven directly.

    engine serve --model DIR &
    engine bench serve --url http://127.0.0.1:8000 --concurrency 1,8,32 --model DIR

For each concurrency ``c`` the same ``--num-prompts`` questions are sent as streamed
``POST /v1/reason`` requests, at most ``c`` in flight (vLLM's ``--max-concurrency``).
Metrics follow vLLM's serving benchmark: request throughput (completed / wall time),
output token throughput (answer tokens / wall time), TTFT (send to first answer text),
TPOT ((E2E - TTFT) / (output tokens - 1), per request), ITL (gaps between streamed
chunks), E2E latency; mean, median and p99 of each, plus the latent phase time the
server reports (``timings.latent``). With ``--compare-url`` a second server gets the same
requests right after the first at every level and repeat (both see the same machine load),
and the table adds the ratio of their requests/s. With ``--model`` the same questions run through an
in-process ``Engine`` at the same concurrency (the offline baseline), and the table
shows HTTP / offline output throughput (target >= 0.9 at concurrency 32). At each level
the offline run follows the HTTP run (the server then sits idle), so both see the same
machine load; give the offline engine the server's settings (``--torch-threads``,
``--max-batch-size``, ``--device``, ``--dtype``). Greedy decoding with ``ignore_eos`` keeps output lengths equal.

``--mode stream,json`` also sends every level's questions as non-streamed JSON requests
(side ``http_json``; TTFT is then the whole reply). When the server runs on this machine
(a local URL; or ``--server-pid``), each HTTP side reports the CPU seconds its processes
spent per completed request, read from ``/proc`` around the timed run:
``server_cpu_ms_per_request`` (the server's own process, the engine child excluded),
``engine_cpu_ms_per_request`` (the server's child processes: the engine process) and
``client_cpu_ms_per_request`` (this benchmark's process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field


#: ``engine serve``'s default ``--max-prefill-tokens`` (server.settings), which the offline
#: engine matches unless told otherwise: the step plans then compare, not the configurations
SERVER_PREFILL_TOKENS = 512


from engine.sources import add_model_arguments

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP serving throughput and latency vs the engine driven directly",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL of a running `engine serve`")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated in-flight limits (default 1,8,32)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level (default 64)")
    p.add_argument("--max-tokens", type=int, default=32, help="answer tokens per request (default 32)")
    p.add_argument("--thoughts", type=int, default=None, help="fixed thoughts per request (default: checkpoint)")
    add_model_arguments(p, "the model of the offline comparison (a directory, a .gguf file or a Hub id)")
    p.add_argument("--device", default="cpu", help="device of the offline engine (default cpu)")
    p.add_argument("--dtype", default="float32", help="dtype of the offline engine (default float32)")
    p.add_argument("--max-batch-size", type=int, default=32, help="offline engine batch limit (default 32)")
    p.add_argument("--max-prefill-tokens", type=int, default=SERVER_PREFILL_TOKENS,
                   help="prompt tokens per step of the offline engine: match the server's --max-prefill-tokens "
                        f"(default {SERVER_PREFILL_TOKENS}, the server's default)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads of the offline engine (match the server's --torch-threads)")
    p.add_argument("--repeats", type=int, default=1, help="runs per level; the median is reported (default 1)")
    p.add_argument("--compare-url", default=None,
                   help="a second running server (e.g. the same model with --engine-process), driven right after "
                        "--url at every level and repeat; the table adds its rows and the ratio url / compare-url")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a chart of requests/s and ITL per level")
    p.add_argument("--labels", default=None, metavar="A,B",
                   help="names of --url and --compare-url in the table's plot (default: the URLs)")
    p.add_argument("--api-key", default=None, help="Bearer key, if the server wants one")
    p.add_argument("--seed", type=int, default=0, help="seed of the question generator")
    p.add_argument("--mode", default="stream",
                   help="comma-separated request kinds per level: stream (SSE, side 'http') and/or json "
                        "(non-streamed, side 'http_json'); default stream")
    p.add_argument("--server-pid", type=int, default=None,
                   help="the --url server's process id for its CPU per request (default: the process "
                        "listening on the URL's port, when it is on this machine)")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="HTTP client: raw (a minimal asyncio HTTP/1.1 client, light on the CPU the benchmark "
                        "shares with a local server; http:// only) or httpx (default raw)")
    p.add_argument("--spread-tokens", action="store_true",
                   help="answer lengths drawn uniform in [max_tokens/2, 3 max_tokens/2] per request (seeded, the "
                        "same on every side), so that requests do not finish and arrive in cohorts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


@dataclass
class Trace:
    """One request's clock readings (perf_counter seconds) and counts."""

    start: float
    first: float | None = None
    last: float | None = None
    end: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    latent: float = 0.0
    error: str | None = None
    streamed: bool = True    # False: one JSON reply (no gaps between tokens, no TPOT)

    def chunk(self, now: float) -> None:
        if self.first is None:
            self.first = now
        else:
            self.itl.append(now - self.last)
        self.last = now


def answer_lengths(n: int, max_tokens: int, seed: int) -> list[int]:
    """``--spread-tokens``: n answer lengths uniform in [max_tokens/2, 3 max_tokens/2]."""
    import random

    rng = random.Random(seed)
    return [rng.randint(max(1, max_tokens // 2), max(1, max_tokens * 3 // 2)) for _ in range(n)]


def questions(n: int, seed: int) -> list[str]:
    from engine.tiny import sample_corpus
    return [text.split("\n")[0] for text in sample_corpus(n, seed=seed)]


def summarize(traces: list[Trace], duration: float) -> dict:
    import numpy as np

    ok = [t for t in traces if t.error is None and t.end is not None]

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": None, "median": None, "p99": None}
        a = np.asarray(values) * 1000.0  # milliseconds
        return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}

    tokens = sum(t.tokens for t in ok)
    return {
        "completed": len(ok), "failed": len(traces) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": tokens / duration,
        "total_output_tokens": tokens,
        "ttft_ms": stats([t.first - t.start for t in ok if t.first is not None]),
        "tpot_ms": stats([(t.end - t.first) / (t.tokens - 1) for t in ok
                           if t.streamed and t.first is not None and t.tokens > 1]),
        "itl_ms": stats([gap for t in ok for gap in t.itl]), "itl_count": sum(len(t.itl) for t in ok),
        "e2e_ms": stats([t.end - t.start for t in ok]),
        "latent_ms": stats([t.latent for t in ok]),
        "errors": sorted({t.error for t in traces if t.error})[:5],
    }


# ---------------------------------------------------------------- HTTP


async def _http_one(client, body: dict, question: str, gate) -> Trace:
    async with gate:
        trace = Trace(start=time.perf_counter(), streamed=bool(body.get("stream")))
        try:
            if not trace.streamed:
                r = await client.post("/v1/reason", json={**body, "question": question})
                if r.status_code != 200:
                    trace.error = f"HTTP {r.status_code}: {r.content[:200]!r}"
                    return trace
                reply = r.json()
                trace.first = trace.last = trace.end = time.perf_counter()
                trace.tokens = reply["usage"]["completion_tokens"]
                trace.latent = reply["timings"]["latent"]
                return trace
            async with client.stream("POST", "/v1/reason", json={**body, "question": question}) as r:
                if r.status_code != 200:
                    trace.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return trace
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        trace.error = event["error"]["message"]
                        return trace
                    now = time.perf_counter()
                    if event.get("delta"):
                        trace.chunk(now)
                    if event.get("finish_reason"):
                        trace.tokens = event["usage"]["completion_tokens"]
                        trace.latent = event["timings"]["latent"]
            trace.end = time.perf_counter()
        except Exception as e:  # a benchmark reports failures, it does not stop at them
            trace.error = f"{type(e).__name__}: {e}"
        return trace


async def run_http(url: str, prompts: list[str], body: dict, concurrency: int, api_key: str | None,
                   server_pid: int | None = None, client: str = "raw") -> dict:
    """One level over HTTP (``body``: one request body for every prompt, or a list with one
    per prompt); with ``server_pid`` (a local server) the CPU its process and its
    children (the engine process) and this process spent during the timed run, per request.
    ``client``: ``raw`` (a minimal HTTP/1.1 client on asyncio streams, so that the benchmark
    takes little of the CPU it shares with the server; ``http://`` URLs only) or ``httpx``."""
    import asyncio

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bodies = body if isinstance(body, list) else [body] * len(prompts)
    if client == "raw" and url.startswith("http://"):
        pool = RawPool(url, headers)
        one = pool.one
        close = pool.close
    else:
        import httpx

        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        session = httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600)
        one = lambda b, q, gate: _http_one(session, b, q, gate)  # noqa: E731
        close = session.aclose
    try:
        gate = asyncio.Semaphore(concurrency)
        await asyncio.gather(*(one(b, q, gate) for b, q in list(zip(bodies, prompts))[:4]))  # warm-up
        before = cpu_snapshot(server_pid)
        start = time.perf_counter()
        traces = await asyncio.gather(*(one(b, q, gate) for b, q in zip(bodies, prompts)))
        duration = time.perf_counter() - start
        after = cpu_snapshot(server_pid)
    finally:
        await close()
    result = summarize(list(traces), duration)
    result.update(cpu_per_request(before, after, result["completed"]))
    return result


class RawPool:
    """Keep-alive HTTP/1.1 connections to one ``http://host:port``: POST a JSON body, read a
    ``Content-Length`` or chunked reply (SSE events are taken as the chunks arrive)."""

    def __init__(self, url: str, headers: dict):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.head = (f"POST {self.prefix}/v1/reason HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     f"Content-Type: application/json\r\n{extra}Content-Length: ")
        self.idle: list = []

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()

    async def _connection(self):
        import asyncio

        if self.idle:
            return self.idle.pop()
        return await self._connect()

    async def _connect(self):
        import asyncio

        return await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    async def one(self, body: dict, question: str, gate) -> Trace:
        async with gate:
            trace = Trace(start=time.perf_counter(), streamed=bool(body.get("stream")))
            conn = None
            try:
                data = json.dumps(self.payload(body, question)).encode()
                for attempt in range(2):
                    # an idle keep-alive connection the server has closed (its keep-alive
                    # timeout) answers nothing: the request is sent again on a new one
                    reused = bool(self.idle) and attempt == 0
                    conn = await self._connection() if reused or attempt == 0 else await self._connect()
                    reader, writer = conn
                    try:
                        writer.write(f"{self.head}{len(data)}\r\n\r\n".encode() + data)
                        status_line = await reader.readline()
                    except ConnectionError:
                        status_line = b""
                    if status_line or not reused:
                        break
                    writer.close()
                if not status_line:
                    raise ConnectionError("the server closed the connection")
                status = int(status_line.split()[1])
                length, chunked, keep = None, False, True
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    name, value = name.strip().lower(), value.strip()
                    if name == "content-length":
                        length = int(value)
                    elif name == "transfer-encoding" and "chunked" in value.lower():
                        chunked = True
                    elif name == "connection" and value.lower() == "close":
                        keep = False
                if not chunked:
                    payload = await reader.readexactly(length or 0)
                    if status != 200:
                        trace.error = f"HTTP {status}: {payload[:200]!r}"
                    elif not trace.streamed:
                        reply = json.loads(payload)
                        trace.first = trace.last = trace.end = time.perf_counter()
                        trace.tokens = reply["usage"]["completion_tokens"]
                        trace.latent = reply["timings"]["latent"]
                    else:
                        trace.error = "a stream without chunked encoding"
                else:
                    await self._events(reader, trace, status, body)
                self.finish(trace)
                if keep and trace.error is None:
                    self.idle.append(conn)
                else:
                    writer.close()
                conn = None
            except Exception as e:  # a benchmark reports failures, it does not stop at them
                trace.error = f"{type(e).__name__}: {e}"
            finally:
                if conn is not None:
                    conn[1].close()
            return trace

    def payload(self, body: dict, question) -> dict:
        """The JSON body sent for one request (subclasses for other routes)."""
        return {**body, "question": question}

    def on_event(self, trace: Trace, payload: dict, now: float, body: dict) -> None:
        """One ``/v1/reason`` stream event arrived at ``now``."""
        if payload.get("delta"):
            trace.chunk(now)
        if payload.get("finish_reason"):
            trace.tokens = payload["usage"]["completion_tokens"]
            trace.latent = payload["timings"]["latent"]

    def finish(self, trace: Trace) -> None:
        """After a request's reply was read whole (subclasses fill in what it lacked)."""

    async def _events(self, reader, trace: Trace, status: int, body: dict) -> None:
        """Read a chunked body to its end, handling each complete ``data:`` event on arrival."""
        pending = b""
        error_body = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()   # the blank line after the last chunk
                break
            chunk = await reader.readexactly(size + 2)
            if status != 200:
                error_body.append(chunk[:-2])
                continue
            pending += chunk[:-2]
            *events, pending = pending.split(b"\n\n")
            now = time.perf_counter()
            for event in events:
                if not event.startswith(b"data: ") or trace.error is not None:
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    trace.end = now
                    continue
                payload = json.loads(data)
                if "error" in payload:
                    error = payload["error"]
                    trace.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
                    continue
                self.on_event(trace, payload, now, body)
        if status != 200:
            trace.error = f"HTTP {status}: {b''.join(error_body)[:200]!r}"
        elif trace.error is None and trace.end is None:
            trace.end = time.perf_counter()   # no [DONE]: the stream failed  # noqa
            trace.error = "the stream ended without [DONE]"


# ---------------------------------------------------------------- CPU accounting (/proc)


def _clock_ticks() -> int:
    import os
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of this process alone: utime + stime) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _clock_ticks()


def process_cpu(pid: int) -> tuple[float, float] | None:
    """(CPU seconds of ``pid`` itself, of all its live descendants), children not counted in
    the first (``/proc``'s utime + stime per process)."""
    import os

    own = _stat(pid)
    if own is None:
        return None
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parents[int(name)], cpu[int(name)] = st
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    descendants, todo = 0.0, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        descendants += cpu.get(p, 0.0)
        todo.extend(children.get(p, []))
    return own[1], descendants


def cpu_snapshot(server_pid: int | None) -> dict:
    snap = {"client": time.process_time()}
    if server_pid is not None:
        seen = process_cpu(server_pid)
        if seen is not None:
            snap["server"], snap["engine"] = seen
    return snap


def cpu_per_request(before: dict, after: dict, completed: int) -> dict:
    """Milliseconds of CPU per completed request for each process group read at both ends."""
    out = {}
    for key in ("server", "engine", "client"):
        if key in before and key in after and completed:
            out[f"{key}_cpu_ms_per_request"] = (after[key] - before[key]) * 1000.0 / completed
    return out


def listening_pid(url: str) -> int | None:
    """The process listening on ``url``'s TCP port when the host is this machine (Linux /proc),
    else None."""
    import os
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "0.0.0.0", "::1") or not os.path.isdir("/proc/net"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") in inodes:
                    return int(name)
            except OSError:
                continue
    return None


# ---------------------------------------------------------------- offline engine


def run_offline(engine, prompts: list[str], sampling, latent, concurrency: int, per_token: bool = False) -> dict:
    """Drive ``engine`` in a closed loop of ``concurrency`` requests. ``sampling``: one
    ``SamplingParams`` for all prompts or a list with one per prompt. Gaps (ITL) are taken
    between outputs with new text, as a streaming client sees them, or with
    ``per_token`` between new tokens (text can lag a token, e.g. an incomplete character)."""
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    warm = min(4, len(prompts))
    engine.generate(prompts[:warm], samplings[:warm], latent)  # warm-up
    pending, inflight, done = deque(zip(prompts, samplings)), {}, []
    start = time.perf_counter()
    while pending or inflight:
        while pending and len(inflight) < concurrency:
            prompt, params = pending.popleft()
            request_id = engine.add_request(prompt, params, latent)
            inflight[request_id] = Trace(start=time.perf_counter())
        for out in engine.step():
            trace = inflight.get(out.request_id)
            if trace is None:
                continue
            now = time.perf_counter()
            if (len(out.token_ids) > trace.tokens) if per_token else out.delta:
                trace.chunk(now)
                trace.tokens = len(out.token_ids)
            if out.finished:
                trace.end, trace.tokens, trace.latent = now, len(out.token_ids), out.timings.get("latent", 0.0)
                done.append(inflight.pop(out.request_id))
    return summarize(done, time.perf_counter() - start)


# ---------------------------------------------------------------- report


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


#: The sides of a level's row, in table order: each HTTP side per mode, then the engine.
SIDES = ("http", "http_json", "compare", "compare_json", "offline")
MODES = {"stream": ("http", "compare"), "json": ("http_json", "compare_json")}


def table(results: list[dict]) -> str:
    head = (f"{'conc':>4} {'side':>12} {'req/s':>7} {'tok/s':>8} {'TTFT mean/med/p99 ms':>22} "
            f"{'TPOT mean/med/p99':>19} {'ITL mean/med/p99':>19} {'E2E mean/med/p99 ms':>22} "
            f"{'latent med':>10} {'fail':>4} {'CPU ms/req srv/eng/cli':>22}")
    lines = [head, "-" * len(head)]
    for row in results:
        for side in SIDES:
            r = row.get(side)
            if r is None:
                continue
            trio = lambda k: "/".join(_fmt(r[k][s]) for s in ("mean", "median", "p99"))  # noqa: E731
            cpu = "/".join(f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in (
                "server_cpu_ms_per_request", "engine_cpu_ms_per_request", "client_cpu_ms_per_request"))
            lines.append(f"{row['concurrency']:>4} {side:>12} {r['request_throughput']:>7.2f} "
                         f"{r['output_throughput']:>8.1f} {trio('ttft_ms'):>22} {trio('tpot_ms'):>19} "
                         f"{trio('itl_ms'):>19} {trio('e2e_ms'):>22} {_fmt(r['latent_ms']['median']):>10} "
                         f"{r['failed']:>4} {cpu if side != 'offline' else '':>22}")
        if row.get("ratio") is not None:
            lines.append(f"{'':>4} {'ratio':>12} HTTP/offline output throughput = {row['ratio']:.3f}")
        if row.get("json_ratio") is not None:
            lines.append(f"{'':>4} {'ratio':>12} HTTP JSON/offline output throughput = {row['json_ratio']:.3f}")
        if row.get("compare_ratio") is not None:
            lines.append(f"{'':>4} {'ratio':>12} url / compare-url requests/s = {row['compare_ratio']:.3f}")
        if row.get("compare_json_ratio") is not None:
            lines.append(f"{'':>4} {'ratio':>12} url / compare-url requests/s (JSON) = "
                         f"{row['compare_json_ratio']:.3f}")
    return "\n".join(lines)


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["output_throughput"])[len(runs) // 2]


def run(args: argparse.Namespace) -> int:
    import asyncio

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency={args.concurrency!r} is invalid: expected integers >= 1, e.g. 1,8,32")
    if args.num_prompts < 1 or args.max_tokens < 1 or args.repeats < 1:
        raise ValueError("--num-prompts, --max-tokens and --repeats must be >= 1")
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"--mode={args.mode!r} is invalid: expected stream, json or stream,json")
    prompts = questions(args.num_prompts, args.seed)
    body = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True}
    if args.thoughts is not None:
        body["latent"] = {"mode": "fixed", "thoughts": args.thoughts}
    lengths = answer_lengths(len(prompts), args.max_tokens, args.seed) if args.spread_tokens else None
    url, compare_url = args.url.rstrip("/"), args.compare_url.rstrip("/") if args.compare_url else None
    server_pid = args.server_pid if args.server_pid is not None else listening_pid(url)
    compare_pid = listening_pid(compare_url) if compare_url else None
    engine = sampling = latent = None
    if args.model:
        import torch

        from engine.sync_engine import Engine
        from engine.params import LatentPolicy, SamplingParams

        if args.torch_threads is not None:
            torch.set_num_threads(args.torch_threads)
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                                        max_batch_size=args.max_batch_size,
                                        max_prefill_tokens=args.max_prefill_tokens)
        sampling = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
                    for n in lengths or [args.max_tokens] * len(prompts)]
        latent = LatentPolicy(mode="fixed", thoughts=args.thoughts) if args.thoughts is not None else None
    results = []
    for c in levels:
        # HTTP then offline back to back at each level, so both see the same machine load;
        # with --repeats, the run with the median output throughput is kept.
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for mode in modes:
                side, compare_side = MODES[mode]
                mode_body = {**body, "stream": mode == "stream"}
                if lengths:
                    mode_body = [{**mode_body, "max_tokens": n} for n in lengths]
                runs[side].append(asyncio.run(run_http(url, prompts, mode_body, c, args.api_key, server_pid,
                                                          args.client)))
                if compare_url:
                    runs[compare_side].append(asyncio.run(run_http(compare_url, prompts, mode_body, c,
                                                                   args.api_key, compare_pid, args.client)))
            if engine is not None:
                runs["offline"].append(run_offline(engine, prompts, sampling, latent, c))
        row = {"concurrency": c, **{side: _median_run(r) for side, r in runs.items() if r}}
        if "compare" in row:
            row["compare_ratio"] = row["http"]["request_throughput"] / row["compare"]["request_throughput"]
        if "compare_json" in row:
            row["compare_json_ratio"] = (row["http_json"]["request_throughput"]
                                         / row["compare_json"]["request_throughput"])
        if "offline" in row:
            first = "http" if "http" in row else "http_json"
            row["ratio"] = row[first]["output_throughput"] / row["offline"]["output_throughput"]
            if "http" in row and "http_json" in row:
                row["json_ratio"] = row["http_json"]["output_throughput"] / row["offline"]["output_throughput"]
        results.append(row)
    labels = (args.labels or "").split(",")
    report = {"url": args.url, "compare_url": args.compare_url, "labels": labels if len(labels) == 2 else None,
              "num_prompts": args.num_prompts,
              "max_tokens": args.max_tokens, "spread_tokens": args.spread_tokens, "modes": modes, "client": args.client, "server_pid": server_pid,
              "thoughts": args.thoughts, "model": args.model, "max_prefill_tokens": args.max_prefill_tokens,
              "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(results))
        for row in results:
            for side in SIDES[:4]:
                if side in row and row[side]["errors"]:
                    print(f"concurrency {row['concurrency']} {side}: errors: {row[side]['errors']}", file=sys.stderr)
    if args.plot:
        _plot(report, args.plot)
    failed = any(row[side]["failed"] for row in results for side in SIDES[:4] if side in row)
    return 1 if failed else 0


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    sides = [side for side in SIDES if side in rows[0]]
    url, compare = report.get("labels") or (report["url"], report["compare_url"] or "")
    names = {"http": url, "http_json": f"{url} (JSON)", "compare": compare, "compare_json": f"{compare} (JSON)",
             "offline": "engine, no HTTP"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    width = 0.8 / len(sides)
    for k, side in enumerate(sides):
        xs = [i + (k - (len(sides) - 1) / 2) * width for i in range(len(rows))]
        color = f"C{k}"           # one colour per side on both panels
        a.bar(xs, [row[side]["request_throughput"] for row in rows], width, label=names[side], color=color)
        if side not in ("http_json", "compare_json"):   # a JSON reply has no gaps between tokens
            b.bar(xs, [row[side]["itl_ms"]["p99"] or 0.0 for row in rows], width, label=names[side], color=color)
    for ax, label in ((a, "requests / s"), (b, "ITL p99, ms")):
        ax.set_xticks(range(len(rows)), [str(row["concurrency"]) for row in rows])
        ax.set(xlabel="concurrency", ylabel=label)
    a.legend(fontsize=7)
    kinds = " and ".join({"stream": "streamed", "json": "JSON"}[m] for m in report.get("modes", ["stream"]))
    fig.suptitle(f"engine bench serve: {report['num_prompts']} {kinds} requests of {report['max_tokens']} tokens "
                 "per level", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)
