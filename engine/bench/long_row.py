"""``engine bench long-row``: one long conversation beside short ones, its attention apart or not.

Decode rows attend over their slots' columns, cut at the longest row: one row far longer
than the others would make every row read its length. The lean forward (Llama, Qwen2)
attends such rows apart (``engine.runner.flat_batch.split_rows``). This fills the engine
with ``--rows`` short requests (prompts of ``--short-tokens``) and one of ``--long-tokens``,
then times decode steps in alternating blocks of ``--block`` steps, the split allowed
(``SPLIT_MAX_SHARE`` as shipped) and forbidden (0: every row cut at the longest), and
prints both medians and split / whole, measured in one run. Default model: a random
6-layer, 384-wide Llama.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from engine.bench.common import add_model_arguments, local_model, log


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("long-row", help="decode steps with one long row beside short ones: split attention or not",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, hidden=384, layers=6, heads=6, vocab=8192, label="6-layer, 384-wide Llama")
    p.add_argument("--rows", type=int, default=15, help="short requests (default 15)")
    p.add_argument("--short-tokens", type=int, default=40, help="their prompt length (default 40)")
    p.add_argument("--long-tokens", type=int, default=2500, help="the long request's prompt length (default 2500)")
    p.add_argument("--blocks", type=int, default=8, help="blocks of steps each way (default 8)")
    p.add_argument("--block", type=int, default=4, help="steps per block (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine, LatentPolicy, SamplingParams
    from engine.bench.latency import make_questions
    from engine.runner import flat_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            directory = local_model(args.model, args.revision, args.dtype)
        else:
            from engine.tiny import make_checkpoint

            log(f"building a random Llama ({args.hidden} wide, {args.layers} layers, vocab {args.vocab})")
            directory = make_checkpoint(Path(tmp) / "model", "llama", hidden=args.hidden, layers=args.layers,
                                        heads=args.heads, max_positions=args.long_tokens + 512, init_std=0.02,
                                        model_vocab_size=args.vocab, seed=args.seed)
        engine = Engine.from_pretrained(directory, device=args.device, dtype=args.dtype, max_batch_size=args.rows + 1,
                                        max_seq_len=args.long_tokens + 512, max_prefill_tokens=args.long_tokens + 512,
                                        seed=args.seed)
        if not engine.runner.lean_decode:
            raise ValueError("the split applies to the lean forward (Llama, Qwen2 models); this model's steps go "
                             "through its modules")
        tokenizer = engine.checkpoint.tokenizer
        steps = 2 * args.blocks * args.block + 4
        sampling = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        language = LatentPolicy(mode="none")
        engine.add_request(make_questions(tokenizer, 1, args.long_tokens, args.seed)[0], sampling, language)
        for question in make_questions(tokenizer, args.rows, args.short_tokens, args.seed + 1):
            engine.add_request(question, sampling, language)
        log(f"prefilling one request of ~{args.long_tokens} tokens and {args.rows} of ~{args.short_tokens}")
        scheduler = engine.core.scheduler
        while scheduler.num_waiting or any(r.prefilled_tokens < r.num_prompt_tokens
                                           for r in scheduler.running.values()):
            engine.step()
        engine.step()
        lengths = [n + 1 for n in engine.runner.lengths[:args.rows + 1]]
        split = flat_batch.split_rows(lengths)
        shipped = flat_batch.SPLIT_MAX_SHARE
        times: dict[str, list[float]] = {"split": [], "whole": []}
        try:
            for _ in range(args.blocks):
                for name, share in (("split", shipped), ("whole", 0.0)):
                    flat_batch.SPLIT_MAX_SHARE = share
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        engine.step()
                        times[name].append(time.perf_counter() - t0)
        finally:
            flat_batch.SPLIT_MAX_SHARE = shipped
    split_ms, whole_ms = (1000 * statistics.median(times[k]) for k in ("split", "whole"))
    result = {"rows": args.rows + 1, "row_lengths": sorted(lengths), "split": split,
              "split_step_ms": split_ms, "whole_step_ms": whole_ms, "split_over_whole": split_ms / whole_ms,
              "steps_each": len(times["split"])}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.rows + 1} decode rows, lengths {min(lengths)}-{max(lengths)}; split chosen: {split}")
        print(f"step, long rows attended apart: {split_ms:.1f} ms; every row cut at the longest: {whole_ms:.1f} ms; "
              f"split / whole {split_ms / whole_ms:.2f}x ({len(times['split'])} steps each)")
    return 0
