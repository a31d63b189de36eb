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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP serving throughput and latency vs the engine driven directly",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL of a running `engine serve`")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated in-flight limits (default 1,8,32)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level (default 64)")
    p.add_argument("--max-tokens", type=int, default=32, help="answer tokens per request (default 32)")
    p.add_argument("--thoughts", type=int, default=None, help="fixed thoughts per request (default: checkpoint)")
    p.add_argument("--model", default=None, help="checkpoint directory for the offline comparison")
    p.add_argument("--device", default="cpu", help="device of the offline engine (default cpu)")
    p.add_argument("--dtype", default="float32", help="dtype of the offline engine (default float32)")
    p.add_argument("--max-batch-size", type=int, default=32, help="offline engine batch limit (default 32)")
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

    def chunk(self, now: float) -> None:
        if self.first is None:
            self.first = now
        else:
            self.itl.append(now - self.last)
        self.last = now


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
        "tpot_ms": stats([(t.end - t.first) / (t.tokens - 1) for t in ok if t.first is not None and t.tokens > 1]),
        "itl_ms": stats([gap for t in ok for gap in t.itl]), "itl_count": sum(len(t.itl) for t in ok),
        "e2e_ms": stats([t.end - t.start for t in ok]),
        "latent_ms": stats([t.latent for t in ok]),
        "errors": sorted({t.error for t in traces if t.error})[:5],
    }


# ---------------------------------------------------------------- HTTP


async def _http_one(client, body: dict, question: str, gate) -> Trace:
    async with gate:
        trace = Trace(start=time.perf_counter())
        try:
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


async def run_http(url: str, prompts: list[str], body: dict, concurrency: int, api_key: str | None) -> dict:
    import asyncio

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600) as client:
        gate = asyncio.Semaphore(concurrency)
        await asyncio.gather(*(_http_one(client, body, q, gate) for q in prompts[:min(4, len(prompts))]))  # warm-up
        start = time.perf_counter()
        traces = await asyncio.gather(*(_http_one(client, body, q, gate) for q in prompts))
        return summarize(list(traces), time.perf_counter() - start)


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


def table(results: list[dict]) -> str:
    head = (f"{'conc':>4} {'side':>7} {'req/s':>7} {'tok/s':>8} {'TTFT mean/med/p99 ms':>22} "
            f"{'TPOT mean/med/p99':>19} {'ITL mean/med/p99':>19} {'E2E mean/med/p99 ms':>22} "
            f"{'latent med':>10} {'fail':>4}")
    lines = [head, "-" * len(head)]
    for row in results:
        for side in ("http", "compare", "offline"):
            r = row.get(side)
            if r is None:
                continue
            trio = lambda k: "/".join(_fmt(r[k][s]) for s in ("mean", "median", "p99"))  # noqa: E731
            lines.append(f"{row['concurrency']:>4} {side:>7} {r['request_throughput']:>7.2f} "
                         f"{r['output_throughput']:>8.1f} {trio('ttft_ms'):>22} {trio('tpot_ms'):>19} "
                         f"{trio('itl_ms'):>19} {trio('e2e_ms'):>22} {_fmt(r['latent_ms']['median']):>10} "
                         f"{r['failed']:>4}")
        if row.get("ratio") is not None:
            lines.append(f"{'':>4} {'ratio':>7} HTTP/offline output throughput = {row['ratio']:.3f}")
        if row.get("compare_ratio") is not None:
            lines.append(f"{'':>4} {'ratio':>7} url / compare-url requests/s = {row['compare_ratio']:.3f}")
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
    prompts = questions(args.num_prompts, args.seed)
    body = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True}
    if args.thoughts is not None:
        body["latent"] = {"mode": "fixed", "thoughts": args.thoughts}
    engine = sampling = latent = None
    if args.model:
        import torch

        from engine.sync_engine import Engine
        from engine.params import LatentPolicy, SamplingParams

        if args.torch_threads is not None:
            torch.set_num_threads(args.torch_threads)
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                        max_batch_size=args.max_batch_size)
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        latent = LatentPolicy(mode="fixed", thoughts=args.thoughts) if args.thoughts is not None else None
    results = []
    for c in levels:
        # HTTP then offline back to back at each level, so both see the same machine load;
        # with --repeats, the run with the median output throughput is kept.
        http_runs, compare_runs, offline_runs = [], [], []
        for _ in range(args.repeats):
            http_runs.append(asyncio.run(run_http(args.url.rstrip("/"), prompts, body, c, args.api_key)))
            if args.compare_url:
                compare_runs.append(asyncio.run(run_http(args.compare_url.rstrip("/"), prompts, body, c,
                                                         args.api_key)))
            if engine is not None:
                offline_runs.append(run_offline(engine, prompts, sampling, latent, c))
        row = {"concurrency": c, "http": _median_run(http_runs)}
        if compare_runs:
            row["compare"] = _median_run(compare_runs)
            row["compare_ratio"] = row["http"]["request_throughput"] / row["compare"]["request_throughput"]
        if offline_runs:
            row["offline"] = _median_run(offline_runs)
            row["ratio"] = row["http"]["output_throughput"] / row["offline"]["output_throughput"]
        results.append(row)
    labels = (args.labels or "").split(",")
    report = {"url": args.url, "compare_url": args.compare_url, "labels": labels if len(labels) == 2 else None,
              "num_prompts": args.num_prompts,
              "max_tokens": args.max_tokens,
              "thoughts": args.thoughts, "model": args.model, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(results))
        for row in results:
            if row["http"]["errors"]:
                print(f"concurrency {row['concurrency']}: errors: {row['http']['errors']}", file=sys.stderr)
    if args.plot:
        _plot(report, args.plot)
    failed = any(row[side]["failed"] for row in results for side in ("http", "compare") if side in row)
    return 1 if failed else 0


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    sides = [side for side in ("http", "compare", "offline") if side in rows[0]]
    url, compare = report.get("labels") or (report["url"], report["compare_url"] or "")
    names = {"http": url, "compare": compare, "offline": "engine, no HTTP"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    width = 0.8 / len(sides)
    for k, side in enumerate(sides):
        xs = [i + (k - (len(sides) - 1) / 2) * width for i in range(len(rows))]
        a.bar(xs, [row[side]["request_throughput"] for row in rows], width, label=names[side])
        b.bar(xs, [row[side]["itl_ms"]["p99"] for row in rows], width, label=names[side])
    for ax, label in ((a, "requests / s"), (b, "ITL p99, ms")):
        ax.set_xticks(range(len(rows)), [str(row["concurrency"]) for row in rows])
        ax.set(xlabel="concurrency", ylabel=label)
    a.legend(fontsize=7)
    fig.suptitle(f"engine bench serve: {report['num_prompts']} streamed requests of {report['max_tokens']} tokens "
                 "per level", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)
