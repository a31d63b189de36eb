"""What the decoding benchmarks share: the random-model and machine options, and the model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_model_arguments(p: argparse.ArgumentParser, *, hidden: int, layers: int, heads: int, vocab: int,
                        label: str) -> None:
    """--model (else a random GPT-2 of the given shape), --device, --dtype, --threads, --seed, --json."""
    p.add_argument("--model", default=None, help=f"a checkpoint directory, a .gguf file or a Hugging Face Hub "
                   f"id (default: a random {label})")
    p.add_argument("--revision", default=None, help="the Hub id's branch, tag or commit (default: main)")
    p.add_argument("--hidden", type=int, default=hidden, help=f"width of the random model (default {hidden})")
    p.add_argument("--layers", type=int, default=layers, help=f"layers of the random model (default {layers})")
    p.add_argument("--heads", type=int, default=heads, help=f"attention heads of the random model (default {heads})")
    p.add_argument("--vocab", type=int, default=vocab, help=f"LM head size of the random model (default {vocab})")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and inputs (default 0)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def model_dir(args: argparse.Namespace, tmp: str) -> str | Path:
    """``--model``, or a random GPT-2 of ``args``' shape written under ``tmp``."""
    if args.model is not None:
        return local_model(args.model, getattr(args, "revision", None), getattr(args, "dtype", "float32"))
    from engine.tiny import make_checkpoint

    log(f"building a random GPT-2 ({args.hidden} wide, {args.layers} layers, vocab {args.vocab})")
    return make_checkpoint(Path(tmp) / "model", "gpt2", hidden=args.hidden, layers=args.layers, heads=args.heads,
                           max_positions=1024, init_std=0.02, model_vocab_size=args.vocab, seed=args.seed)


def local_model(spec: str, revision: str | None = None, dtype: str = "float32") -> Path:
    """What ``--model`` names, as a checkpoint directory: a Hub id from the Hub's cache, a
    ``.gguf`` file dequantized to ``dtype`` into a temporary directory (``engine.sources``)."""
    from engine.sources import resolve_model

    from engine.gguf import local_directory

    source = resolve_model(spec, revision)
    if source.is_gguf:
        log(f"dequantizing {source.gguf_file} to {dtype}")
    return local_directory(source, dtype)
