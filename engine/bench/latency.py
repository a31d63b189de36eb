"""`engine bench latency` (work in progress)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="(not implemented yet)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(SystemExit("engine bench latency: not implemented yet")))
