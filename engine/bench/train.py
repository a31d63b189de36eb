"""``engine bench train``: ``coconut_loss`` forward+backward against the naive oracle.

Both objectives run on the same random model and the same batch (default: a
GPT-2-small-sized model, 32 ProsQA-length rows of about 250 tokens, each with a question
of varying length, ``<bot>``, 6 placeholders, ``<eot>`` and a labelled answer; rows
right-padded). Prints seconds per forward+backward for each, their ratio (target >= 3x)
and the two losses (which must agree); ``--json`` prints one JSON object instead. The
naive loss runs row by row (see ``_time_naive``) so that memory stays small. The model is
random: the benchmark measures speed, not quality. On a busy 2-core CPU, ``--threads 1``
is often faster.
"""

from __future__ import annotations

import argparse
import json
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="coconut_loss vs the naive per-sample loss (forward+backward)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gpt2", help="model family (default: gpt2)")
    p.add_argument("--hidden", type=int, default=768, help="model width (default 768, GPT-2 small)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers (default 12)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size (default 50257, GPT-2's)")
    p.add_argument("--batch", type=int, default=32, help="rows in the batch (default: 32)")
    p.add_argument("--length", type=int, default=250, help="mean row length in tokens (default: 250)")
    p.add_argument("--thoughts", type=int, default=6, help="placeholders per row (default: 6)")
    p.add_argument("--answer", type=int, default=24, help="labelled tokens after <eot> (default: 24)")
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions of each (default: 1)")
    p.add_argument("--naive-rows", type=int, default=None,
                   help="time the naive loss on the first N rows only and scale to the batch (default: all)")
    p.add_argument("--bf16", action="store_true", help="run both under bf16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and inputs (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def make_batch(batch: int, length: int, thoughts: int, answer: int, vocab: int, seed: int) -> tuple[dict, int]:
    """Right-padded rows: question (length varies by +-10%), <bot>, placeholders, <eot>, answer."""
    import torch

    g = torch.Generator().manual_seed(seed)
    latent, bot, eot, pad = vocab - 1, vocab - 2, vocab - 3, 0
    question_mean = max(2, length - thoughts - 2 - answer)
    spread = max(1, question_mean // 10)
    lengths = torch.randint(question_mean - spread, question_mean + spread + 1, (batch,), generator=g)
    width = int(lengths.max()) + thoughts + 2 + answer
    ids = torch.full((batch, width), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, q in enumerate(lengths.tolist()):
        row = torch.cat([torch.randint(1, vocab - 3, (q,), generator=g), torch.tensor([bot]),
                         torch.full((thoughts,), latent), torch.tensor([eot]),
                         torch.randint(1, vocab - 3, (answer,), generator=g)])
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        labels[i, len(row) - answer:len(row)] = row[-answer:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, latent


def _time(fn, model, batch, latent, repeat, bf16) -> tuple[float, float]:
    import torch

    best, loss_value = float("inf"), float("nan")
    for _ in range(repeat):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fn(model, batch, latent)
        loss.backward()
        best = min(best, time.perf_counter() - start)
        loss_value = float(loss.detach())
    return best, loss_value


def _time_naive(model, batch, latent, repeat, bf16, rows: int) -> tuple[float, float | None]:
    """The naive loss row by row, each row's share (its labelled count over the batch's)
    back-propagated at once: the same arithmetic and gradient as one call on the whole
    batch, without holding 32 rows' graphs in memory. With ``rows`` < B, the time of the
    first ``rows`` rows is scaled to the batch (every row costs about the same)."""
    import torch

    from engine.train import naive_coconut_loss

    counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
    total = int(counts.sum())
    B = batch["input_ids"].shape[0]
    best, loss_value = float("inf"), 0.0
    for _ in range(repeat):
        model.zero_grad(set_to_none=True)
        start, value = time.perf_counter(), 0.0
        for b in range(min(rows, B)):
            row = {k: v[b:b + 1] for k, v in batch.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                part = naive_coconut_loss(model, row, latent) * (int(counts[b]) / total)
            part.backward()
            value += float(part.detach())
        best = min(best, (time.perf_counter() - start) * B / min(rows, B))
        loss_value = value if rows >= B else None
    return best, loss_value


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.tiny import model_config
    from engine.train import coconut_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("batch", "length", "thoughts", "answer", "repeat", "vocab"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} is invalid: expected >= 1")
    torch.manual_seed(args.seed)
    config = model_config(args.arch, args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                          max_positions=max(1024, args.length * 2), init_std=0.02,
                          bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()   # eval: no dropout, same maths in both
    batch, latent = make_batch(args.batch, args.length, args.thoughts, args.answer, args.vocab, args.seed)
    fast_s, fast_loss = _time(coconut_loss, model, batch, latent, args.repeat, args.bf16)
    naive_rows = args.naive_rows or args.batch
    naive_s, naive_loss = _time_naive(model, batch, latent, args.repeat, args.bf16, naive_rows)
    result = {
        "model": {"arch": args.arch, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "vocab": args.vocab, "parameters": sum(p.numel() for p in model.parameters())},
        "batch": {"rows": args.batch, "mean_length": round(float(batch["attention_mask"].sum(1).float().mean()), 1),
                  "thoughts": args.thoughts, "bf16": args.bf16},
        "threads": torch.get_num_threads(),
        "coconut_loss_s": round(fast_s, 4), "naive_s": round(naive_s, 4),
        "naive_rows_timed": min(naive_rows, args.batch),
        "speedup": round(naive_s / fast_s, 2), "target_speedup": 3.0,
        "loss": fast_loss, "naive_loss": naive_loss,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model: {args.arch} d={args.hidden} L={args.layers} ({result['model']['parameters'] / 1e6:.1f}M "
              f"parameters); batch: {args.batch} rows x ~{result['batch']['mean_length']} tokens, "
              f"{args.thoughts} thoughts{', bf16' if args.bf16 else ''}; {result['threads']} threads")
        print(f"coconut_loss fwd+bwd: {fast_s:8.3f} s   (loss {fast_loss:.5f})")
        scaled = f", {min(naive_rows, args.batch)} rows timed and scaled" if naive_rows < args.batch else ""
        shown = "-" if naive_loss is None else f"{naive_loss:.5f}"
        print(f"naive        fwd+bwd: {naive_s:8.3f} s   (loss {shown}{scaled})")
        print(f"speedup: {naive_s / fast_s:.2f}x (target >= 3x)")
    return 0
