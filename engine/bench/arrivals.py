"""``engine bench arrivals``: what arriving prompts cost the running requests' token gaps.

A closed loop of ``--concurrency`` requests (vLLM's ``--max-concurrency``): whenever one
finishes, the next arrives, so new prompts are prefilled while the others decode. Answer
lengths vary (uniform in [max_tokens/2, 3 max_tokens/2], ``ignore_eos``) so arrivals
spread over the steps instead of coming in cohorts. The same requests run once per
prefill budget (``--budgets``, the engine's ``max_prefill_tokens``; 0 = unbounded: every
waiting prompt is prefilled whole in the step it is admitted, which is what an engine
without chunked prefill does), the arms alternating over ``--rounds`` so that machine load
hits each alike; the round with the median ITL p99 is kept per arm.

Reports per arm: requests/s, output tokens/s, TTFT and ITL (gaps between a request's
tokens) median and p99, and the ratio ITL p99 / median (target <= 2x at concurrency 32):
a budget bounds the prefill a step may carry, so it bounds the longest gap, at the price
of a longer TTFT for a long prompt (prefilled over several steps). The engine is driven
in-process (no HTTP), one step at a time. The default model is a random 6-layer,
384-wide GPT-2 with ProsQA-length prompts (~250 tokens) and 4 thoughts; ``--model`` with
``--data`` measures a trained model on its own questions (e.g. the bundled model on its
``test.json``). Gaps are taken
between tokens (not text pieces, which a random model's byte tokens can hold back).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile

from engine.bench.common import add_model_arguments, log, model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("arrivals", help="token gaps (ITL p99 / median) under arrivals, per prefill budget",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, hidden=384, layers=6, heads=6, vocab=8192, label="6-layer, 384-wide GPT-2")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    p.add_argument("--num-requests", type=int, default=128, help="requests per arm (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=250, help="prompt length in tokens (default 250)")
    p.add_argument("--max-tokens", type=int, default=32, help="mean answer length (default 32)")
    p.add_argument("--thoughts", type=int, default=4, help="continuous thoughts per request (default 4)")
    p.add_argument("--budgets", default="0,512,256,128",
                   help="comma-separated max_prefill_tokens per arm; 0 = unbounded (default 0,512,256,128)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds over the arms (default 2)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="take the questions from a records file (e.g. a model's test.json; --prompt-tokens "
                        "is then ignored) instead of generated ~--prompt-tokens ones")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a chart of ITL and TTFT per budget")
    p.set_defaults(func=run)


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 0:
        raise ValueError(f"--budgets={text!r} is invalid: expected integers >= 0 (0 = unbounded), e.g. 0,256")
    return budgets


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine, LatentPolicy, SamplingParams
    from engine.bench.latency import make_questions
    from engine.bench.serve import run_offline

    budgets = parse_budgets(args.budgets)
    if min(args.concurrency, args.num_requests, args.max_tokens, args.rounds) < 1 or args.thoughts < 0:
        raise ValueError("--concurrency, --num-requests, --max-tokens and --rounds must be >= 1, --thoughts >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    lengths = [rng.randint(max(1, args.max_tokens // 2), args.max_tokens * 3 // 2) for _ in range(args.num_requests)]
    samplings = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    latent = LatentPolicy(mode="fixed", thoughts=args.thoughts)
    runs: dict[int, list[dict]] = {b: [] for b in budgets}
    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir(args, tmp)
        engines = {}
        for budget in budgets:
            # unbounded: a budget no step can exhaust (every waiting prompt, whole)
            tokens = budget or args.concurrency * (args.prompt_tokens + 64)
            engines[budget] = Engine.from_pretrained(directory, device=args.device, dtype=args.dtype,
                                                     max_batch_size=args.concurrency, max_seq_len=1024,
                                                     max_prefill_tokens=tokens, seed=args.seed)
        tokenizer = engines[budgets[0]].checkpoint.tokenizer
        if args.data:
            from engine.data.records import load_records

            records = load_records(args.data)
            prompts = [records[i % len(records)].question for i in range(args.num_requests)]
        else:
            prompts = make_questions(tokenizer, args.num_requests, args.prompt_tokens, args.seed)
        first = engines[budgets[0]]
        prompt_tokens = statistics.mean(len(first.make_request(q, samplings[0], latent).prompt_token_ids)
                                        for q in prompts)
        for r in range(args.rounds):
            for budget in budgets:
                log(f"round {r + 1}/{args.rounds}: budget {budget or 'unbounded'}")
                result = run_offline(engines[budget], prompts, samplings, latent, args.concurrency,
                                     per_token=True)
                if result["failed"]:
                    raise RuntimeError(f"{result['failed']} requests failed: {result['errors']}")
                runs[budget].append(result)
    arms = []
    for budget in budgets:
        kept = sorted(runs[budget], key=lambda x: x["itl_ms"]["p99"])[len(runs[budget]) // 2]
        itl = kept["itl_ms"]
        arms.append({"budget": budget, "itl_p99_over_median": itl["p99"] / itl["median"], **kept})
    report = {"concurrency": args.concurrency, "num_requests": args.num_requests,
              "prompt_tokens": round(prompt_tokens, 1), "data": args.data, "max_tokens_mean": statistics.mean(lengths),
              "thoughts": args.thoughts, "threads": args.threads, "model": args.model or
              f"random GPT-2 {args.layers}x{args.hidden}, vocab {args.vocab}", "arms": arms}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
    if args.plot:
        _plot(report, args.plot)
    return 0


def table(report: dict) -> str:
    lines = [f"concurrency {report['concurrency']}, {report['num_requests']} requests of ~{report['prompt_tokens']}"
             f" prompt tokens, {report['thoughts']} thoughts, {report['max_tokens_mean']:.0f} answer tokens on"
             f" average; {report['model']}",
             f"{'budget':>9} {'req/s':>7} {'tok/s':>7} {'TTFT med/p99 ms':>17} {'ITL med/p99 ms':>16} "
             f"{'ITL p99/med':>11}"]
    for arm in report["arms"]:
        ttft, itl = arm["ttft_ms"], arm["itl_ms"]
        lines.append(f"{arm['budget'] or 'unbounded':>9} {arm['request_throughput']:>7.2f} "
                     f"{arm['output_throughput']:>7.1f} {ttft['median']:>8.0f}/{ttft['p99']:<8.0f} "
                     f"{itl['median']:>7.1f}/{itl['p99']:<8.1f} {arm['itl_p99_over_median']:>10.2f}x")
    lines.append("target: ITL p99 / median <= 2x at concurrency 32")
    return "\n".join(lines)


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    labels = [str(a["budget"] or "unbounded") for a in arms]
    x = range(len(arms))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.38
    left.bar([i - width / 2 for i in x], [a["itl_ms"]["median"] for a in arms], width, label="median")
    left.bar([i + width / 2 for i in x], [a["itl_ms"]["p99"] for a in arms], width, label="p99")
    for i, a in enumerate(arms):
        left.annotate(f"{a['itl_p99_over_median']:.1f}x", (i + width / 2, a["itl_ms"]["p99"]),
                      ha="center", va="bottom", fontsize=8)
    left.set(title="gap between tokens (ITL)", ylabel="ms", xlabel="prefill budget (tokens per step)")
    left.set_xticks(list(x), labels)
    left.legend(fontsize=8)
    right.bar([i - width / 2 for i in x], [a["ttft_ms"]["median"] for a in arms], width, label="median")
    right.bar([i + width / 2 for i in x], [a["ttft_ms"]["p99"] for a in arms], width, label="p99")
    right.set(title="time to first token", ylabel="ms", xlabel="prefill budget (tokens per step)")
    right.set_xticks(list(x), labels)
    right.legend(fontsize=8)
    fig.suptitle(f"concurrency {report['concurrency']}, ~{report['prompt_tokens']}-token prompts, "
                 f"{report['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")
