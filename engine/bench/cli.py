"""``engine bench``: one nested subcommand per benchmark module."""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = ["engine.bench.latency", "engine.bench.churn", "engine.bench.train", "engine.bench.serve",
                 "engine.bench.replicas", "engine.bench.dtype", "engine.bench.arrivals", "engine.bench.samples",
                 "engine.bench.models", "engine.bench.randomness", "engine.bench.peers",
                 "engine.bench.official", "engine.bench.long_row"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (latency, churn, arrivals, train, serve, replicas, dtype, samples, models, "
                                       "randomness, peers, official, long-row)")
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench_sub)
