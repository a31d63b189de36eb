"""``engine generate``: answer one or more questions from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from engine.sources import add_model_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer questions with a checkpoint",
                       description="Answer questions with a COCONUT checkpoint (the bundled model by default).")
    p.add_argument("questions", nargs="+", help="question text(s)")
    add_model_arguments(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--thoughts", type=int, default=None,
                       help="fixed number of latent thoughts (default: the checkpoint's)")
    group.add_argument("--latent", choices=["fixed", "auto", "entropy", "token", "none"], default=None,
                       help="latent policy (default: the checkpoint's)")
    p.add_argument("--max-thoughts", type=int, default=None,
                   help="cap for --latent auto, entropy or token (default: the checkpoint's)")
    p.add_argument("--threshold", type=float, default=None,
                   help="stop threshold for --latent auto (default: the stop classifier's)")
    p.add_argument("--entropy-threshold", type=float, default=None,
                   help="nats, for --latent entropy (default: the checkpoint's)")
    p.add_argument("--patience", type=int, default=None, help="thoughts in a row below it (default: 1)")
    p.add_argument("--feedback", default=None, metavar="JSON",
                   help='what a thought feeds back, e.g. \'{"type": "soft_embedding", "top_k": 5}\', with '
                        'noise \'{"type": "soft_embedding", "noise": {"type": "gumbel", "tau": 0.5}}\' '
                        "(default: the checkpoint's)")
    p.add_argument("--mixture", default=None, metavar="JSON",
                   help='feed each answer token back as a Mixture of Inputs, e.g. \'{"type": "moi", "beta": 1.0, '
                        '"top_k": 20}\' (default: none, plain token inputs)')
    p.add_argument("--max-tokens", type=int, default=64, help="most answer tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (default: 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.add_argument("--trace", type=int, default=0, metavar="K",
                   help="show the top-K tokens of each thought (default: 0 = off)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", help="weights dtype: float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object per question")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine import Engine, LatentPolicy, SamplingParams

    from engine.config import json_object

    mixture = None
    if args.mixture is not None:
        mixture = json_object(args.mixture, "--mixture", 'an object such as {"type": "moi", "beta": 1.0, "top_k": 20}')
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, mixture=mixture)
    latent = None
    feedback = None
    if args.feedback is not None:
        feedback = json_object(args.feedback, "--feedback", 'an object such as {"type": "soft_embedding", "top_k": 5}')
    if args.thoughts is not None:
        latent = LatentPolicy(mode="fixed", thoughts=args.thoughts, trace_top_k=args.trace, feedback=feedback)
    elif args.latent is not None:
        latent = LatentPolicy(mode=args.latent, trace_top_k=args.trace if args.latent != "none" else 0,
                              max_thoughts=args.max_thoughts, threshold=args.threshold,
                              entropy_threshold=args.entropy_threshold, patience=args.patience,
                              feedback=feedback)
    elif args.trace or feedback is not None:
        latent = LatentPolicy(mode=None, trace_top_k=args.trace, feedback=feedback)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    results = engine.generate(args.questions, sampling=sampling, latent=latent)
    for question, r in zip(args.questions, results):
        if args.json:
            print(json.dumps({"question": question, "text": r.text, "answer": r.answer,
                              "finish_reason": r.finish_reason, "num_thoughts": r.num_thoughts,
                              "token_ids": r.token_ids, "latent_trace": r.latent_trace,
                              "timings": r.timings}))
        else:
            print(f"Q: {question}\nA: {r.answer}   [{r.num_thoughts} thoughts, {len(r.token_ids)} tokens, "
                  f"{r.finish_reason}]")
            for i, entry in enumerate(r.latent_trace or [], 1):
                tops = ", ".join(f"{t!r} {p:.2f}" for t, p in zip(entry["texts"], entry["probs"]))
                print(f"   thought {i}: {tops}")
    sys.stdout.flush()
    return 0
