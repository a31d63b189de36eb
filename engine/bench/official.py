"""``engine bench official``: COCONUT requests through this engine against the method's own code.

    git clone https://github.com/facebookresearch/coconut /tmp/coconut
    engine bench official --official /tmp/coconut/coconut.py --model models/prosqa-coconut

The official implementation (facebookresearch/coconut, ``coconut.py``: ``Coconut.generate``)
answers one question at a time (it asserts batch size 1): one forward per continuous
thought over a growing KV cache, then every answer token by a forward over the *whole*
sequence so far (no cache). Its file is loaded from ``--official`` (it is not part of this
project) and wraps the same weights the engine serves.

The same ``--questions`` questions of the model's ``test.json`` (ProsQA) go through:

- the official ``Coconut.generate``, one after the other (its only mode);
- this engine (``Engine``, in-process, no HTTP), in a closed loop at each ``--concurrency``
  (default 1 and 64), fixed thoughts as the checkpoint sets them, greedy.

Printed: requests per second of each, the engine's ratio to the official code, and how
many answers are token for token the official's (its input is the engine's own prompt with
the thoughts' ``<|latent|>`` placeholders, ``<eot>`` and the latent suffix, as its trainer
lays questions out; answers are compared up to the first end token). Both run on this
process's torch threads (``--threads``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections import deque
from pathlib import Path

from engine.bench.common import log

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "prosqa-coconut"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("official", help="COCONUT requests: this engine against facebookresearch/coconut's "
                                        "Coconut.generate on the same weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, metavar="COCONUT_PY",
                   help="coconut.py of a checkout of https://github.com/facebookresearch/coconut")
    p.add_argument("--model", default=str(BUNDLED), help="a COCONUT checkpoint with test.json (default: the bundled one)")
    p.add_argument("--questions", type=int, default=64, help="questions from the model's test.json (default 64)")
    p.add_argument("--concurrency", default="1,64", help="the engine's closed-loop levels (default 1,64)")
    p.add_argument("--max-tokens", type=int, default=32, help="answer tokens at most (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    p.set_defaults(func=run)


def load_official(path: str):
    """The ``Coconut`` class of the official ``coconut.py`` at ``path``."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--official {path}: no such file; expected coconut.py of a checkout of "
                                f"https://github.com/facebookresearch/coconut")
    spec = importlib.util.spec_from_file_location("official_coconut", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Coconut


def official_inputs(engine, question: str, sampling, latent) -> list[int]:
    """The official layout of one question: the engine's prompt (question, <bot>), one
    <|latent|> per thought, <eot>, the latent suffix."""
    request = engine.make_request(question, sampling, latent)
    markers = engine.checkpoint.markers
    return (list(request.prompt_token_ids) + [markers.latent] * request.latent.thoughts + [markers.eot]
            + list(request.latent_suffix_ids))


def run_official(engine, questions: list[str], sampling, latent, coconut_class, max_tokens: int) -> dict:
    import torch

    markers = engine.checkpoint.markers
    model = engine.checkpoint.model
    wrapped = coconut_class(model, markers.latent, markers.bot, markers.eot, markers.eos[0])
    wrapped.eval()
    answers = []
    with torch.inference_mode():
        inputs = [official_inputs(engine, q, sampling, latent) for q in questions]
        ids = torch.tensor([inputs[0]])
        wrapped.generate(ids, torch.ones_like(ids), max_new_tokens=2)      # warm-up
        start = time.perf_counter()
        for prompt in inputs:
            ids = torch.tensor([prompt])
            out = wrapped.generate(ids, torch.ones_like(ids), max_new_tokens=max_tokens)
            answers.append(out[0, len(prompt):].tolist())
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests_per_s": len(questions) / seconds, "answers": answers}


def run_engine(engine, questions: list[str], sampling, latent, concurrency: int) -> dict:
    engine.generate(questions[:2], sampling, latent)   # warm-up
    pending, inflight, answers = deque(enumerate(questions)), {}, {}
    start = time.perf_counter()
    while pending or inflight:
        while pending and len(inflight) < concurrency:
            index, question = pending.popleft()
            inflight[engine.add_request(question, sampling, latent)] = index
        for out in engine.step():
            if out.finished and out.request_id in inflight:
                answers[inflight.pop(out.request_id)] = list(out.token_ids)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests_per_s": len(questions) / seconds,
            "answers": [answers[i] for i in range(len(questions))]}


def _until_end(tokens: list[int], ends: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in ends), tokens)


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine, LatentPolicy, SamplingParams
    from engine.bench.models import machine_facts

    if args.threads:
        torch.set_num_threads(args.threads)
    coconut_class = load_official(args.official)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    records = json.loads((Path(args.model) / "test.json").read_text())
    questions = [r["question"] for r in records[:args.questions]]
    engine = Engine.from_pretrained(args.model, max_batch_size=max(levels), seed=0)
    if engine.checkpoint.markers.latent is None:
        raise ValueError(f"{args.model} has no <|latent|> token: the official code needs one")
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    latent = LatentPolicy(mode="fixed", thoughts=engine.checkpoint.config.num_thoughts)
    log(f"official Coconut.generate: {len(questions)} questions, one at a time")
    official = run_official(engine, questions, sampling, latent, coconut_class, args.max_tokens)
    ends = set(engine.checkpoint.markers.eos)
    report = {"model": args.model, "questions": len(questions), "thoughts": latent.thoughts,
              "max_tokens": args.max_tokens, "machine": machine_facts("cpu"),
              "official": {k: v for k, v in official.items() if k != "answers"}, "engine": {}}
    for c in levels:
        log(f"engine: concurrency {c}")
        result = run_engine(engine, questions, sampling, latent, c)
        same = sum(_until_end(a, ends) == _until_end(b, ends) for a, b in zip(result["answers"], official["answers"]))
        report["engine"][str(c)] = {"seconds": result["seconds"], "requests_per_s": result["requests_per_s"],
                                    "over_official": result["requests_per_s"] / official["requests_per_s"],
                                    "same_answers": same / len(questions)}
    print(f"{args.model}: {len(questions)} ProsQA questions, {latent.thoughts} thoughts, greedy, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"  official Coconut.generate (batch 1, full recompute per answer token): "
          f"{official['requests_per_s']:.2f} requests/s")
    for c, row in report["engine"].items():
        print(f"  this engine, concurrency {c}: {row['requests_per_s']:.2f} requests/s = "
              f"{row['over_official']:.1f}x; answers equal to the official's: {100 * row['same_answers']:.0f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
