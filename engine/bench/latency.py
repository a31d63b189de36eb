"""``engine bench latency``: the engine against the naive reference and the bare forward.

Runs the same questions, in one process and one run (the machines are shared and noisy,
so only side-by-side ratios mean something), through:

1. ``reference``: the naive decoder (batch 1, the whole sequence recomputed each step);
2. ``engine b=1``: the engine, one request at a time;
3. ``engine b=N``: the engine with N requests submitted at once;
4. ``bare b=1`` / ``bare b=N``: a bare loop of model forwards of the same shapes (one
   left-padded prefill, then one position per row per step through the decoder and the
   LM head, greedy), the floor any engine on this model pays. It runs in lockstep with
   the engine: one engine step, one bare step, and so on.

With ``--hf-generate`` Hugging Face ``generate`` runs the same prompts (batch 1 and N, right
after the engine's runs), greedy, for as many new positions as the engine feeds (thoughts,
``<eot>``, the answer) but without latent mode: the floor a plain LM server stands on.

With ``--operators`` it measures instead the latent step of each feedback operator (hidden,
CODI's projection, Soft Thinking's mixture) at batch 1 and N against ``hidden``
(``engine.bench.operators``).

With ``--compile`` a second engine, its decode step compiled (``EngineConfig.compile``),
runs the same rounds, each right after the eager engine's, also in lockstep with the bare
forward: rows ``compiled b=1`` / ``compiled b=N`` and the ratios compiled step / bare step
and compiled throughput / eager engine throughput.

Reports medians of per-request latency, throughput and time per step, and the ratios its targets are
stated in: reference / engine at batch 1 (>= 7x) and engine step / bare step at
batch N (<= 1.15x). The default model is a random GPT-2-small-sized model (768 wide, 12
layers, 50257-token head) with ProsQA-length prompts (~250 tokens), 6 thoughts and 12
answer tokens (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

from engine.bench.common import add_model_arguments, log, model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="engine vs naive reference vs bare forward",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, hidden=768, layers=12, heads=12, vocab=50257, label="GPT-2-small-sized model")
    p.add_argument("--prompt-tokens", type=int, default=250, help="prompt length in tokens (default 250, ProsQA-sized)")
    p.add_argument("--thoughts", type=int, default=6, help="continuous thoughts per request (default 6)")
    p.add_argument("--max-tokens", type=int, default=12, help="answer tokens per request (default 12)")
    p.add_argument("--batch", type=int, default=32, help="requests submitted at once")
    p.add_argument("--reference-questions", type=int, default=3, help="questions run through the slow reference")
    p.add_argument("--rounds", type=int, default=3, help="alternating engine/bare rounds at the full batch")
    p.add_argument("--compile", action="store_true",
                   help="also measure an engine with the compiled decode step, side by side")
    p.add_argument("--hf-generate", action="store_true",
                   help="also time Hugging Face generate (no latent mode: the same number of new positions, "
                        "greedy) on the same prompts, the floor of a plain LM server")
    p.add_argument("--operators", action="store_true",
                   help="instead: the latent step's time per feedback operator (hidden, projection, soft "
                        "embedding, with and without the entropy stop) at batch 1 and --batch, side by side "
                        "(engine.bench.operators)")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a bar chart of the timings")
    p.set_defaults(func=run)


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


class BareDecoder:
    """The floor: the same forwards without an engine. A left-padded prefill of the
    prompts, then one position per row per ``step()`` through the decoder and the LM
    head of every row (greedy), on a plain ``DynamicCache``."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int):
        import torch

        self.torch = torch
        self.decoder = model.get_decoder()
        self.head, self.embed = model.get_output_embeddings(), model.get_input_embeddings()
        width = max(len(p) for p in prompts)
        device = self.embed.weight.device
        self.ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def _forward(self, embeds, positions):
        return self.decoder(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions,
                            cache=self.cache, use_cache=True).last_hidden_state[:, -1]

    def prefill(self) -> None:
        from transformers import DynamicCache

        with self.torch.inference_mode():
            self.cache = DynamicCache()
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
            self.token = self.head(self._forward(self.embed(self.ids), positions)).argmax(-1)
            self.next_position = self.mask.sum(-1, keepdim=True)
        self._wait()

    def _wait(self) -> None:
        """On CUDA, let the step's kernels finish, so that its time is the step's (the engine
        waits for its sampled tokens anyway)."""
        if self.token.is_cuda:
            self.torch.cuda.synchronize()

    def step(self) -> None:
        torch = self.torch
        with torch.inference_mode():
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            hidden = self._forward(self.embed(self.token)[:, None], self.next_position)
            self.token = self.head(hidden).argmax(-1)
            self.next_position = self.next_position + 1
        self._wait()


