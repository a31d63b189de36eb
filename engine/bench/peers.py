"""``engine bench peers``: this server against the servers a user would otherwise run, on one model.

    engine bench peers --model ~/.cache/coconut-serve/models/SmolLM2-135M-Instruct \\
        --json docs/bench/peers_smollm2_cpu.json --plot docs/bench/peers_smollm2_cpu.png

Each named server (``--servers``) is started in turn on the same model directory and
dtype, on its own defaults plus ``--args-NAME``, and driven by one client
(``engine.bench.peers_client``) with the same requests: streamed chat completions, greedy,
``--max-tokens`` answer tokens each (prompts ask for long essays, so that the cap, not
the end token, ends every answer; each level reports the tokens it got), first at each
closed-loop concurrency of ``--concurrency``, then at each Poisson arrival rate of
``--rates``. Only one server runs at a time; the next starts after the previous exited.

- ``coconut``: ``engine serve`` (this server);
- ``transformers``: ``transformers serve --continuous-batching`` (transformers 5.x: a
  paged KV cache, continuous batching, OpenAI routes);
- ``llamacpp``: ``python -m llama_cpp.server`` (``pip install 'llama-cpp-python[server]'``)
  on ``--gguf``: the model at the GGUF file's own precision, reported with it, not a target.

Per level and server, as vLLM's ``bench serve`` and GuideLLM report them: request
throughput, output tok/s, TTFT, TPOT, ITL and end-to-end latency (mean, median, p99),
goodput (requests per second that met ``--slo-ttft-ms`` and ``--slo-tpot-ms``), errors,
and the server's CPU seconds per output token (its process and its children, from
``/proc``). Answers are compared between servers prompt by prompt (greedy: the same text
is expected, up to float reassociation in batches of different shapes).

With ``--floors`` (default on) the run ends, servers stopped, with the machine's floors
for the model's decode step (``engine.bench.floors``) and the engine's own step beside
them, at ``--floor-batches`` on ``--floor-threads`` threads, timed in a child process under
the engine process's environment (``engine.process_engine.engine_environment``), so that
the step timed is the one the server runs; in ``--floor-turns`` turns of steps then floors,
each ratio the median of the turns' own (``engine.bench.floors.side_by_side``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from engine.bench.common import log
from engine.sources import add_model_arguments

SERVERS = ("coconut", "transformers", "llamacpp")

TOPICS = ["the history of the printing press", "how bridges carry weight", "the water cycle",
          "the life of honey bees", "why the sky is blue", "the invention of the telephone",
          "how volcanoes form", "the rules of chess", "the migration of birds", "how a compiler works",
          "the causes of the seasons", "the discovery of penicillin", "how rainbows form",
          "the building of the pyramids", "the role of forests in the climate", "how vaccines work",
          "the history of the bicycle", "how the heart pumps blood", "the first moon landing",
          "the structure of an atom", "how trains run on rails", "the history of paper money",
          "how bees make honey", "the life cycle of stars", "how a refrigerator keeps food cold",
          "the Roman aqueducts", "the growth of coral reefs", "how electricity reaches a house",
          "the history of the Olympic games", "how glaciers shape valleys", "the invention of the clock",
          "how plants turn light into food"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("peers", help="this server against transformers serve (and llama.cpp) on one model",
                       description=__doc__.split("\n\n")[0])
    add_model_arguments(p, "the model every server loads (a directory, a .gguf file or a Hub id)")
    p.add_argument("--servers", default="coconut,transformers",
                   help=f"comma-separated, run in this order, from {', '.join(SERVERS)} (default coconut,transformers; "
                        f"'' for the floors alone)")
    p.add_argument("--dtype", default="float32", help="weights dtype given to every server (default float32)")
    p.add_argument("--chat-template", default=None, metavar="NAME_OR_FILE",
                   help="a chat template for a model without one (a base model, which transformers serve refuses "
                        "chat requests for): a Jinja file, or a bundled one by name "
                        f"({', '.join(bundled_chat_templates())}); every server then loads a copy of the model "
                        "directory (links to its files) whose tokenizer_config.json carries it")
    p.add_argument("--gguf", default=None, help="the model's GGUF file, for llamacpp")
    p.add_argument("--concurrency", default="1,4,16,32,64", help="closed-loop levels (default 1,4,16,32,64)")
    p.add_argument("--rates", default="0.5,1,2", help="Poisson arrival rates in requests/s ('' for none; default 0.5,1,2)")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (default: max(8, 2 x concurrency); 32 per rate)")
    p.add_argument("--max-tokens", type=int, default=64, help="answer tokens per request (default 64)")
    p.add_argument("--slo-ttft-ms", type=float, default=3000.0, help="goodput's TTFT bound (default 3000)")
    p.add_argument("--slo-tpot-ms", type=float, default=250.0, help="goodput's TPOT bound (default 250)")
    for name in SERVERS:
        p.add_argument(f"--args-{name}", default="", help=f"extra command-line arguments of the {name} server")
    p.add_argument("--port", type=int, default=8790, help="the port every server listens on in turn (default 8790)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--floors", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the decode step's floors and the engine's step after the servers (default on)")
    p.add_argument("--floor-batches", default="1,16,32", help="batches of the floors (default 1,16,32)")
    p.add_argument("--floor-turns", type=int, default=5,
                   help="turns of the engine's steps then the floors, each ratio the turns' median (default 5)")
    p.add_argument("--floor-threads", type=int, default=None,
                   help="threads of the floors (default: what engine serve gives its engine process for the model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson gaps")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a chart of the levels")
    p.set_defaults(func=run)


# ---------------------------------------------------------------- servers

CHAT_TEMPLATES = Path(__file__).with_name("chat_templates")


def bundled_chat_templates() -> list[str]:
    return sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja"))


def with_chat_template(directory: Path, template: str, into: Path) -> Path:
    """A copy of the model ``directory`` in ``into`` (links to its files) whose
    ``tokenizer_config.json`` carries ``template`` (a bundled name or a Jinja file)."""
    source = CHAT_TEMPLATES / f"{template}.jinja"
    if not source.is_file():
        source = Path(template).expanduser()
    if not source.is_file():
        raise ValueError(f"--chat-template {template!r}: not a file nor a bundled template "
                         f"(expected one of {', '.join(bundled_chat_templates())}, or a Jinja file)")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    into.mkdir(parents=True, exist_ok=True)
    for item in directory.iterdir():
        if item.name not in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
            (into / item.name).symlink_to(item.resolve())
    config["chat_template"] = source.read_text().strip()
    (into / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return into


def server_command(name: str, directory: Path, args: argparse.Namespace) -> list[str]:
    port = str(args.port)
    extra = shlex.split(getattr(args, f"args_{name}"))
    if name == "coconut":
        return [sys.executable, "-c", "from engine.cli import main; main()", "serve", "--model", str(directory),
                "--host", "127.0.0.1", "--port", port, "--dtype", args.dtype, "--log-level", "warning", *extra]
    if name == "transformers":
        exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
        return [exe, "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", port, "--dtype", args.dtype,
                "--log-level", "warning", *extra, str(directory)]
    if name == "llamacpp":
        if not args.gguf:
            raise ValueError("--servers llamacpp needs --gguf FILE (the model's GGUF file)")
        return [sys.executable, "-m", "llama_cpp.server", "--model", args.gguf, "--host", "127.0.0.1",
                "--port", port, *extra]
    raise ValueError(f"unknown server {name!r}: expected one of {', '.join(SERVERS)}")


def unavailable(name: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    import importlib.util

    if name == "transformers" and importlib.util.find_spec("fastapi") is None:
        return "transformers serve needs fastapi and uvicorn (pip install 'transformers[serving]')"
    if name == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama.cpp's server is not installed (pip install 'llama-cpp-python[server]')"
    return None


class RunningServer:
    """One server process, started, waited for and stopped; its log goes to a file."""

    def __init__(self, name: str, command: list[str], url: str, log_path: Path):
        self.name, self.command, self.url, self.log_path = name, command, url, log_path
        self.log = open(log_path, "wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> str:
        """Wait for ``GET /v1/models``; returns the first model id it lists."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before it served; "
                                   f"its log: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                    data = json.loads(r.read())["data"]
                    return data[0]["id"] if data else ""
            except OSError:
                time.sleep(1.0)
        raise TimeoutError(f"{self.name} did not serve within {timeout:.0f} s; its log: {self.tail()}")

    def tail(self, n: int = 1500) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


