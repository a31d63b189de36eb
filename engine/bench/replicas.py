"""``engine bench replicas``: requests/s with 1 and N Ray Serve replicas, and what Ray's
proxy adds to a request, against the single-process server, in one run.

    engine bench replicas --replicas 2 --concurrency 1,64      # the bundled model

Three servers are started one after the other on this machine, each as its own
``engine serve`` process, and driven with the same streamed requests as ``engine bench
serve`` (greedy, ``ignore_eos``, at most ``c`` in flight):

- ``single``: the plain server (no Ray);
- ``proxy x1``: one replica behind Ray Serve's proxy (``--replicas 1 --ray-address local``);
- ``proxy xN``: N replicas;
- ``haproxy x1`` / ``haproxy xN``: the same behind Ray's HAProxy ingress (``--ray-ingress
  haproxy``); ``--ingress`` picks which are measured.

The table gives requests/s and median / p99 end-to-end latency per concurrency, the
ratio of each to ``single``, and each ingress's added latency: the median E2E of its
``x1`` run minus that of ``single`` at the lowest concurrency (same engine, one extra hop). Needs
the Ray Serve extra (``pip install -e ".[ray]"``). Replicas only add throughput where
there are cores (or GPUs) for them: each replica's engine wants a core of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replicas", help="requests/s with 1 and N Ray Serve replicas vs the single server",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="the model, as `engine serve --model` takes it (default: the "
                   "bundled model)")
    p.add_argument("--replicas", type=int, default=2, help="replicas of the scaled-out run (default 2)")
    p.add_argument("--concurrency", default="1,64", help="comma-separated in-flight limits (default 1,64)")
    p.add_argument("--num-prompts", type=int, default=128, help="requests per concurrency level (default 128)")
    p.add_argument("--max-tokens", type=int, default=16, help="answer tokens per request (default 16)")
    p.add_argument("--max-batch-size", type=int, default=32, help="each server's batch limit (default 32)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per engine (default 1)")
    p.add_argument("--ingress", default="proxy,haproxy",
                   help="comma-separated --ray-ingress values to measure (default proxy,haproxy)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to start")
    p.add_argument("--seed", type=int, default=0, help="seed of the question generator")
    p.add_argument("--output", default=None, help="also write the JSON report to this file")
    p.add_argument("--plot", default=None, help="also draw requests/s and median latency to this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


class ServerProcess:
    """``engine serve ARGS`` on a free local port, until ``stop`` (SIGTERM, then wait)."""

    def __init__(self, args: list[str], startup_timeout: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DISABLE_USAGE_STATS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{self.output()[-4000:]}")

    def replicas(self, tries: int = 32) -> set[str]:
        import httpx

        return {httpx.get(self.url + "/ready", timeout=30).headers.get("x-coconut-replica", "single")
                for _ in range(tries)}

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def measure(name: str, serve_args: list[str], expected_replicas: int, levels: list[int], prompts: list[str],
            body: dict, startup_timeout: float) -> dict:
    from engine.bench.serve import run_http

    print(f"[{name}] starting engine serve {' '.join(serve_args)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    server = ServerProcess(serve_args, startup_timeout)
    try:
        deadline = time.monotonic() + startup_timeout
        while len(server.replicas()) < expected_replicas and time.monotonic() < deadline:
            time.sleep(1.0)
        startup_s = time.perf_counter() - started
        rows = {}
        for c in levels:
            print(f"[{name}] concurrency {c}: {len(prompts)} requests", file=sys.stderr, flush=True)
            rows[c] = asyncio.run(run_http(server.url, prompts, body, c, None))
        return {"name": name, "startup_s": startup_s, "replicas_seen": len(server.replicas()), "levels": rows}
    finally:
        server.stop()


def table(report: dict) -> str:
    single = report["runs"][0]
    lines = [f"{'server':<10} {'conc':>5} {'req/s':>8} {'x single':>9} {'e2e p50 ms':>11} {'e2e p99 ms':>11} "
             f"{'failed':>6}"]
    for run_ in report["runs"]:
        for c, row in run_["levels"].items():
            base = single["levels"][c]["request_throughput"]
            lines.append(f"{run_['name']:<10} {c:>5} {row['request_throughput']:>8.1f} "
                         f"{row['request_throughput'] / base:>8.2f}x {row['e2e_ms']['median']:>11.1f} "
                         f"{row['e2e_ms']['p99']:>11.1f} {row['failed']:>6}")
    for ingress, added in report["proxy_added_ms"].items():
        lines.append(f"{ingress} added latency (median E2E, {ingress} x1 - single, concurrency "
                     f"{report['proxy_level']}): {added:.1f} ms")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report["runs"]]
    levels = list(report["runs"][0]["levels"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(levels)
    for i, c in enumerate(levels):
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [r["levels"][c]["request_throughput"] for r in report["runs"]], width,
                    label=f"concurrency {c}")
        axes[1].bar(xs, [r["levels"][c]["e2e_ms"]["median"] for r in report["runs"]], width,
                    label=f"concurrency {c}")
    axes[0].set_ylabel("requests / s")
    axes[1].set_ylabel("median end-to-end latency (ms)")
    for ax in axes:
        ax.set_xticks([j + width * (len(levels) - 1) / 2 for j in range(len(names))], names, rotation=20)
        ax.legend()
    fig.suptitle(f"engine bench replicas ({report['cpu_count']} CPUs, {report['model']} model)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    from engine.bench.serve import questions

    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise RuntimeError('engine bench replicas needs the Ray Serve extra: pip install -e ".[ray]"')
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.replicas < 2:
        raise ValueError("--concurrency needs integers >= 1 and --replicas at least 2")
    prompts = questions(args.num_prompts, args.seed)
    body = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True}
    common = (["--model", args.model] if args.model else []) + [
        "--max-batch-size", str(args.max_batch_size), "--torch-threads", str(args.torch_threads)]
    ingresses = [i.strip() for i in args.ingress.split(",") if i.strip()]
    if not ingresses or set(ingresses) - {"proxy", "haproxy"}:
        raise ValueError(f"--ingress={args.ingress!r}: expected proxy, haproxy or both, comma-separated")
    plans = [("single", common, 1)]
    for ingress in ingresses:
        ray_args = common + ["--ray-ingress", ingress]
        plans += [(f"{ingress} x1", ray_args + ["--replicas", "1", "--ray-address", "local"], 1),
                  (f"{ingress} x{args.replicas}", ray_args + ["--replicas", str(args.replicas)], args.replicas)]
    runs = [measure(name, serve_args, n, levels, prompts, body, args.startup_timeout)
            for name, serve_args, n in plans]
    low = min(levels)
    single_e2e = runs[0]["levels"][low]["e2e_ms"]["median"]
    report = {"model": args.model or "bundled", "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
              "cpu_count": os.cpu_count(), "runs": runs, "proxy_level": low,
              "proxy_added_ms": {r["name"].split()[0]: r["levels"][low]["e2e_ms"]["median"] - single_e2e
                                 for r in runs if r["name"].endswith(" x1")}}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 1 if any(row["failed"] for r in runs for row in r["levels"].values()) else 0
