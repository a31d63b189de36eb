"""The ``engine`` command line: one subcommand per module.

Each module listed in ``COMMAND_MODULES``, and each ``register`` function of the
``coconut.commands`` entry-point group (how the server package adds ``engine serve``
without the engine importing it), takes ``register(subparsers)``, which adds
its subcommand(s) and sets ``func`` (called with the parsed arguments; it returns the
process exit code). Modules import torch and friends inside their handlers, so
``engine --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

COMMAND_MODULES = [
    "engine.commands.generate",   # engine generate
    "engine.data.cli",            # engine data ...
    "engine.train.cli",           # engine train, engine eval, engine convert-reference
    "engine.bench.cli",           # engine bench latency | churn | train | serve
    "engine.fetch_models",        # engine models fetch | list
]
# Packages built on the engine add commands through this entry-point group (the server's
# `engine serve`, declared in pyproject.toml); the engine does not import them by name.
COMMAND_ENTRY_POINTS = "coconut.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="Serve and train latent-reasoning "
                                     "(COCONUT) language models.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for entry in sorted(entry_points(group=COMMAND_ENTRY_POINTS), key=lambda e: e.name):
        entry.load()(sub)
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