# ---------------------------------------------------------------- levels


def prompts(n: int) -> list[str]:
    return [f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def goodput(traces, duration: float, ttft_ms: float, tpot_ms: float) -> float:
    """Requests per second that finished without error within both SLOs (vLLM's goodput)."""
    good = 0
    for t in traces:
        if t.error is not None or t.end is None or t.first is None:
            continue
        tpot = (t.end - t.first) / (t.tokens - 1) if t.tokens > 1 else 0.0
        if (t.first - t.start) * 1000 <= ttft_ms and tpot * 1000 <= tpot_ms:
            good += 1
    return good / duration


def run_level(url: str, model: str, kind: str, value: float, args: argparse.Namespace, pid: int) -> dict:
    from engine.bench.peers_client import ChatPool, chat_body, closed_loop, poisson
    from engine.bench.serve import process_cpu, summarize

    n = args.requests or (max(8, 2 * int(value)) if kind == "concurrency" else 32)
    bodies = [chat_body(model, p, args.max_tokens) for p in prompts(n)]

    async def go():
        pool = ChatPool(url)
        try:
            if kind == "concurrency":
                return await closed_loop(pool, bodies, int(value))
            return await poisson(pool, bodies, value, args.seed)
        finally:
            await pool.close()

    before = process_cpu(pid)
    result = asyncio.run(go())
    after = process_cpu(pid)
    row = summarize(result.traces, result.duration_s)
    row.pop("latent_ms", None)
    row.update({kind: value, "requests": n, "texts": result.texts,
                "goodput": goodput(result.traces, result.duration_s, args.slo_ttft_ms, args.slo_tpot_ms)})
    if before and after and row["total_output_tokens"]:
        row["server_cpu_s_per_output_token"] = (sum(after) - sum(before)) / row["total_output_tokens"]
    return row


def drive(name: str, directory: Path, args: argparse.Namespace, workdir: Path) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    server = RunningServer(name, server_command(name, directory, args), url, workdir / f"{name}.log")
    try:
        model = server.wait_ready(args.startup_timeout)
        startup = time.perf_counter() - server.started
        log(f"{name}: serving {model!r} after {startup:.1f} s")
        if name == "transformers":
            model = str(directory)
        from engine.bench.peers_client import ChatPool, chat_body, closed_loop
        from engine.bench.serve import process_cpu

        async def warm():
            pool = ChatPool(url)
            try:
                return await closed_loop(pool, [chat_body(model, p, 8) for p in prompts(4)], 4)
            finally:
                await pool.close()
        warmed = asyncio.run(warm())
        if any(t.error for t in warmed.traces):
            raise RuntimeError(f"{name}: warm-up failed: {[t.error for t in warmed.traces if t.error][:2]}")
        levels = [("concurrency", float(c)) for c in _numbers(args.concurrency)]
        levels += [("rate", r) for r in _numbers(args.rates)]
        rows = []
        for kind, value in levels:
            log(f"{name}: {kind} {value:g}")
            row = run_level(url, model, kind, value, args, server.process.pid)
            log(f"  {row['output_throughput']:.1f} tok/s, TTFT median {_ms(row['ttft_ms']['median'])}, "
                f"ITL median/p99 {_ms(row['itl_ms']['median'])}/{_ms(row['itl_ms']['p99'])}, "
                f"{row['failed']} failed")
            rows.append(row)
        return {"command": server.command, "startup_s": startup, "levels": rows,
                "cpu_s": list(process_cpu(server.process.pid) or (0.0, 0.0))}
    finally:
        server.stop()


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f} ms"


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    from engine.bench.common import local_model
    from engine.bench.models import OtherLoad, machine_facts

    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in names:
        if name not in SERVERS:
            raise ValueError(f"--servers: unknown server {name!r}: expected some of {', '.join(SERVERS)}")
    if args.model is None:
        raise ValueError("--model is required: the model every server loads")
    directory = Path(local_model(args.model, args.revision, args.dtype))
    report = {"model": args.model, "directory": str(directory), "dtype": args.dtype, "max_tokens": args.max_tokens,
              "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}, "machine": machine_facts("cpu"),
              "servers": {}, "skipped": {}}
    load = OtherLoad()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        served = directory
        if args.chat_template:
            served = with_chat_template(directory, args.chat_template, Path(tmp) / "model")
            report["chat_template"] = args.chat_template
        for name in names:
            why = unavailable(name)
            if why:
                log(f"{name}: skipped: {why}")
                report["skipped"][name] = why
                continue
            report["servers"][name] = drive(name, served, args, Path(tmp))
    report["same_answers"] = same_answers(report["servers"])
    if args.floors:
        report["floors"] = floors_report(directory, args)
    # the rest of the machine: OtherLoad counts the servers' own processes as this one's
    # children, not their children (the engine process): those are taken off here
    other = load.report()
    grandchildren = sum(s["cpu_s"][1] for s in report["servers"].values())
    other["other_processes_cpu_s"] = max(0.0, other["other_processes_cpu_s"] - grandchildren)
    other["other_processes_cores"] = other["other_processes_cpu_s"] / other["wall_s"]
    report["other_load"] = other
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        log(f"wrote {args.json}")
    if args.plot:
        from engine.bench.peers_plot import plot

        plot(report, args.plot)
        log(f"wrote {args.plot}")
    failed = sum(row["failed"] for s in report["servers"].values() for row in s["levels"])
    return 1 if failed else 0


