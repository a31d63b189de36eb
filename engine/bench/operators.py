"""``engine bench latency --operators``: the latent step's cost per feedback operator.

One engine on one model with a CODI projection (p = d), the same prompts; in every round
each operator runs a batch of 1 and of N requests in latent mode (``thoughts`` thoughts, one
answer token), one after the other, so every ratio is measured side by side. A step's time
is the median over the steps in which every row feeds a thought whose state becomes the
next one (prefill, the last thought and the answer excluded), and its minimum (the fastest step: on a shared machine the least disturbed
estimate of what the operator itself costs). Operators:

- ``hidden``: COCONUT, the state itself (no LM head product for a latent row);
- ``projection``: CODI's prj(h), two small matrix products;
- ``soft_embedding``: softmax(W h / T), top-k 10, the mixture of 10 embedding rows: one LM
  head product per thought, which ``hidden`` does not pay;
- ``soft_embedding k=0``: the mixture over the whole vocabulary (a second V x d product);
- ``hidden + entropy`` and ``soft_embedding + entropy``: with the entropy stop (its
  threshold never reached), which reads W h anyway: the soft embedding then shares that
  product and should cost nothing more (the ratio of these two rows);
- ``soft_embedding + gumbel`` / ``+ dirichlet`` (``engine.noise``, unseeded: one batched
  draw from the engine's generator) and ``soft_embedding + gumbel seeded`` (each row draws
  from its own generator): the noise on the mixture's k weights, against ``soft_embedding``;
- ``language`` and ``language + moi``: a step of answer decoding (no thoughts; every row
  samples a token; the first and the last excluded), plain and with a Mixture of Inputs
  (``engine.moi``: top-20 of the logits the sampling already has, 20 embedding rows),
  against each other (``extends``: each extension over what it extends, fastest steps).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from engine.bench.common import log

OPERATORS = [
    ("hidden", {"type": "hidden"}, "fixed"),
    ("projection", None, "fixed"),
    ("soft_embedding", {"type": "soft_embedding"}, "fixed"),
    ("soft_embedding k=0", {"type": "soft_embedding", "top_k": 0}, "fixed"),
    ("hidden + entropy", {"type": "hidden"}, "entropy"),
    ("soft_embedding + entropy", {"type": "soft_embedding"}, "entropy"),
    ("soft_embedding + gumbel", {"type": "soft_embedding", "noise": {"type": "gumbel", "tau": 0.5}}, "fixed"),
    ("soft_embedding + gumbel seeded", {"type": "soft_embedding", "noise": {"type": "gumbel", "tau": 0.5}}, "seeded"),
    ("soft_embedding + dirichlet", {"type": "soft_embedding", "noise": {"type": "dirichlet", "alpha": 1.0}}, "fixed"),
    ("language", None, "language"),
    ("language + moi", {"type": "moi", "beta": 1.0, "top_k": 20}, "language"),
]
#: each extension and the operator it extends (its cost is reported as the ratio of the two)
EXTENDS = {"soft_embedding + gumbel": "soft_embedding", "soft_embedding + gumbel seeded": "soft_embedding",
           "soft_embedding + dirichlet": "soft_embedding", "language + moi": "language"}


def projection_checkpoint(args, tmp: str) -> Path:
    from engine.tiny import make_checkpoint

    log(f"building a random GPT-2 with a CODI projection ({args.hidden} wide, {args.layers} layers, "
        f"vocab {args.vocab})")
    return make_checkpoint(Path(tmp) / "model-projection", "gpt2", hidden=args.hidden, layers=args.layers,
                           heads=args.heads, max_positions=1024, init_std=0.02, model_vocab_size=args.vocab,
                           seed=args.seed, projection_size=args.hidden)


def _latent_steps(engine, questions, policy, sampling) -> list[float]:
    """Seconds of each step in which every request feeds a thought whose state becomes the
    next thought (so the operator runs on every row; the last thought's state is not fed)."""
    from engine.request import RequestStatus

    samplings = sampling if isinstance(sampling, list) else [sampling] * len(questions)
    requests = [engine.make_request(q, s, policy) for q, s in zip(questions, samplings)]
    for request in requests:
        engine.add_request(request)
    times = []
    while engine.has_unfinished():
        all_latent = all(r.status == RequestStatus.LATENT and r.prefilled_tokens == r.num_prompt_tokens
                         and 1 <= r.thoughts_done and r.thoughts_done + 1 < r.latent.thoughts for r in requests)
        t0 = time.perf_counter()
        engine.step()
        if all_latent:
            times.append(time.perf_counter() - t0)
    return times


def _language_steps(engine, questions, sampling) -> list[float]:
    """Seconds of each step in which every request feeds a sampled token and samples the next
    (no thoughts: latent mode none; the first token, drawn at the prefill, excluded)."""
    from engine import LatentPolicy
    from engine.request import RequestStatus

    requests = [engine.make_request(q, sampling, LatentPolicy(mode="none")) for q in questions]
    for request in requests:
        engine.add_request(request)
    times = []
    while engine.has_unfinished():
        all_decoding = all(r.status == RequestStatus.DECODING and 1 <= len(r.output_token_ids)
                           and len(r.output_token_ids) + 1 < sampling.max_tokens for r in requests)
        t0 = time.perf_counter()
        engine.step()
        if all_decoding:
            times.append(time.perf_counter() - t0)
    return times


def _steps(engine, questions, args, feedback, mode, sampling) -> list[float]:
    from engine import LatentPolicy, SamplingParams

    if mode == "language":   # feedback: the mixture (None: plain tokens)
        return _language_steps(engine, questions, SamplingParams(max_tokens=args.thoughts + 2, ignore_eos=True,
                                                                 mixture=feedback))
    if mode == "entropy":   # a threshold never reached: all thoughts run, W h read each
        policy = LatentPolicy(mode="entropy", entropy_threshold=0.0, max_thoughts=args.thoughts, feedback=feedback)
    else:
        policy = LatentPolicy(mode="fixed", thoughts=args.thoughts, feedback=feedback)
    if mode == "seeded":    # one request at a time draws from its own generator; seeds differ per row
        return _latent_steps(engine, questions, policy, [SamplingParams(max_tokens=1, ignore_eos=True, seed=args.seed + i)
                                                          for i in range(len(questions))])
    return _latent_steps(engine, questions, policy, sampling)


def measure_operators(args, make_questions) -> dict:
    import tempfile

    import torch

    from engine import Engine, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or projection_checkpoint(args, tmp)
        engine = Engine.from_pretrained(path, device=args.device, dtype=args.dtype, max_batch_size=args.batch,
                                        seed=args.seed, max_prefill_tokens=args.batch * 4 * args.prompt_tokens)
        questions = make_questions(engine.tokenizer, args.batch, args.prompt_tokens, args.seed)
        sampling = SamplingParams(max_tokens=1, ignore_eos=True)
        steps: dict[str, dict[int, list[float]]] = {name: {1: [], args.batch: []} for name, _, _ in OPERATORS}
        for round_ in range(args.rounds):
            for batch in (1, args.batch):
                for name, feedback, mode in OPERATORS:
                    steps[name][batch] += _steps(engine, questions[:batch], args, feedback, mode, sampling)
            log(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
                f"{name} {1e3 * statistics.median(steps[name][args.batch]):.2f} ms" for name, _, _ in OPERATORS))
    rows = {}
    for name, _, _ in OPERATORS:
        rows[name] = {}
        for batch in (1, args.batch):
            median = statistics.median(steps[name][batch])
            base = statistics.median(steps["hidden"][batch])
            best, best_base = min(steps[name][batch]), min(steps["hidden"][batch])
            rows[name][str(batch)] = {"step_ms": round(1e3 * median, 3), "vs_hidden": round(median / base, 3),
                                      "best_step_ms": round(1e3 * best, 3), "best_vs_hidden": round(best / best_base, 3),
                                      "steps": len(steps[name][batch])}
    shared = {str(b): round(min(steps["soft_embedding + entropy"][b]) / min(steps["hidden + entropy"][b]), 3)
              for b in (1, args.batch)}
    extends = {name: {"extends": base, **{str(b): {"best": round(min(steps[name][b]) / min(steps[base][b]), 3),
                                                   "median": round(statistics.median(steps[name][b])
                                                                   / statistics.median(steps[base][b]), 3)}
                                          for b in (1, args.batch)}}
               for name, base in EXTENDS.items()}
    return {"model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "dtype": args.dtype,
                      "device": args.device},
            "thoughts": args.thoughts, "prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
            "batches": [1, args.batch], "operators": rows, "soft_over_hidden_with_entropy_stop": shared,
            "extends": extends}


