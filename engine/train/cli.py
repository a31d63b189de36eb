"""``engine train`` / ``engine eval`` / ``engine convert-reference`` (work in progress)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    for name in ("train", "eval", "convert-reference"):
        p = sub.add_parser(name, help="(not implemented yet)")
        p.set_defaults(func=lambda args, n=name: (_ for _ in ()).throw(SystemExit(f"engine {n}: not implemented yet")))