def same_answers(servers: dict) -> dict:
    """Per server other than the first: the share of its answers equal to the first's, per level."""
    names = list(servers)
    out = {}
    for name in names[1:]:
        pairs = [(a, b) for ra, rb in zip(servers[names[0]]["levels"], servers[name]["levels"])
                 for a, b in zip(ra["texts"], rb["texts"])]
        out[name] = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return out


def floors_report(directory: Path, args: argparse.Namespace) -> dict:
    """The floors and the engine's decode step, measured in a child process that runs under
    the engine process's environment (``engine_environment``: its threads' spin, its
    allocator) and thread count, so that the step timed is the step the server runs."""
    from engine.process_engine import engine_environment

    if args.floor_threads:
        threads = args.floor_threads
    else:   # what engine serve gives its engine process for this model
        from server.app import engine_process_threads
        from server.settings import ServerSettings

        threads = engine_process_threads(ServerSettings(model=str(directory)))
    batches = [int(b) for b in _numbers(args.floor_batches)]
    # the step the server runs: compiled where engine serve compiles it (unset: where it pays)
    flags = shlex.split(getattr(args, "args_coconut", ""))
    compiled = True if "--compile" in flags else False if "--no-compile" in flags else None
    spec = {"directory": str(directory), "batches": batches, "threads": threads, "dtype": args.dtype,
            "compile": compiled, "turns": max(1, getattr(args, "floor_turns", 5))}
    mode = {True: "compiled", False: "eager", None: "compiled where it pays, as engine serve"}[compiled]
    log(f"floors: {spec['turns']} turns of the engine's decode step ({mode}) at batches {batches} on {threads} "
        f"thread(s), then memory bandwidth and the model's matrix products, in a child process with the engine "
        f"process's environment")
    env = {**engine_environment(), **os.environ}       # values set by the user win, as for the engine
    command = [sys.executable, "-c", "from engine.bench.peers import floors_child; floors_child()", json.dumps(spec)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the floors' child process failed (exit {done.returncode}); its log is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def floors_child() -> None:
    """``floors_report``'s child: the spec as JSON in argv[1]; the report, with the engine
    process's variables as this process saw them (``environment``), as JSON on stdout."""
    import torch

    from engine.bench import floors
    from engine.process_engine import engine_environment

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    report, runner = floors.side_by_side(spec["directory"], spec["batches"], dtype=spec["dtype"], prompt_tokens=40,
                                         new_tokens=24, turns=spec.get("turns", 5), max_prefill_tokens=4096,
                                         compile=spec.get("compile"))
    report["compiled_step"] = runner.compiled_decode is not None or runner.compile_modules
    report["environment"] = {name: os.environ.get(name) for name in engine_environment()}
    print(json.dumps(report))


def table(report: dict) -> str:
    servers = report["servers"]
    names = list(servers)
    lines = [f"{report['model']} ({report['dtype']}), {report['max_tokens']} answer tokens, streamed greedy chat"]
    head = f"{'level':>10} {'server':>13} {'tok/s':>7} {'req/s':>6} {'good/s':>6} {'TTFT med':>9} {'TPOT med':>9} " \
           f"{'ITL med':>8} {'ITL p99':>8} {'E2E med':>8} {'CPU s/tok':>9} {'fail':>4}"
    lines.append(head)
    for i, first in enumerate(servers[names[0]]["levels"] if names else []):
        kind = "concurrency" if "concurrency" in first else "rate"
        label = f"c={first[kind]:g}" if kind == "concurrency" else f"{first[kind]:g}/s"
        for name in names:
            r = servers[name]["levels"][i]
            cpu = r.get("server_cpu_s_per_output_token")
            lines.append(f"{label:>10} {name:>13} {r['output_throughput']:7.1f} {r['request_throughput']:6.2f} "
                         f"{r['goodput']:6.2f} {_ms(r['ttft_ms']['median']):>9} {_ms(r['tpot_ms']['median']):>9} "
                         f"{_ms(r['itl_ms']['median']):>8} {_ms(r['itl_ms']['p99']):>8} "
                         f"{_ms(r['e2e_ms']['median']):>8} {'-' if cpu is None else f'{cpu:.3f}':>9} {r['failed']:>4}")
        if len(names) > 1:
            a, b = servers[names[0]]["levels"][i], servers[names[1]]["levels"][i]
            if b["output_throughput"]:
                lines.append(f"{'':>10} {'ratio':>13} {a['output_throughput'] / b['output_throughput']:7.2f}x "
                             f"output tok/s, {names[0]} / {names[1]}")
    for name, share in report.get("same_answers", {}).items():
        if share is not None:
            lines.append(f"answers equal to {names[0]}'s: {name} {100 * share:.0f}%")
    floors = report.get("floors")
    if floors:
        lines.append(f"floors on {floors['threads']} thread(s): weights {floors['weight_bytes'] / 1e6:.0f} MB, "
                     f"read at {floors['read_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s: memory floor "
                     f"{floors['memory_floor_ms']:.1f} ms")
        for batch, row in floors["batches"].items():
            step = row.get("engine_step_ms")
            kind = "compiled step" if floors.get("compiled_step") else "step"
            ratios = "" if step is None else (f", engine {kind} {step:.1f} ms = {row['step_over_memory_floor']:.2f}x "
                                              f"memory, {row['step_over_matrix_floor']:.2f}x matrix floor")
            turns = [t["batches"][batch] for t in floors.get("turns", []) if "engine_step_ms" in t["batches"][batch]]
            if step is not None and len(turns) > 1:    # each turn's ratio to the floor batch b is held to
                key = "step_over_memory_floor" if batch == "1" else "step_over_matrix_floor"
                ratios += f" (turns: {' / '.join(f'{t[key]:.2f}x' for t in turns)})"
            lines.append(f"  batch {batch}: matrix floor {row['matrix_floor_ms']:.1f} ms "
                         f"({row['matrix_flops_per_s'] / 1e9:.1f} GFLOP/s){ratios}")
    return "\n".join(lines)
