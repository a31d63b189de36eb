"""``engine serve`` (work in progress)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="(not implemented yet)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(SystemExit("engine serve: not implemented yet")))
