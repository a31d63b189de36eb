"""``engine bench randomness``: what noise in soft thoughts and Mixture of Inputs do to a real
model's answers (default SmolLM2-135M-Instruct, ``engine models fetch smollm2``).

The model is served as a Soft Thinking reasoner (``latent_feedback: soft_embedding``, top-k
10, its chat template, ``<bot>``/``<eot>`` added to its vocabulary), and 20 short questions
are asked in arms that differ in one thing each:

- ``soft``, ``soft + gumbel``, ``soft + dirichlet``: ``--n`` answers per question (one
  request with ``n``, seed s: answer i draws with s + i), ``--thoughts`` soft thoughts,
  greedy answers: without noise the n answers share their thoughts and are one answer;
  with noise each answer thinks its own. Then the same with sampled answers
  (``--temperature``);
- ``language``, ``language + moi``: no thoughts; the n answers sampled (``--temperature``),
  plain and with a Mixture of Inputs; and one greedy answer each, plain against MoI.

Reported per arm: the mean number of distinct answers per question (of n), the mean size of
the majority, and how many answers contain the question's expected word (an observation
on a 135M model, not an accuracy claim). Answers are compared as their first line,
stripped and lower-cased.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from engine.bench.common import log

QUESTIONS = [   # (question, a word a right answer contains)
    ("What is the capital of France?", "paris"), ("What is 3 + 5?", "8"), ("Name a primary color.", "red"),
    ("Say hello in Spanish.", "hola"), ("What is the opposite of hot?", "cold"),
    ("How many legs does a spider have?", "8"), ("What do bees make?", "honey"),
    ("Give one word that rhymes with blue.", "true"), ("What is the largest planet?", "jupiter"),
    ("Translate 'thank you' to French.", "merci"), ("What colour is the sky on a clear day?", "blue"),
    ("What is 10 minus 4?", "6"), ("Name a fruit that is yellow.", "banana"),
    ("Who wrote Romeo and Juliet?", "shakespeare"), ("What is the capital of Japan?", "tokyo"),
    ("How many days are in a week?", "7"), ("What animal says moo?", "cow"),
    ("What is the freezing point of water in Celsius?", "0"), ("What is 2 times 6?", "12"),
    ("Which ocean is the largest?", "pacific"),
]
NOISES = {"gumbel": {"type": "gumbel", "tau": 0.5}, "dirichlet": {"type": "dirichlet", "alpha": 1.0}}
MOI = {"type": "moi", "beta": 1.0, "top_k": 20}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("randomness", help="distinct answers of n samples with and without noise and MoI "
                       "on a real model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model directory (default: SmolLM2-135M-Instruct, fetched)")
    p.add_argument("--n", type=int, default=8, help="answers per question (default 8)")
    p.add_argument("--thoughts", type=int, default=4, help="soft thoughts per answer (default 4)")
    p.add_argument("--max-tokens", type=int, default=16, help="answer tokens (default 16)")
    p.add_argument("--temperature", type=float, default=0.7, help="the sampled arms' temperature (default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--max-batch-size", type=int, default=64, help="engine batch size (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _answer(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].lower() if lines else ""


def _arm(engine, n: int, temperature: float, seed: int, max_tokens: int, latent, mixture=None) -> dict:
    from engine import SamplingParams

    t0 = time.perf_counter()
    samplings = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + 1000 * q, n=n,
                                mixture=mixture) for q in range(len(QUESTIONS))]
    results = engine.generate([q for q, _ in QUESTIONS], samplings, latent)
    distinct, majority, right, answers = [], [], 0, []
    for (_, gold), result in zip(QUESTIONS, results):
        texts = [_answer(s.text) for s in (result.samples or [result])]
        counts = {t: texts.count(t) for t in texts}
        distinct.append(len(counts))
        majority.append(max(counts.values()))
        right += sum(gold in t for t in texts)
        answers.append(texts)
    return {"distinct": round(statistics.mean(distinct), 2), "majority": round(statistics.mean(majority), 2),
            "right": right, "of": n * len(QUESTIONS), "seconds": round(time.perf_counter() - t0, 1),
            "answers": answers}


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine, LatentPolicy

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model
    if path is None:
        from engine.fetch_models import fetch
        path = fetch("smollm2")
    engine = Engine.from_pretrained(path, coconut={"latent_feedback": {"type": "soft_embedding"}},
                                    max_batch_size=args.max_batch_size, seed=args.seed)

    def soft(noise=None):
        feedback = {"type": "soft_embedding"} if noise is None else {"type": "soft_embedding", "noise": noise}
        return LatentPolicy(mode="fixed", thoughts=args.thoughts, feedback=feedback)

    none = LatentPolicy(mode="none")
    arms = {}
    for temperature, label in ((0.0, "greedy"), (args.temperature, f"T={args.temperature:g}")):
        arms[f"soft, {label}"] = (soft(), temperature, None)
        for name, noise in NOISES.items():
            arms[f"soft + {name}, {label}"] = (soft(noise), temperature, None)
    arms[f"language, T={args.temperature:g}"] = (none, args.temperature, None)
    arms[f"language + moi, T={args.temperature:g}"] = (none, args.temperature, MOI)
    results = {}
    for name, (latent, temperature, mixture) in arms.items():
        results[name] = _arm(engine, args.n, temperature, args.seed, args.max_tokens, latent, mixture)
        log(f"{name}: {results[name]['distinct']} distinct of {args.n} ({results[name]['seconds']} s)")
    greedy = {label: _arm(engine, 1, 0.0, args.seed, args.max_tokens, none, mixture)
              for label, mixture in (("plain", None), ("moi", MOI))}
    same = sum(a == b for a, b in zip(greedy["plain"]["answers"], greedy["moi"]["answers"]))
    report = {"model": str(path), "n": args.n, "thoughts": args.thoughts, "temperature": args.temperature,
              "noises": NOISES, "moi": MOI, "arms": results,
              "greedy_moi_vs_plain": {"same": same, "of": len(QUESTIONS), "plain_right": greedy["plain"]["right"],
                                      "moi_right": greedy["moi"]["right"],
                                      "pairs": [(q, a[0], b[0]) for (q, _), a, b in zip(
                                          QUESTIONS, greedy["plain"]["answers"], greedy["moi"]["answers"])]}}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"| arm | distinct answers of {args.n} (mean) | majority size (mean) | answers with the expected word |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['distinct']} | {row['majority']} | {row['right']} / {row['of']} |")
    g = report["greedy_moi_vs_plain"]
    print(f"\ngreedy, one answer each: MoI's answer equals plain decoding's on {g['same']} of {g['of']} questions; "
          f"expected word: plain {g['plain_right']}, MoI {g['moi_right']}")
    return 0
