"""``engine bench samples``: n answers per question forked from one latent pass
(``SamplingParams.n``) against n independent requests, side by side.

The same ``--questions`` questions (a model's ``test.json``: its first ones), each asked for
``--n`` sampled answers (temperature ``--temperature``, seed s: answer i uses seed s + i) in
two arms, round after round (the machines are shared and noisy, so only ratios measured in
one run mean something):

- ``forked``: one request per question with ``n``: one prefill, one latent pass, the answers
  fork from the leader's cache columns;
- ``independent``: n requests per question, each with its own seed s + i, prefill and
  thoughts.

The engine runs without prefix caching (``EngineConfig.prefix_caching``), which would
otherwise let the independent requests copy each other's prompts: the arms measure what
forking saves, prompts and thoughts alike.

Reported per arm: wall seconds for the whole set (median over ``--rounds``), the prompt
tokens prefilled and the latent positions fed (counted on the runner's step plans), and
whether the two arms' answers are identical (they must be: same seeds, same thoughts).
With gold answers in the records it also scores answer 0 alone against the majority
vote of the n answers (self-consistency). Not known here: HTTP costs (``bench serve``).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

from engine.bench.common import log
from engine.sources import add_model_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("samples", help="n answers forked from one latent pass vs n independent requests",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--data", default=None, help="records file (default: the model's test.json)")
    p.add_argument("--questions", type=int, default=32, help="questions asked (default 32)")
    p.add_argument("--n", type=int, default=8, help="answers per question (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=16, help="answer tokens (default 16)")
    p.add_argument("--max-batch-size", type=int, default=64, help="engine batch size (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over both arms (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


class PlanCounter:
    """Counts the prompt tokens prefilled and the latent positions fed in the runner's plans."""

    def __init__(self, runner):
        self.prefill_tokens = self.latent_positions = 0
        execute = runner.execute

        def counting(plan):
            self.prefill_tokens += sum(len(chunk.token_ids) for chunk in plan.prefill)
            self.latent_positions += sum(1 for row in plan.decode if row.feed_token is None)
            return execute(plan)

        runner.execute = counting
        self.restore = lambda: setattr(runner, "execute", execute)


def one_arm(engine, questions: list[str], params, forked: bool) -> dict:
    """Answer every question n times; the answers' texts per question (index order)."""
    n = params.n
    counter = PlanCounter(engine.runner)
    start = time.perf_counter()
    try:
        if forked:
            outs = engine.generate(questions, params)
            texts = [[s.text for s in (o.samples or [o])] for o in outs]
        else:
            flat = engine.generate([q for q in questions for _ in range(n)],
                                   [params.for_sample(i) for _ in questions for i in range(n)])
            texts = [[o.text for o in flat[k * n:(k + 1) * n]] for k in range(len(questions))]
    finally:
        counter.restore()
    return {"seconds": time.perf_counter() - start, "prefill_tokens": counter.prefill_tokens,
            "latent_positions": counter.latent_positions, "texts": texts}


def vote_accuracy(records, texts: list[list[str]], engine) -> dict:
    from engine.train.evaluate import extract_answer, gold_answer

    suffix, fmt = engine.coconut.question_suffix, engine.coconut.text_format
    first = majority = 0
    for record, answers in zip(records, texts):
        gold = gold_answer(record.answer, fmt).replace(",", "").strip()
        said = [extract_answer(record.question, t, suffix) for t in answers]
        first += said[0] == gold
        counts = collections.Counter(a for a in said if a)
        top = max(counts.values()) if counts else 0
        voted = next((a for a in said if a and counts[a] == top), "")
        majority += voted == gold
    return {"answer_0": first / len(records), "majority": majority / len(records)}


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine, SamplingParams
    from engine.data.records import load_records
    from engine.models import default_model_dir

    if args.n < 2 or args.questions < 1 or args.rounds < 1:
        raise ValueError("--n must be >= 2, --questions and --rounds >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.bench.common import local_model

    model = local_model(args.model, args.revision) if args.model else default_model_dir()
    data = args.data or f"{model}/test.json"
    records = load_records(data)[:args.questions]
    engine = Engine.from_pretrained(model, max_batch_size=args.max_batch_size, prefix_caching=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=0, seed=args.seed,
                            n=args.n)
    questions = [r.question for r in records]
    one_arm(engine, questions[:2], params, True)        # warm-up
    runs: dict[str, list[dict]] = {"forked": [], "independent": []}
    for r in range(args.rounds):
        for arm in runs:
            runs[arm].append(one_arm(engine, questions, params, arm == "forked"))
            log(f"round {r + 1}/{args.rounds} {arm}: {runs[arm][-1]['seconds']:.2f} s")
    arms = {arm: {"seconds": statistics.median(x["seconds"] for x in rs), "prefill_tokens": rs[0]["prefill_tokens"],
                  "latent_positions": rs[0]["latent_positions"]} for arm, rs in runs.items()}
    same = runs["forked"][0]["texts"] == runs["independent"][0]["texts"]
    result = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "model": str(model), "arms": arms,
              "ratios": {k: arms["forked"][k] / max(arms["independent"][k], 1e-9) for k in arms["forked"]},
              "identical_answers": same,
              "accuracy": vote_accuracy(records, runs["forked"][0]["texts"], engine)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{len(questions)} questions x n={args.n}, temperature {args.temperature}, {args.max_tokens} tokens")
        print(f"{'arm':>12} {'seconds':>8} {'prefill tok':>11} {'latent pos':>10}")
        for arm, a in arms.items():
            print(f"{arm:>12} {a['seconds']:>8.2f} {a['prefill_tokens']:>11} {a['latent_positions']:>10}")
        print(f"{'ratio':>12} " + " ".join(f"{result['ratios'][k]:>{w}.3f}" for k, w in
                                           (("seconds", 8), ("prefill_tokens", 11), ("latent_positions", 10)))
              + "   (forked / independent)")
        print(f"identical answers: {same}; accuracy: answer 0 {result['accuracy']['answer_0']:.3f}, "
              f"majority of {args.n} {result['accuracy']['majority']:.3f}")
    return 0 if same else 1