def report_operators(results: dict, args) -> None:
    import json

    if args.plot:
        plot_operators(results, args.plot)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    batches = results["batches"]
    print(f"latent step per feedback operator ({results['model']['hidden']} wide, {results['model']['layers']} "
          f"layers, vocab {results['model']['vocab']}, {results['thoughts']} thoughts)")
    print(f"{'operator':<28}" + "".join(f"{f'b={b} median ms':>18}{'x hidden':>10}{'best ms':>10}{'x hidden':>10}"
                                        for b in batches))
    for name, row in results["operators"].items():
        print(f"{name:<28}" + "".join(f"{row[str(b)]['step_ms']:>18.2f}{row[str(b)]['vs_hidden']:>10.2f}"
                                      f"{row[str(b)]['best_step_ms']:>10.2f}{row[str(b)]['best_vs_hidden']:>10.2f}"
                                      for b in batches))
    print("soft_embedding / hidden with the entropy stop (the LM head product shared), fastest steps: " + ", ".join(
        f"b={b}: {v:.2f}x" for b, v in results["soft_over_hidden_with_entropy_stop"].items()))
    for name, row in results["extends"].items():
        print(f"{name} / {row['extends']}: " + ", ".join(
            f"b={b}: {row[str(b)]['best']:.2f}x fastest, {row[str(b)]['median']:.2f}x median" for b in batches))


def plot_operators(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["operators"])
    batches = results["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4))
    for ax, b in zip(axes, batches):
        values = [results["operators"][n][str(b)]["best_step_ms"] for n in names]
        bars = ax.barh(names, values, color=["#55a868" if "language" in n else "#4c72b0" if "soft" not in n
                                             else "#dd8452" for n in names])
        for bar, n in zip(bars, names):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {results['operators'][n][str(b)]['best_vs_hidden']:.2f}x", va="center")
        ax.set_xlabel("latent step, ms (fastest of the run's steps)")
        ax.set_title(f"batch {b}")
        ax.invert_yaxis()
    m = results["model"]
    fig.suptitle(f"latent step per feedback operator: {m['hidden']} wide, {m['layers']} layers, vocab {m['vocab']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