def hf_generate(model, prompts: list[list[int]], pad_id: int, new_positions: int) -> float:
    """Seconds for ``model.generate`` to add ``new_positions`` greedy tokens to every
    prompt (left-padded, one batch, end-of-sequence ignored)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_positions,
                       min_new_tokens=new_positions, do_sample=False, pad_token_id=pad_id)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def lockstep(engine, questions, prompts, sampling, latent) -> dict:
    """Run the engine on ``questions`` and a ``BareDecoder`` on the same prompts, one
    step of each in turn, so that both see the same machine load. Returns total
    seconds, prefill seconds and per-step seconds of the steps where every request ran."""
    bare = BareDecoder(engine.checkpoint.model, prompts, engine.checkpoint.markers.pad)
    result = {"engine_steps": [], "bare_steps": []}
    start = time.perf_counter()
    for q in questions:
        engine.add_request(q, sampling, latent)
    engine.step()
    result["engine_prefill"] = time.perf_counter() - start
    t0 = time.perf_counter()
    bare.prefill()
    result["bare_prefill"] = time.perf_counter() - t0
    engine_total, bare_total = result["engine_prefill"], result["bare_prefill"]
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        engine_total += t1 - t0
        if engine.core.last_stats.batch_size == len(questions):
            bare.step()
            t2 = time.perf_counter()
            bare_total += t2 - t1
            result["engine_steps"].append(t1 - t0)
            result["bare_steps"].append(t2 - t1)
    result["engine_total"], result["bare_total"] = engine_total, bare_total
    return result


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine, LatentPolicy, SamplingParams
    from engine.reference import reference_generate

    if args.operators:
        from engine.bench.operators import measure_operators, report_operators

        report_operators(measure_operators(args, make_questions), args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args, tmp)
        # The whole burst is prefilled in one step, as the bare forward does it.
        options = dict(device=args.device, dtype=args.dtype, max_batch_size=args.batch, seed=args.seed,
                       max_prefill_tokens=args.batch * 4 * args.prompt_tokens)
        engine = Engine.from_pretrained(path, **options)
        compiled = None
        if args.compile:
            log("building the compiled engine (every decode batch bucket is compiled now)")
            t0 = time.perf_counter()
            compiled = Engine.from_pretrained(path, compile=True, **options)
            log(f"compiled in {time.perf_counter() - t0:.1f} s")
        results = measure(engine, args, reference_generate, LatentPolicy, SamplingParams, compiled)
    report(results, args)
    return 0


def measure(engine, args, reference_generate, LatentPolicy, SamplingParams, compiled=None) -> dict:
    ck = engine.checkpoint
    questions = make_questions(ck.tokenizer, args.batch, args.prompt_tokens, args.seed)
    sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    latent = LatentPolicy(mode="fixed", thoughts=args.thoughts)
    prompts = [engine.make_request(q, sampling, latent).prompt_token_ids for q in questions]
    engine.generate(questions[:1], sampling, latent)  # warm-up
    if compiled is not None:
        compiled.generate(questions[:1], sampling, latent)
    n_ref = min(args.reference_questions, len(questions))
    out: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("func",)},
                 "prompt_tokens_mean": statistics.mean(len(p) for p in prompts)}

    # Each measurement runs right next to the one it is compared with (the engine and
    # the bare forward alternate step by step), and ratios are taken per pair, so that
    # load from other processes hits both sides alike.
    log(f"batch 1: {n_ref} questions, each through the reference, then engine and bare in lockstep")
    ref_times, ref_tokens, singles = [], [], []
    compiled_singles, compiled_rounds = [], []
    hf_singles, hf_rounds = [], []
    new_positions = args.thoughts + 1 + args.max_tokens   # thoughts, <eot>, the answer
    for q, prompt in zip(questions[:n_ref], prompts):
        t0 = time.perf_counter()
        r = reference_generate(ck.model, ck.tokenizer, q, question_suffix=ck.config.question_suffix,
                               bot_id=ck.markers.bot, eot_id=ck.markers.eot, eos_ids=set(ck.markers.eos),
                               thoughts=args.thoughts, max_tokens=args.max_tokens, ignore_eos=True)
        ref_times.append(time.perf_counter() - t0)
        ref_tokens.append(r.token_ids)
        singles.append(lockstep(engine, [q], [prompt], sampling, latent))
        if compiled is not None:
            compiled_singles.append(lockstep(compiled, [q], [prompt], sampling, latent))
        if args.hf_generate:
            hf_singles.append(hf_generate(ck.model, [prompt], ck.markers.pad, new_positions))
    rounds = []
    for i in range(args.rounds):
        log(f"batch {args.batch}, round {i + 1}/{args.rounds}: engine and bare forward in lockstep")
        rounds.append(lockstep(engine, questions, prompts, sampling, latent))
        if compiled is not None:
            compiled_rounds.append(lockstep(compiled, questions, prompts, sampling, latent))
        if args.hf_generate:
            hf_rounds.append(hf_generate(ck.model, prompts, ck.markers.pad, new_positions))

    med = statistics.median
    mean = statistics.mean
    check = engine.generate(questions[:n_ref], sampling, latent)
    out["engine_matches_reference"] = all(c.token_ids == t for c, t in zip(check, ref_tokens))
    if compiled is not None:
        check = compiled.generate(questions[:n_ref], sampling, latent)
        out["compiled_matches_reference"] = all(c.token_ids == t for c, t in zip(check, ref_tokens))
    out["rows"] = {"reference b=1": {"requests": 1, "latency_s": med(ref_times)}}
    def row(runs, side: str, n: int) -> dict:
        return {"requests": n, "latency_s": med(r[f"{side}_total"] for r in runs),
                "step_ms": 1000 * med(mean(r[f"{side}_steps"]) for r in runs),
                "prefill_s": med(r[f"{side}_prefill"] for r in runs)}

    for name, n, eager, other in (("b=1", 1, singles, compiled_singles),
                                  (f"b={args.batch}", args.batch, rounds, compiled_rounds)):
        out["rows"][f"engine {name}"] = row(eager, "engine", n)
        out["rows"][f"bare {name}"] = row(eager, "bare", n)   # the bare loop beside the eager engine
        if compiled is not None:
            out["rows"][f"compiled {name}"] = row(other, "engine", n)
    if args.hf_generate:
        out["rows"]["HF generate b=1"] = {"requests": 1, "latency_s": med(hf_singles)}
        out["rows"][f"HF generate b={args.batch}"] = {"requests": args.batch, "latency_s": med(hf_rounds)}
    for row in out["rows"].values():
        row["throughput_req_s"] = row["requests"] / row["latency_s"]
        row["tokens_per_s"] = row["throughput_req_s"] * args.max_tokens
    rows = out["rows"]
    def step_ratio(runs):
        return med(sum(r["engine_steps"]) / sum(r["bare_steps"]) for r in runs)

    out["ratios"] = {
        "reference_over_engine_b1": med(r / e["engine_total"] for r, e in zip(ref_times, singles)),
        "engine_step_over_bare_b1": step_ratio(singles),
        f"engine_step_over_bare_b{args.batch}": step_ratio(rounds),
        f"throughput_b{args.batch}_over_b1": rows[f"engine b={args.batch}"]["throughput_req_s"]
        / rows["engine b=1"]["throughput_req_s"],
    }
    if args.hf_generate:
        out["ratios"].update({
            "engine_over_hf_generate_throughput_b1": med(h / e["engine_total"] for h, e in zip(hf_singles, singles)),
            f"engine_over_hf_generate_throughput_b{args.batch}": med(
                h / e["engine_total"] for h, e in zip(hf_rounds, rounds)),
        })
    if compiled is not None:
        out["ratios"].update({
            "compiled_step_over_bare_b1": step_ratio(compiled_singles),
            f"compiled_step_over_bare_b{args.batch}": step_ratio(compiled_rounds),
            f"compiled_over_engine_throughput_b{args.batch}": med(
                e["engine_total"] / c["engine_total"] for e, c in zip(rounds, compiled_rounds)),
            "compiled_over_engine_step_b1": med(
                mean(c["engine_steps"]) / mean(e["engine_steps"]) for e, c in zip(singles, compiled_singles)),
        })
    return out


def report(results: dict, args) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"prompt tokens (mean) {results['prompt_tokens_mean']:.0f}, thoughts {args.thoughts}, "
              f"answer tokens {args.max_tokens}; engine output == reference: {results['engine_matches_reference']}"
              + (f", compiled == reference: {results['compiled_matches_reference']}"
                 if "compiled_matches_reference" in results else ""))
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
