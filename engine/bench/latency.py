"""``engine bench latency``: the engine against the naive reference and the bare forward.

Runs the same questions, in one process and one run (the machines are shared and noisy,
so only side-by-side ratios mean something), through:

1. ``reference``: the naive decoder (batch 1, the whole sequence recomputed each step);
2. ``engine b=1``: the engine, one request at a time;
3. ``engine b=N``: the engine with N requests submitted at once;
4. ``bare b=1`` / ``bare b=N``: a bare loop of model forwards of the same shapes (one
   left-padded prefill, then one position per row per step through the decoder and the
   LM head, greedy), the floor any engine on this model pays.

Reports medians of per-request latency, throughput and time per step, and the ratios the issue
sets targets for: reference / engine at batch 1 (>= 7x) and engine step / bare step at
batch N (<= 1.15x). The default model is a random GPT-2-small-sized model (768 wide, 12
layers, 50257-token head) with ProsQA-length prompts (~250 tokens), 6 thoughts and 12
answer tokens (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="engine vs naive reference vs bare forward",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: a random GPT-2-small)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257, help="LM head size of the random model")
    p.add_argument("--prompt-tokens", type=int, default=250)
    p.add_argument("--thoughts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--batch", type=int, default=32, help="requests submitted at once")
    p.add_argument("--reference-questions", type=int, default=3, help="questions run through the slow reference")
    p.add_argument("--rounds", type=int, default=3, help="alternating engine/bare rounds at the full batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a bar chart of the timings")
    p.set_defaults(func=run)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_questions(tokenizer, n: int, target_tokens: int, seed: int) -> list[str]:
    """ProsQA-like questions: facts about made-up concepts, ~target_tokens long."""
    from engine.tiny import _CONCEPTS, _NAMES

    rng = random.Random(seed)
    questions = []
    for _ in range(n):
        facts = []
        name = rng.choice(_NAMES)
        while len(tokenizer(" ".join(facts))["input_ids"]) < target_tokens - 12:
            a, b = rng.sample(_CONCEPTS, 2)
            facts.append(rng.choice([f"Every {a} is a {b}.", f"{rng.choice(_NAMES)} is a {a}."]))
        a, b = rng.sample(_CONCEPTS, 2)
        questions.append(" ".join(facts) + f" Is {name} a {a} or {b}?")
    return questions


def _timed_steps(engine) -> tuple[float, list[float], float]:
    """Drive ``engine`` to completion; return (total s, durations of steps without a
    prefill, prefill step s)."""
    steps, prefill = [], 0.0
    start = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if engine.core.last_stats.num_prefilled:
            prefill += dt
        else:
            steps.append(dt)
    return time.perf_counter() - start, steps, prefill


def bare_loop(model, prompts: list[list[int]], steps: int, pad_id: int) -> tuple[float, list[float], float]:
    """The floor: left-padded prefill, then ``steps`` forwards of one position per row
    through the decoder and the LM head (greedy). Returns (total, step times, prefill)."""
    import torch
    from transformers import DynamicCache

    decoder, head, embed = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    times = []
    with torch.inference_mode():
        start = time.perf_counter()
        h = decoder(inputs_embeds=embed(ids), attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True).last_hidden_state[:, -1]
        token = head(h).argmax(-1)
        prefill = time.perf_counter() - start
        next_pos = mask.sum(-1, keepdim=True)
        for _ in range(steps):
            t0 = time.perf_counter()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            h = decoder(inputs_embeds=embed(token)[:, None], attention_mask=mask, position_ids=next_pos,
                        cache=cache, use_cache=True).last_hidden_state[:, -1]
            token = head(h).argmax(-1)
            next_pos = next_pos + 1
            times.append(time.perf_counter() - t0)
    return time.perf_counter() - start, times, prefill


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine, LatentPolicy, SamplingParams
    from engine.reference import reference_generate

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from engine.tiny import make_checkpoint
            _log(f"building a random GPT-2 ({args.hidden} wide, {args.layers} layers, vocab {args.vocab})")
            model_dir = make_checkpoint(Path(tmp) / "model", "gpt2", hidden=args.hidden, layers=args.layers,
                                        heads=args.heads, max_positions=1024, init_std=0.02,
                                        model_vocab_size=args.vocab, seed=args.seed)
        engine = Engine.from_pretrained(model_dir, device=args.device, dtype=args.dtype,
                                        max_batch_size=args.batch, seed=args.seed)
        results = measure(engine, args, reference_generate, LatentPolicy, SamplingParams)
    report(results, args)
    return 0


def measure(engine, args, reference_generate, LatentPolicy, SamplingParams) -> dict:
    ck = engine.checkpoint
    questions = make_questions(ck.tokenizer, args.batch, args.prompt_tokens, args.seed)
    sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    latent = LatentPolicy(mode="fixed", thoughts=args.thoughts)
    prompts = [engine.make_request(q, sampling, latent).prompt_token_ids for q in questions]
    engine.generate(questions[:1], sampling, latent)  # warm-up
    n_ref = min(args.reference_questions, len(questions))
    out: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("func",)},
                 "prompt_tokens_mean": statistics.mean(len(p) for p in prompts)}

    # Each measurement runs right next to the one it is compared with, and ratios are
    # taken per pair, so that load from other processes hits both sides alike.
    _log(f"batch 1: {n_ref} questions, each through reference, engine and bare forward in turn")
    ref_times, ref_tokens, b1_times, b1_steps, bare1_times, bare1_steps = [], [], [], [], [], []
    for q, prompt in zip(questions[:n_ref], prompts):
        t0 = time.perf_counter()
        r = reference_generate(ck.model, ck.tokenizer, q, question_suffix=ck.config.question_suffix,
                               bot_id=ck.markers.bot, eot_id=ck.markers.eot, eos_ids=set(ck.markers.eos),
                               thoughts=args.thoughts, max_tokens=args.max_tokens, ignore_eos=True)
        ref_times.append(time.perf_counter() - t0)
        ref_tokens.append(r.token_ids)
        engine.add_request(q, sampling, latent)
        total, steps, _ = _timed_steps(engine)
        b1_times.append(total)
        b1_steps.append(statistics.mean(steps))
        total, steps, _ = bare_loop(ck.model, [prompt], len(steps), ck.markers.pad)
        bare1_times.append(total)
        bare1_steps.append(statistics.mean(steps))

    rounds = []
    for i in range(args.rounds):
        _log(f"batch {args.batch}, round {i + 1}/{args.rounds}: engine, then bare forward")
        for q in questions:
            engine.add_request(q, sampling, latent)
        total, steps, prefill = _timed_steps(engine)
        bare_total, bare_steps, bare_prefill = bare_loop(ck.model, prompts, len(steps), ck.markers.pad)
        rounds.append({"engine": (total, statistics.mean(steps), prefill),
                       "bare": (bare_total, statistics.mean(bare_steps), bare_prefill)})

    med = statistics.median
    check = engine.generate(questions[:n_ref], sampling, latent)
    out["engine_matches_reference"] = all(c.token_ids == t for c, t in zip(check, ref_tokens))
    out["rows"] = {
        "reference b=1": {"requests": 1, "latency_s": med(ref_times)},
        "engine b=1": {"requests": 1, "latency_s": med(b1_times), "step_ms": 1000 * med(b1_steps)},
        "bare b=1": {"requests": 1, "latency_s": med(bare1_times), "step_ms": 1000 * med(bare1_steps)},
    }
    for side in ("engine", "bare"):
        out["rows"][f"{side} b={args.batch}"] = {
            "requests": args.batch, "latency_s": med(r[side][0] for r in rounds),
            "step_ms": 1000 * med(r[side][1] for r in rounds), "prefill_s": med(r[side][2] for r in rounds)}
    for row in out["rows"].values():
        row["throughput_req_s"] = row["requests"] / row["latency_s"]
        row["tokens_per_s"] = row["throughput_req_s"] * args.max_tokens
    rows = out["rows"]
    out["ratios"] = {
        "reference_over_engine_b1": med(r / e for r, e in zip(ref_times, b1_times)),
        "engine_step_over_bare_b1": med(e / b for e, b in zip(b1_steps, bare1_steps)),
        f"engine_step_over_bare_b{args.batch}": med(r["engine"][1] / r["bare"][1] for r in rounds),
        f"throughput_b{args.batch}_over_b1": rows[f"engine b={args.batch}"]["throughput_req_s"]
        / rows["engine b=1"]["throughput_req_s"],
    }
    return out


def report(results: dict, args) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"prompt tokens (mean) {results['prompt_tokens_mean']:.0f}, thoughts {args.thoughts}, "
              f"answer tokens {args.max_tokens}; engine output == reference: {results['engine_matches_reference']}")
        print(f"{'':16} {'latency s':>10} {'req/s':>8} {'tok/s':>8} {'step ms':>8}")
        for name, row in results["rows"].items():
            step = f"{row['step_ms']:8.1f}" if "step_ms" in row else f"{'-':>8}"
            print(f"{name:16} {row['latency_s']:10.3f} {row['throughput_req_s']:8.2f} {row['tokens_per_s']:8.1f} {step}")
        for name, value in results["ratios"].items():
            print(f"{name:32} {value:6.2f}x")
    if args.plot:
        _plot(results, args.plot)


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(names, [results["rows"][n]["latency_s"] for n in names], color="#4c72b0")
    axes[0].set_ylabel("seconds per batch (latency)")
    axes[0].set_yscale("log")
    axes[1].bar(names, [results["rows"][n]["throughput_req_s"] for n in names], color="#55a868")
    axes[1].set_ylabel("requests / s")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("engine bench latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
