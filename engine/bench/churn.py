"""``engine bench churn``: what a request joining or leaving costs the running batch.

Under real traffic requests join and leave the batch at almost every step. This fills
the engine with ``--rows`` long requests (``--prompt-tokens`` each, answering for the
whole run), then cycles: a few plain steps; a step in which one short request joins
(its prompt, ``--join-tokens``, is prefilled next to the running rows' decode step; it
asks for one token, so it finishes there); the next step, in which it leaves. It prints
the median time of each kind of step and the ratios join / plain and leave / plain
(target <= 1.3x), all measured in one run, interleaved, so that machine load hits every
kind alike. Only the engine's public step API is used, so the same command measures any
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
    med = statistics.median
    ms = {kind: 1000 * med(values) for kind, values in times.items()}
    results = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "step_ms": ms,
               "ratios": {"join_over_plain": ms["join"] / ms["plain"], "leave_over_plain": ms["leave"] / ms["plain"]}}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{args.rows} rows at ~{args.prompt_tokens} tokens; a {args.join_tokens}-token request joins and leaves")
        for kind, value in ms.items():
            print(f"  {kind:6} step {value:8.1f} ms (median of {len(times[kind])})")
        for name, value in results["ratios"].items():
            print(f"  {name:18} {value:5.2f}x   (target <= 1.3x)")
    return 0
