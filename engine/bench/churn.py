"""``engine bench churn``: what a request joining or leaving costs the running batch.

Under real traffic requests join and leave the batch at almost every step. This fills
the engine with ``--rows`` long requests (``--prompt-tokens`` each, answering for the
whole run), then cycles: a few plain steps; a step in which one short request joins
(its prompt, ``--join-tokens``, is prefilled next to the running rows' decode step; it
asks for one token, so it finishes there); the next step, in which it leaves. It prints
the median time of each kind of step and the ratios join / plain and leave / plain
(target <= 1.3x), all measured in one run, interleaved, so that machine load hits every
kind alike; and, as the floor of a join, the same short request's step on an engine with
nothing else running (its prompt's own prefill forward and first token). Only the engine's public step API is used, so the same command measures any
version of the engine. The default model is a random 6-layer, 384-wide GPT-2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from engine.bench.common import add_model_arguments, log, model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("churn", help="step time when a request joins or leaves vs a plain step",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, hidden=384, layers=6, heads=6, vocab=8192, label="6-layer, 384-wide GPT-2")
    p.add_argument("--rows", type=int, default=31, help="long requests running (default 31)")
    p.add_argument("--prompt-tokens", type=int, default=400, help="their prompt length (default 400)")
    p.add_argument("--join-tokens", type=int, default=24, help="the joining request's prompt length (default 24)")
    p.add_argument("--cycles", type=int, default=12, help="join/leave cycles measured (default 12)")
    p.add_argument("--plain-per-cycle", type=int, default=2, help="plain steps per cycle (default 2)")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a bar chart of the step times")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine, LatentPolicy, SamplingParams
    from engine.bench.latency import make_questions

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.from_pretrained(model_dir(args, tmp), device=args.device, dtype=args.dtype,
                                        max_batch_size=args.rows + 1, max_seq_len=1024,
                                        max_prefill_tokens=(args.rows + 1) * 2 * args.prompt_tokens, seed=args.seed)
        tokenizer = engine.checkpoint.tokenizer
        long_questions = make_questions(tokenizer, args.rows, args.prompt_tokens, args.seed)
        short_questions = make_questions(tokenizer, args.cycles + 1, args.join_tokens, args.seed + 1)
        language = LatentPolicy(mode="none")
        total_steps = args.cycles * (args.plain_per_cycle + 2) + 4
        for q in long_questions:
            engine.add_request(q, SamplingParams(max_tokens=total_steps + 8, ignore_eos=True), language)
        log(f"prefilling {args.rows} requests of ~{args.prompt_tokens} tokens")
        engine.step()
        times: dict[str, list[float]] = {"plain": [], "join": [], "leave": []}

        def timed(kind: str | None) -> None:
            t0 = time.perf_counter()
            engine.step()
            if kind is not None:
                times[kind].append(time.perf_counter() - t0)

        timed(None)                               # warm-up: one plain step, one join + leave
        engine.add_request(short_questions[-1], SamplingParams(max_tokens=1), language)
        timed(None)
        timed(None)
        for i in range(args.cycles):
            for _ in range(args.plain_per_cycle):
                timed("plain")
            engine.add_request(short_questions[i], SamplingParams(max_tokens=1), language)
            timed("join")
            timed("leave")
            if (i + 1) % 4 == 0 or i + 1 == args.cycles:
                log(f"cycle {i + 1}/{args.cycles}")
        running = engine.core.scheduler.num_running
        if running != args.rows:
            raise RuntimeError(f"expected {args.rows} long rows running throughout, found {running}")
        # the floor of a join: the same short request's step on an engine with nothing else running
        solo = Engine.from_pretrained(model_dir(args, tmp), device=args.device, dtype=args.dtype,
                                      max_batch_size=1, max_seq_len=1024, seed=args.seed)
        alone = []
        for q in short_questions[:-1] * 2:
            solo.add_request(q, SamplingParams(max_tokens=1), language)
            t0 = time.perf_counter()
            solo.step()
            alone.append(time.perf_counter() - t0)
    med = statistics.median
    ms = {kind: 1000 * med(values) for kind, values in times.items()}
    ms["alone"] = 1000 * med(alone[2:])
    results = {"config": {k: v for k, v in vars(args).items() if k not in ("func", "plot")}, "step_ms": ms,
               "ratios": {"join_over_plain": ms["join"] / ms["plain"], "leave_over_plain": ms["leave"] / ms["plain"],
                          "join_extra_over_alone": (ms["join"] - ms["plain"]) / ms["alone"]}}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{args.rows} rows at ~{args.prompt_tokens} tokens; a {args.join_tokens}-token request joins and leaves")
        for kind in ("plain", "join", "leave"):
            print(f"  {kind:6} step {ms[kind]:8.1f} ms (median of {len(times[kind])})")
        print(f"  the joining request's step alone, nothing else running: {ms['alone']:.1f} ms")
        for name in ("join_over_plain", "leave_over_plain"):
            print(f"  {name:18} {results['ratios'][name]:5.2f}x   (target <= 1.3x)")
        print(f"  (join - plain) / alone {results['ratios']['join_extra_over_alone']:5.2f}x   "
              f"(1.0x: a join costs the running batch exactly its own prefill)")
    if args.plot:
        _plot(results, args.plot)
    return 0


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms, cfg = results["step_ms"], results["config"]
    kinds = ["plain", "join", "leave", "alone"]
    labels = ["plain step", "a request joins", "a request leaves", "the joining\nrequest alone"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    bars = ax.bar(labels, [ms[k] for k in kinds], color=["#4c72b0", "#dd8452", "#55a868", "#8c8c8c"])
    for bar, kind in zip(bars, kinds):
        note = f"{ms[kind]:.1f} ms" + (f"\n{ms[kind] / ms['plain']:.2f}x plain" if kind in ("join", "leave") else "")
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("step time, ms (median)")
    ax.set_ylim(0, max(ms.values()) * 1.3)
    ax.set_title(f"{cfg['rows']} rows at ~{cfg['prompt_tokens']} tokens decoding; a {cfg['join_tokens']}-token "
                 f"request joins, then leaves", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")
