"""``engine bench dtype``: bfloat16 against float32, speed and answers, side by side.

One checkpoint loaded as every arm (``float32`` and ``bfloat16``, each eager and, with
``--compile``, with the compiled decode step), the same questions through each arm in
turn, round after round (the machines are shared and noisy, so only ratios measured
side by side mean something):

- speed: the prefill of a burst of ``--batch`` prompts, the decode step at that batch
  (median over the steps where every request runs) and the decode step of one request;
- answers: how many greedy outputs equal float32's token for token, and with ``--data``
  (a records file, e.g. a model's ``test.json``) each arm's accuracy as ``engine eval``
  scores it. With ``--data`` the timed questions are its first ``--batch`` ones, so a
  model that reads only its own kind of question (a compact ProsQA model) can be timed.

Ratios are reported against ``float32`` eager (below 1: faster). The default model is a
random GPT-2-small-sized one with ProsQA-length prompts; ``--model`` measures a real one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from engine.bench.common import add_model_arguments, log, model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dtype", help="bfloat16 vs float32: speed and answers, side by side",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, hidden=768, layers=12, heads=12, vocab=50257, label="GPT-2-small-sized model")
    p.add_argument("--prompt-tokens", type=int, default=250, help="prompt length in tokens (default 250)")
    p.add_argument("--thoughts", type=int, default=6, help="continuous thoughts per request (default 6)")
    p.add_argument("--max-tokens", type=int, default=12, help="answer tokens per request (default 12)")
    p.add_argument("--batch", type=int, default=32, help="requests submitted at once (default 32)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over every arm (default 2)")
    p.add_argument("--compile", action="store_true", help="also measure each dtype with the compiled decode step")
    p.add_argument("--data", default=None, help="records file to score each arm's accuracy on (engine eval)")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a bar chart of the ratios")
    p.set_defaults(func=run)


def timed_burst(engine, questions, sampling, latent) -> dict:
    """Submit ``questions`` at once and step until done: prefill seconds (the first step)
    and each step's seconds while every request runs; the outputs' token ids."""
    ids = [engine.add_request(q, sampling, latent) for q in questions]
    t0 = time.perf_counter()
    finished = {o.request_id: o for o in engine.step() if o.finished}
    prefill, steps = time.perf_counter() - t0, []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outs = engine.step()
        seconds = time.perf_counter() - t0
        if engine.core.last_stats.batch_size == len(questions):
            steps.append(seconds)
        finished.update({o.request_id: o for o in outs if o.finished})
    return {"prefill_s": prefill, "step_s": statistics.median(steps) if steps else float("nan"),
            "tokens": [finished[i].token_ids for i in ids]}


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine, LatentPolicy, SamplingParams
    from engine.bench.latency import make_questions

    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [("float32", False), ("bfloat16", False)] + ([("float32", True), ("bfloat16", True)] if args.compile else [])
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args, tmp)
        engines = {}
        for dtype, compiled in arms:
            name = dtype + (" compiled" if compiled else "")
            log(f"loading {name}")
            engines[name] = Engine.from_pretrained(path, device=args.device, dtype=dtype, max_batch_size=args.batch,
                                                   max_prefill_tokens=args.batch * 4 * args.prompt_tokens,
                                                   seed=args.seed, compile=compiled)
        records = None
        if args.data:   # a real model's own questions (a compact model reads nothing else)
            from engine.data.records import load_records

            records = load_records(args.data)
            questions = [records[i % len(records)].question for i in range(args.batch)]
        else:
            tokenizer = next(iter(engines.values())).tokenizer
            questions = make_questions(tokenizer, args.batch, args.prompt_tokens, args.seed)
        sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        latent = LatentPolicy(mode="fixed", thoughts=args.thoughts)
        for engine in engines.values():
            engine.generate(questions[:2], sampling, latent)   # warm-up
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        singles: dict[str, list[dict]] = {name: [] for name in engines}
        for i in range(args.rounds):
            log(f"round {i + 1}/{args.rounds}")
            for name, engine in engines.items():
                runs[name].append(timed_burst(engine, questions, sampling, latent))
                singles[name].append(timed_burst(engine, questions[:1], sampling, latent))
        results = summarize(runs, singles, args)
        if records is not None:
            results["accuracy"] = accuracy(engines, records, args.data, args.max_tokens)
    report(results, args)
    return 0


def summarize(runs: dict, singles: dict, args) -> dict:
    med = statistics.median
    base = "float32"
    out = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "arms": {}}
    reference = runs[base][0]["tokens"]
    for name in runs:
        out["arms"][name] = {
            "prefill_s": med(r["prefill_s"] for r in runs[name]),
            f"step_ms_b{args.batch}": 1000 * med(r["step_s"] for r in runs[name]),
            "step_ms_b1": 1000 * med(r["step_s"] for r in singles[name]),
            "same_tokens_as_float32": sum(a == b for a, b in zip(runs[name][0]["tokens"], reference)) / len(reference),
        }
    b = out["arms"][base]
    out["ratios"] = {name: {key: arm[key] / b[key] for key in ("prefill_s", f"step_ms_b{args.batch}", "step_ms_b1")}
                     for name, arm in out["arms"].items() if name != base}
    return out


def accuracy(engines: dict, records: list, data: str, max_tokens: int) -> dict:
    from engine.train.evaluate import evaluate

    scores = {}
    for name, engine in engines.items():
        log(f"scoring {name} on {data}")
        scores[name] = evaluate(engine, records, max_tokens=max(max_tokens, 16)).accuracy
    return scores


def report(results: dict, args) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        step_b = f"step_ms_b{args.batch}"
        print(f"{'arm':20} {'prefill s':>10} {step_b:>14} {'step_ms_b1':>11} {'same as fp32':>13}"
              + (f" {'accuracy':>9}" if "accuracy" in results else ""))
        for name, arm in results["arms"].items():
            acc = f" {results['accuracy'][name]:9.3f}" if "accuracy" in results else ""
            print(f"{name:20} {arm['prefill_s']:10.3f} {arm[step_b]:14.1f} {arm['step_ms_b1']:11.1f} "
                  f"{arm['same_tokens_as_float32']:13.2f}{acc}")
        for name, ratios in results["ratios"].items():
            print(f"{name} / float32: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.plot:
        _plot(results, args.plot)


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = list(next(iter(results["ratios"].values())))
    names = list(results["ratios"])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(measures))]
        ax.bar(xs, [results["ratios"][name][m] for m in measures], width=width, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(measures)), measures)
    ax.set_ylabel("time / float32 eager (lower is faster)")
    ax.legend(fontsize=8)
    ax.set_title("engine bench dtype")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
