"""The ``engine`` command line: one subcommand per module.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds
its subcommand(s) and sets ``func`` (called with the parsed arguments; it returns the
process exit code). Modules import torch and friends inside their handlers, so
``engine --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = [
    "engine.commands.generate",   # engine generate
    "server.cli",                 # engine serve
    "engine.data.cli",            # engine data ...
    "engine.train.cli",           # engine train, engine eval, engine convert-reference
    "engine.bench.cli",           # engine bench latency | train | serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="Serve and train latent-reasoning "
                                     "(COCONUT) language models.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
