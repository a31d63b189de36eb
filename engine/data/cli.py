"""``engine data``: make and inspect training data.

    engine data prosqa --n N --seed S --out FILE [--size full|mini|linear] [--set KEY=VALUE ...]
    engine data stats FILE_OR_SPEC [FILE_OR_SPEC ...] [--json]

``prosqa`` writes verified ProsQA-style samples (JSON list, or JSONL for a ``.jsonl``
name), with a progress bar on a terminal for large N. ``stats`` prints nodes, edges,
people, steps and question length side by side for each file (or generator spec, read as
its epoch 0), e.g. a generated file next to ``../shared/data/prosqa_valid.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PROGRESS_MIN = 2000  # below this many samples a progress bar is noise


def _key_values(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _prosqa(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.data.prosqa import PRESETS, iter_samples
    from engine.data.records import save_records
    from engine.data.source import apply_overrides

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    settings = apply_overrides(PRESETS[args.size], _key_values(args.set))
    start = time.perf_counter()
    bar = tqdm(iter_samples(args.n, args.seed, settings), total=args.n, unit="sample",
               desc=f"prosqa {args.size}", disable=True if args.n < PROGRESS_MIN else None)
    samples = list(bar)
    path = save_records(samples, args.out)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(samples)} {args.size} samples (seed {args.seed}) to {path} in {elapsed:.1f}s")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from engine.data.source import resolve_source
    from engine.data.stats import format_stats, record_stats

    named = [(source, record_stats(resolve_source(source, epoch=0, seed=args.seed))) for source in args.sources]
    if args.json:
        json.dump(dict(named), sys.stdout, indent=2)
        print()
    else:
        print(format_stats(named))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make and inspect training data (ProsQA generator, statistics)")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    g = data_sub.add_parser("prosqa", help="generate ProsQA-style samples (COCONUT appendix)")
    g.add_argument("--n", type=int, required=True, help="number of samples")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--out", required=True, help="output file (.json: a JSON list; .jsonl: one per line)")
    g.add_argument("--size", choices=["full", "mini", "linear"], default="full",
                   help="full: the published distribution (default); mini: ~10 nodes, 2-4 hops; "
                        "linear: chains without branching")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ProsQASettings field, e.g. --set n_nodes=14 (repeatable)")
    g.set_defaults(func=_prosqa)

    s = data_sub.add_parser("stats", help="statistics of data files, side by side")
    s.add_argument("sources", nargs="+", metavar="FILE_OR_SPEC",
                   help="data file, or generator spec such as 'prosqa:mini?n=1000'")
    s.add_argument("--seed", type=int, default=0, help="seed for generator specs (default 0)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_stats)
