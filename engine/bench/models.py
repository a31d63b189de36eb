"""``engine bench models``: a real model's load time, memory and decode step, against transformers.

One model (default: SmolLM2-135M-Instruct as ``engine models fetch smollm2`` leaves it),
measured in one run (the machines are shared and noisy, so only figures measured side by
side mean something):

1. Load, each in a fresh process (no import, allocator or weight cache carries over from
   one load to the next; the files themselves are in the page cache), ``--repeats`` times
   each, the kinds interleaved, medians reported:

   - ``gguf``: ``Engine.from_pretrained(FILE.gguf)``, which dequantizes at every start;
   - ``converted``: ``Engine.from_pretrained(DIR)`` of the directory ``engine convert gguf``
     wrote from that file once beforehand (that conversion is timed too, once, apart);
   - ``transformers``: ``AutoModelForCausalLM.from_pretrained(DIR)`` alone, the peer.

   The time is that of the load call itself, measured inside the child after its imports
   (the child's whole life, imports and the one-token forward below included, is
   ``process_s``). Memory: the child's RSS
   after the load (``/proc/self/status`` VmRSS, and its anonymous and file-backed parts),
   its peak RSS (``getrusage``), its RSS after one forward of one token (safetensors
   weights are mapped from the file, so transformers' RSS after the load counts only the
   pages read so far; the engine's start-up already ran a forward), and for the engine
   the KV cache it preallocates (``--load-batch-size`` slots x the engine's sequence
   limit, part of its RSS) and its RSS before that allocation. With ``--gguf
   none`` (or a ``--model`` that is not the GGUF's) there is no GGUF: ``converted`` and
   ``transformers`` load ``--model``'s directory.
2. Decode step at each batch size of ``--batches``, on the same weights: the engine
   (``max_batch_size`` = the batch, B requests of ~``--prompt-tokens``-token prompts,
   greedy, ``ignore_eos``, ``--max-tokens`` new tokens; the time of each ``step()`` once
   every row decodes, prefill excluded) against transformers' own loop on the same model
   object (``generate`` on a ``DynamicCache``, the same prompts left-padded, greedy,
   ``min_new_tokens`` = ``max_new_tokens``; a logits processor stamps the time at each
   new token, and a step is the gap between two stamps: one forward of one position per
   row and generate's own bookkeeping, the first token's prefill excluded). Engine and
   transformers rounds alternate (``--rounds``); per batch the median over rounds of each
   round's median step, and the ratio engine / transformers of those medians (below 1:
   the engine's step is faster). ``same_tokens``: the share of rows whose greedy tokens
   are the same on both sides up to the first end token (there the engine, ignoring it,
   emits it and goes on, while ``min_new_tokens`` makes generate take the runner-up).

Writes a table to stdout, the figures and the machine's facts as JSON (``--json``) and a
plot beside it (the same name, ``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.bench.common import log

DEFAULT_MODEL = "smollm2"   # engine.fetch_models' name
DEFAULT_JSON = Path(__file__).resolve().parents[2] / "docs" / "bench" / "real_models.json"
LOAD_KINDS = {   # kind -> (label, what is loaded)
    "gguf": "engine <- .gguf",
    "converted": "engine <- converted dir",
    "transformers": "transformers <- dir",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="a real model: load time and memory (GGUF, converted, transformers) and "
                                      "decode step vs transformers generate",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a checkpoint directory, a .gguf file or a Hub id (default: "
                                                 "the fetched smollm2, `engine models fetch smollm2`)")
    p.add_argument("--revision", default=None, help="the Hub id's branch, tag or commit (default: main)")
    p.add_argument("--gguf", default=None, help="the GGUF file whose load is timed, or 'none' to skip it "
                                                "(default: --model when it is a .gguf file, else the fetched "
                                                "smollm2's when --model is unset, else none)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, here and in every load process "
                                                             "(default: torch's)")
    p.add_argument("--repeats", type=int, default=2, help="fresh-process loads of each kind (default 2)")
    p.add_argument("--load-batch-size", type=int, default=32,
                   help="the loaded engine's max_batch_size: its KV cache slots (default 32, the engine's)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="every engine's max_seq_len (default: the engine's, the model's context up to 4096)")
    p.add_argument("--batches", default="1,32", help="comma-separated decode batch sizes (default 1,32)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default 64)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="alternating engine / transformers rounds per batch "
                                                         "(default 3)")
    p.add_argument("--skip-load", action="store_true", help="only the decode step")
    p.add_argument("--skip-steps", action="store_true", help="only the loads")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (default 0)")
    p.add_argument("--json", default=str(DEFAULT_JSON), metavar="PATH",
                   help="where the JSON goes, the plot beside it as .png (default docs/bench/real_models.json); "
                        "'none': neither")
    p.set_defaults(func=run)


# ------------------------------------------------------------------ the model and its files

def resolve_files(args: argparse.Namespace) -> tuple[str, Path | None, Path]:
    """(the model's name, the GGUF file or None, the checkpoint directory of --model)."""
    from engine.bench.common import local_model

    gguf = None if args.gguf is None or args.gguf.lower() == "none" else Path(args.gguf).expanduser()
    if args.model is None:
        from engine.fetch_models import gguf_path, is_fetched, model_dir

        if not is_fetched(DEFAULT_MODEL):
            raise ValueError(f"{DEFAULT_MODEL} is not fetched: run `engine models fetch {DEFAULT_MODEL}` "
                             f"(or give --model)")
        directory, name = model_dir(DEFAULT_MODEL), DEFAULT_MODEL
        if args.gguf is None:
            gguf = gguf_path(DEFAULT_MODEL)
    else:
        name = args.model
        if args.gguf is None and str(args.model).lower().endswith(".gguf") and Path(args.model).is_file():
            gguf = Path(args.model)
        directory = local_model(args.model, args.revision, args.dtype)
    if gguf is not None and not gguf.is_file():
        raise ValueError(f"--gguf {gguf}: no such file")
    return name, gguf, Path(directory)


# ------------------------------------------------------------------ loads, each in a fresh process

def _status_bytes(*fields: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` (VmRSS, RssAnon, RssFile, ...) in bytes."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                found[key] = int(value.split()[0]) * 1024
    return found


def _vmrss_bytes() -> int:
    return _status_bytes("VmRSS").get("VmRSS", 0)


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux


def child_main(spec: dict) -> dict:
    """One load (or the conversion) in this fresh process: ``spec["kind"]`` is ``gguf``,
    ``converted``, ``transformers`` or ``convert``. Imports first, then the timed call."""
    entered = time.perf_counter()
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kind, path, dtype, device = spec["kind"], spec["path"], spec["dtype"], spec["device"]
    import transformers  # noqa: F401   (imported by every kind; not part of the timed call)

    split: dict = {}
    if kind == "transformers":
        from transformers import AutoModelForCausalLM

        def call():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
            return model.to(device).eval()
    elif kind in ("gguf", "converted"):
        import engine.gguf
        import engine.sync_engine
        from engine.sync_engine import Engine

        # the pieces of Engine.from_pretrained: the checkpoint (dequantizing a .gguf
        # first), then the engine over it (the KV cache's allocation)
        load_checkpoint, materialize = engine.sync_engine.load_checkpoint, engine.gguf.materialize

        def timed_checkpoint(*a, **kw):
            t0 = time.perf_counter()
            result = load_checkpoint(*a, **kw)
            split["checkpoint_s"] = time.perf_counter() - t0
            split["rss_before_kv_cache_bytes"] = _vmrss_bytes()
            return result

        def timed_materialize(*a, **kw):
            t0 = time.perf_counter()
            result = materialize(*a, **kw)
            split["dequantize_s"] = time.perf_counter() - t0
            return result

        engine.sync_engine.load_checkpoint, engine.gguf.materialize = timed_checkpoint, timed_materialize
        options = {"max_batch_size": spec["max_batch_size"]}
        if spec.get("max_seq_len"):
            options["max_seq_len"] = spec["max_seq_len"]

        def call():
            return Engine.from_pretrained(path, device=device, dtype=dtype, **options)
    elif kind == "convert":
        import engine.gguf  # noqa: F401
        from engine.cli import main

        def call():
            if main(["convert", "gguf", path, "--out", spec["out"], "--dtype", dtype]) != 0:
                raise RuntimeError("engine convert gguf failed")
    else:
        raise ValueError(f"unknown load kind {kind!r}")
    rss_before = _vmrss_bytes()
    imports_s = time.perf_counter() - entered
    t0 = time.perf_counter()
    loaded = call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    memory, ru_maxrss = _status_bytes("VmRSS", "RssAnon", "RssFile"), _peak_rss_bytes()
    rss_after = memory.get("VmRSS", 0)
    # the kernel updates the high-water mark lazily: it may lag the RSS read just now by a few pages
    out = {"kind": kind, "seconds": seconds, "imports_s": imports_s, "rss_before_load_bytes": rss_before,
           "rss_after_load_bytes": rss_after, "peak_rss_bytes": max(ru_maxrss, rss_after),
           "ru_maxrss_bytes": ru_maxrss, "rss_anon_after_load_bytes": memory.get("RssAnon"),
           "rss_file_after_load_bytes": memory.get("RssFile"), "threads": torch.get_num_threads(), **split}
    if kind in ("gguf", "converted"):
        out["kv_cache_bytes"] = loaded.runner.cache.memory_bytes
        out["kv_cache_slots"], out["max_seq_len"] = loaded.config.max_batch_size, loaded.max_seq_len
        out["engine_init_s"] = seconds - split.get("checkpoint_s", float("nan"))
        from engine import SamplingParams

        loaded.generate("Hello", SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    if kind == "transformers":
        out["parameter_bytes"] = sum(p.numel() * p.element_size() for p in loaded.parameters())
        with torch.inference_mode():   # safetensors weights are mapped: a forward reads every page in
            loaded(torch.zeros((1, 1), dtype=torch.long, device=loaded.device))
    if kind != "convert":   # after one forward (one token): the weights' pages all resident
        out["rss_after_forward_bytes"] = _vmrss_bytes()
    return out


def run_child(spec: dict) -> dict:
    """``child_main(spec)`` in a fresh interpreter; adds ``process_s`` (its whole life)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "engine.bench.models", "--child", json.dumps(spec), str(result_file)]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        process_s = time.perf_counter() - t0
        if done.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"the {spec['kind']} load process failed (exit {done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}")
        result = json.loads(result_file.read_text())
    result["process_s"] = process_s
    return result


def measure_loads(args, gguf: Path | None, directory: Path, tmp: str) -> dict:
    med = statistics.median
    base = {"dtype": args.dtype, "device": args.device, "threads": args.threads,
            "max_batch_size": args.load_batch_size, "max_seq_len": args.max_seq_len}
    out: dict = {"conversion": None, "kinds": {}}
    paths = {"converted": str(directory), "transformers": str(directory)}
    if gguf is not None:
        converted = Path(tmp) / "converted"
        log(f"converting {gguf} once (engine convert gguf, a fresh process)")
        c = run_child({**base, "kind": "convert", "path": str(gguf), "out": str(converted)})
        out["conversion"] = {"seconds": c["seconds"], "process_s": c["process_s"], "runs": 1,
                             "peak_rss_bytes": c["peak_rss_bytes"], "file": str(gguf),
                             "file_bytes": gguf.stat().st_size,
                             "out_bytes": sum(f.stat().st_size for f in converted.iterdir() if f.is_file())}
        paths = {"gguf": str(gguf), "converted": str(converted), "transformers": str(converted)}
    runs: dict[str, list[dict]] = {kind: [] for kind in paths}
    for i in range(args.repeats):
        for kind, path in paths.items():
            log(f"load {i + 1}/{args.repeats}: {LOAD_KINDS[kind]} ({path}), a fresh process")
            runs[kind].append(run_child({**base, "kind": kind, "path": path}))
    for kind, results in runs.items():
        row = {"label": LOAD_KINDS[kind], "path": paths[kind], "runs": results}
        for key in ("seconds", "process_s", "imports_s", "rss_before_load_bytes", "rss_after_load_bytes",
                    "peak_rss_bytes", "rss_anon_after_load_bytes", "rss_file_after_load_bytes",
                    "rss_after_forward_bytes", "checkpoint_s", "dequantize_s", "engine_init_s", "rss_before_kv_cache_bytes",
                    "kv_cache_bytes", "parameter_bytes"):
            values = [r[key] for r in results if r.get(key) is not None]
            if values:
                row[key] = med(values)
        for key in ("kv_cache_slots", "max_seq_len", "threads"):
            if key in results[0]:
                row[key] = results[0][key]
        out["kinds"][kind] = row
    kinds = out["kinds"]
    out["ratios"] = {"converted_over_transformers_s": kinds["converted"]["seconds"] / kinds["transformers"]["seconds"]}
    if "gguf" in kinds:
        out["ratios"]["gguf_over_converted_s"] = kinds["gguf"]["seconds"] / kinds["converted"]["seconds"]
        out["ratios"]["gguf_over_transformers_s"] = kinds["gguf"]["seconds"] / kinds["transformers"]["seconds"]
    return out


# ------------------------------------------------------------------ decode step: engine vs generate

def make_prompts(engine, n: int, target_tokens: int, seed: int, sampling, latent) -> list[str]:
    """``n`` ProsQA-like questions whose prompts (chat template included) are ~target_tokens long."""
    from engine.bench.latency import make_questions

    tokenizer = engine.tokenizer
    probe = "Is Tom a wumpus?"
    overhead = (len(engine.make_request(probe, sampling, latent).prompt_token_ids)
                - len(tokenizer(probe)["input_ids"]))
    return make_questions(tokenizer, n, max(16, target_tokens - overhead), seed)


def engine_round(engine, questions, sampling, latent) -> dict:
    """The B questions submitted at once and stepped until done: the prefill (the steps
    before every row decodes) and each step's seconds while every row decodes."""
    ids = [engine.add_request(q, sampling, latent) for q in questions]
    finished, steps, prefill = {}, [], 0.0
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outs = engine.step()
        seconds = time.perf_counter() - t0
        if engine.core.last_stats.batch_size == len(questions):   # every row decodes: no prompt in this step
            steps.append(seconds)
        elif not steps:
            prefill += seconds
        finished.update({o.request_id: o for o in outs if o.finished})
    return {"prefill_s": prefill, "steps_s": steps, "tokens": [list(finished[i].token_ids) for i in ids]}


def hf_round(model, prompts: list[list[int]], pad_id: int, new_tokens: int) -> dict:
    """transformers' ``generate`` over the prompts (left-padded, one batch, DynamicCache,
    greedy, exactly ``new_tokens`` new tokens); a logits processor stamps each new token."""
    import inspect

    import torch
    from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

    cuda = model.device.type == "cuda"

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            if cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            return scores

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    # the cache argument's name: ``cache`` from transformers 5.24, ``past_key_values`` before
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    clock = StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg: DynamicCache(config=model.config)},
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                             logits_processor=LogitsProcessorList([clock]))
    stamps = clock.stamps
    return {"prefill_s": stamps[0] - t0, "steps_s": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": out[:, width:].tolist()}


def measure_steps(args, directory: Path) -> dict:
    import torch

    from engine import Engine, LatentPolicy, SamplingParams

    med = statistics.median
    batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    warm_sampling = SamplingParams(max_tokens=min(4, args.max_tokens), temperature=0.0, ignore_eos=True)
    latent = LatentPolicy(mode="none")
    out: dict = {}
    for batch in batches:
        log(f"batch {batch}: loading the engine (max_batch_size {batch})")
        options = {"max_batch_size": batch, "seed": args.seed,
                   "max_prefill_tokens": max(8192, 2 * batch * args.prompt_tokens)}
        if args.max_seq_len:
            options["max_seq_len"] = args.max_seq_len
        engine = Engine.from_pretrained(directory, device=args.device, dtype=args.dtype, **options)
        model, pad = engine.checkpoint.model, engine.checkpoint.markers.pad
        questions = make_prompts(engine, batch, args.prompt_tokens, args.seed, sampling, latent)
        prompts = [engine.make_request(q, sampling, latent).prompt_token_ids for q in questions]
        engine_round(engine, questions, warm_sampling, latent)       # warm-up, both sides
        hf_round(model, prompts, pad, min(4, args.max_tokens))
        engine_runs, hf_runs = [], []
        for i in range(args.rounds):
            log(f"batch {batch}, round {i + 1}/{args.rounds}: engine, then transformers generate")
            engine_runs.append(engine_round(engine, questions, sampling, latent))
            hf_runs.append(hf_round(model, prompts, pad, args.max_tokens))
        row: dict = {"requests": batch, "prompt_tokens_mean": statistics.mean(len(p) for p in prompts),
                     "prompt_tokens_min": min(len(p) for p in prompts),
                     "prompt_tokens_max": max(len(p) for p in prompts), "new_tokens": args.max_tokens}
        for side, runs in (("engine", engine_runs), ("hf", hf_runs)):
            row[f"{side}_step_ms_rounds"] = [1000 * med(r["steps_s"]) for r in runs]
            row[f"{side}_step_ms"] = med(row[f"{side}_step_ms_rounds"])
            row[f"{side}_prefill_s"] = med(r["prefill_s"] for r in runs)
            row[f"{side}_steps_per_round"] = len(runs[0]["steps_s"])
        row["engine_over_hf_step"] = row["engine_step_ms"] / row["hf_step_ms"]
        # The engine (ignore_eos) emits an end token where greedy picks one and goes on;
        # min_new_tokens forbids it to generate, which takes the runner-up there: the rows
        # part by design at the first end token, so they compare up to it.
        eos = set(engine.checkpoint.markers.eos)
        cuts = [next((i for i, t in enumerate(e) if t in eos), len(e)) for e in engine_runs[0]["tokens"]]
        row["same_tokens"] = sum(e[:k] == h[:k] for e, h, k in zip(engine_runs[0]["tokens"], hf_runs[0]["tokens"],
                                                                    cuts)) / batch
        row["rows_reaching_eos"] = sum(k < args.max_tokens for k in cuts)
        out[str(batch)] = row
        del engine, model
    return out


# ------------------------------------------------------------------ the run, the report

def machine_facts(device: str) -> dict:
    import platform
    from datetime import datetime, timezone

    import torch
    import transformers

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as f:
            memory = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    facts = {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
             "memory_bytes": memory, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version(), "threads": torch.get_num_threads(), "device": device,
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "load_average_start": list(os.getloadavg())}
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


class OtherLoad:
    """CPU time the rest of the machine spent during a phase: every process's busy time
    (``/proc/stat``: user, nice, system, irq, softirq, steal) less this process's and its
    waited-for children's (``os.times``). Near 0: the figures ran on a quiet machine."""

    def __init__(self):
        self.busy, self.own, self.wall = self._busy(), self._own(), time.perf_counter()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def report(self) -> dict:
        wall = time.perf_counter() - self.wall
        others = max(0.0, (self._busy() - self.busy) - (self._own() - self.own))
        return {"wall_s": wall, "other_processes_cpu_s": others, "other_processes_cores": others / wall}


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.rounds < 1:
        raise ValueError("--repeats and --rounds must be >= 1")
    transformers.logging.set_verbosity_error()   # generate's notes on the model's sampling defaults
    transformers.logging.disable_progress_bar()
    name, gguf, directory = resolve_files(args)
    results: dict = {"command": shlex.join(["engine", *sys.argv[1:]]), "machine": machine_facts(args.device),
                     "config": {k: v for k, v in vars(args).items() if k != "func"},
                     "model": {"name": name, "directory": str(directory), "gguf": str(gguf) if gguf else None}}
    others = results["machine"]["other_load"] = {}
    if not args.skip_load:
        with tempfile.TemporaryDirectory() as tmp:
            phase = OtherLoad()
            results["load"] = measure_loads(args, gguf, directory, tmp)
            others["load"] = phase.report()
    if not args.skip_steps:
        phase = OtherLoad()
        results["steps"] = measure_steps(args, directory)
        others["steps"] = phase.report()
    results["machine"]["load_average_end"] = list(os.getloadavg())
    report(results)
    if args.json and args.json.lower() != "none":
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        plot(results, path.with_suffix(".png"))
        log(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def _mib(value, width: int) -> str:
    return f"{value / 2**20:{width}.0f}" if value is not None else f"{'-':>{width}}"


def report(results: dict) -> None:
    m = results["machine"]
    print(f"model {results['model']['name']} ({results['model']['directory']}); {m['cpu']}, {m['cores']} cores, "
          f"{m['threads']} torch threads; torch {m['torch']}, transformers {m['transformers']}")
    load = results.get("load")
    if load:
        n = results["config"]["repeats"]
        print(f"\nload (median of {n} fresh processes)  {'load s':>7} {'process s':>9} {'RSS MiB':>8} "
              f"{'peak MiB':>8} {'RSS 1 fwd':>9} {'KV MiB':>8} {'RSS pre-KV':>10}")
        for kind, row in load["kinds"].items():
            print(f"{kind + ': ' + row['label']:36} {row['seconds']:7.2f} {row['process_s']:9.2f} "
                  f"{_mib(row['rss_after_load_bytes'], 8)} {_mib(row['peak_rss_bytes'], 8)} "
                  f"{_mib(row.get('rss_after_forward_bytes'), 9)} {_mib(row.get('kv_cache_bytes'), 8)} "
                  f"{_mib(row.get('rss_before_kv_cache_bytes'), 10)}")
        if load["conversion"]:
            c = load["conversion"]
            print(f"conversion (engine convert gguf, once): {c['seconds']:.2f} s (process {c['process_s']:.2f} s, "
                  f"peak RSS {c['peak_rss_bytes'] / 2**20:.0f} MiB)")
        print("  " + ", ".join(f"{k} {v:.2f}x" for k, v in load["ratios"].items()))
    for phase, other in m.get("other_load", {}).items():
        print(f"  during the {phase} phase ({other['wall_s']:.0f} s) other processes used "
              f"{other['other_processes_cpu_s']:.1f} CPU s ({other['other_processes_cores']:.2f} cores)"
              + (": a busy machine, the timings are not to be trusted" if other["other_processes_cores"] > 0.2 else ""))
    steps = results.get("steps")
    if steps:
        print(f"\ndecode step (median ms)  {'engine':>8} {'HF gen':>8} {'eng/HF':>7} {'eng prefill s':>14} "
              f"{'HF prefill s':>13} {'same tokens':>12}")
        for batch, row in steps.items():
            print(f"b={batch:<22} {row['engine_step_ms']:8.2f} {row['hf_step_ms']:8.2f} "
                  f"{row['engine_over_hf_step']:6.2f}x {row['engine_prefill_s']:14.3f} {row['hf_prefill_s']:13.3f} "
                  f"{row['same_tokens']:12.2f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("load", "steps") if results.get(p)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    axes = list(axes[0])
    if "load" in panels:
        ax = axes.pop(0)
        load = results["load"]
        names, parts = [], {"dequantize": [], "weights (checkpoint)": [], "engine init (KV cache)": [],
                            "total": [], "convert": []}
        for kind, row in load["kinds"].items():
            names.append(row["label"].replace(" <- ", "\n<- "))
            deq = row.get("dequantize_s", 0.0)
            ckpt = row.get("checkpoint_s")
            pieces = dict.fromkeys(parts, 0.0)
            if ckpt is None:   # transformers: one piece
                pieces["total"] = row["seconds"]
            else:
                pieces.update({"dequantize": deq, "weights (checkpoint)": ckpt - deq,
                               "engine init (KV cache)": row["seconds"] - ckpt})
            for key, value in pieces.items():
                parts[key].append(value)
        if load["conversion"]:
            names.append("engine convert gguf\n(once, apart)")
            for key in parts:
                parts[key].append(load["conversion"]["seconds"] if key == "convert" else 0.0)
        bottom = [0.0] * len(names)
        styles = {"dequantize": ("#c44e52", "dequantize (at load)"), "weights (checkpoint)": ("#4c72b0", "weights"),
                  "engine init (KV cache)": ("#8172b2", "engine init (KV cache)"),
                  "total": ("#55a868", "transformers from_pretrained"), "convert": ("#999999", "conversion")}
        for key, values in parts.items():
            if any(values):
                color, label = styles[key]
                ax.bar(names, values, bottom=bottom, color=color, label=label,
                       hatch="//" if key == "convert" else None)
                bottom = [b + v for b, v in zip(bottom, values)]
        for i, total in enumerate(bottom):
            ax.text(i, total, f"{total:.2f} s", ha="center", va="bottom", fontsize=8)
        ax.margins(y=0.12)
        ax.set_ylabel(f"seconds (median of {results['config']['repeats']} fresh processes)")
        ax.set_title("load time by kind")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    if "steps" in panels:
        ax = axes.pop(0)
        steps = results["steps"]
        batches = list(steps)
        xs = range(len(batches))
        width = 0.38
        ax.bar([x - width / 2 for x in xs], [steps[b]["engine_step_ms"] for b in batches], width, label="engine",
               color="#4c72b0")
        ax.bar([x + width / 2 for x in xs], [steps[b]["hf_step_ms"] for b in batches], width,
               label="transformers generate", color="#dd8452")
        for x, b in zip(xs, batches):
            top = max(steps[b]["engine_step_ms"], steps[b]["hf_step_ms"])
            ax.text(x, top, f"{steps[b]['engine_over_hf_step']:.2f}x", ha="center", va="bottom", fontsize=9)
        ax.margins(y=0.12)
        ax.set_xticks(list(xs), [f"batch {b}" for b in batches])
        ax.set_ylabel("decode step ms (median)")
        ax.set_title(f"decode step, {results['config']['dtype']}: engine / HF")
        ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"engine bench models: {Path(results['model']['name']).name} on {m['cpu']}, "
                 f"{m['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":   # run_child's fresh process
        Path(sys.argv[3]).write_text(json.dumps(child_main(json.loads(sys.argv[2]))))
    else:
        sys.exit("engine.bench.models runs as `engine bench models` (this entry is its load processes')")
