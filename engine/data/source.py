"""Training sources: a data file, or a generator spec that makes fresh samples each epoch.

``resolve_source(spec_or_path, epoch, seed)`` returns the records for one epoch:

* a path (``data/train.json``, ``train.jsonl``) is loaded with ``load_records``; the
  same records every epoch;
* a generator spec is generated anew for each epoch, from a seed derived from
  ``(seed, epoch)``: every epoch differs, and the same ``(epoch, seed)`` always gives the
  same records, so runs (and resumed runs) are reproducible.

Spec syntax (the whole string; no spaces)::

    prosqa[:SIZE][?KEY=VALUE[&KEY=VALUE...]]

    SIZE   full (default) | mini | linear           -- a preset of ProsQASettings
    n      samples per epoch (required)
    seed   replaces the run's seed for this source (e.g. a held-out set: seed=1234)
    fresh  1 (default): new samples every epoch; 0: the same samples every epoch
           (those of epoch 0), i.e. a fixed training set
    any ProsQASettings field overrides the preset: n_nodes, min_hops, max_hops,
           mean_parents, depth_weight, p_one_side, linear, n_concepts (or none), max_tries

    e.g.  prosqa:mini?n=6000
          prosqa:mini?n=6000&n_nodes=14&max_hops=5
          prosqa:linear?n=500&seed=99&fresh=0        (a fixed validation set)

A mixture joins specs with ``+`` (``prosqa?n=16000+prosqa?n=4000&n_nodes=10&min_hops=1``):
each part is generated as above from its own seed (derived from the run's seed and the
part's position, unless the part sets ``seed``) and the parts' records are concatenated in
order (the trainer shuffles them).

A string is a spec when it starts with a known generator name followed by ``:`` or ``?``
(or is the bare name); anything else is a path. This module knows sources, not what a
trainer does with the records (shuffling and batching are the trainer's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.data.prosqa import ProsQASettings, generate, resolve_settings
from engine.data.records import Record, load_records, parse_records

GENERATORS = ("prosqa",)
_SPEC = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<size>[^?]*))?(?:\?(?P<params>.*))?$", re.S)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class GeneratorSpec:
    """A parsed generator spec."""

    name: str
    settings: ProsQASettings
    n: int
    seed: int | None = None  # None: use the run's seed
    fresh: bool = True


def _parse_bool(key: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{key}={raw!r}: expected 1/0 or true/false")


def _parse_int(key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r}: expected an integer") from None


def apply_overrides(settings: ProsQASettings, overrides: dict[str, str]) -> ProsQASettings:
    """``settings`` with fields replaced from ``{"field": "text value"}`` (validated)."""
    fields = {f.name: f for f in dataclasses.fields(ProsQASettings)}
    changes: dict[str, object] = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown ProsQA setting {key!r} (known: {', '.join(fields)})")
        kind = type(getattr(ProsQASettings(), key))
        if key == "n_concepts":
            changes[key] = None if raw.lower() in ("none", "") else _parse_int(key, raw)
        elif kind is bool:
            changes[key] = _parse_bool(key, raw)
        elif kind is int:
            changes[key] = _parse_int(key, raw)
        else:
            try:
                changes[key] = float(raw)
            except ValueError:
                raise ValueError(f"{key}={raw!r}: expected a number") from None
    return dataclasses.replace(settings, **changes)


def _is_single_spec(source: str) -> bool:
    m = _SPEC.match(source)
    return m is not None and m["name"] in GENERATORS


def mixture_parts(source: str) -> list[str]:
    """The specs a ``+``-joined mixture is made of (one part for a plain spec)."""
    return source.split("+")


def is_generator_spec(source: str | os.PathLike) -> bool:
    if not isinstance(source, str):
        return False
    return all(_is_single_spec(part) for part in mixture_parts(source))


def parse_spec(spec: str) -> GeneratorSpec:
    """Parse ``prosqa[:SIZE][?k=v&...]``; errors name the spec and the part at fault."""
    m = _SPEC.match(spec)
    if m is None or m["name"] not in GENERATORS:
        raise ValueError(f"{spec!r} is not a generator spec (known generators: {', '.join(GENERATORS)}; "
                         "syntax prosqa[:SIZE][?n=N&key=value...])")
    try:
        settings = resolve_settings(m["size"] or "full")
        params: dict[str, str] = {}
        for item in (m["params"] or "").split("&"):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"{item!r}: expected key=value")
            if key in params:
                raise ValueError(f"{key!r} given twice")
            params[key] = value
        if "n" not in params:
            raise ValueError("missing n=<samples per epoch>")
        n = _parse_int("n", params.pop("n"))
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        seed = _parse_int("seed", params.pop("seed")) if "seed" in params else None
        fresh = _parse_bool("fresh", params.pop("fresh")) if "fresh" in params else True
        settings = apply_overrides(settings, params)
    except ValueError as e:
        raise ValueError(f"generator spec {spec!r}: {e}") from None
    return GeneratorSpec(name=m["name"], settings=settings, n=n, seed=seed, fresh=fresh)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch: distinct per (seed, epoch), stable across machines."""
    digest = hashlib.sha256(f"coconut-data/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _part_seed(seed: int, part: int) -> int:
    return seed if part == 0 else epoch_seed(seed, -1 - part)


def resolve_source(spec_or_path: str | os.PathLike, epoch: int, seed: int) -> list[Record]:
    """The records of ``spec_or_path`` for ``epoch`` (see the module docstring)."""
    if not is_generator_spec(spec_or_path):
        path = Path(spec_or_path)
        m = _SPEC.match(str(spec_or_path))
        if m is not None and ("?" in str(spec_or_path) or ":" in str(spec_or_path)) and not path.exists():
            raise ValueError(f"unknown generator {m['name']!r} in {str(spec_or_path)!r} "
                             f"(known: {', '.join(GENERATORS)}), and no such file")
        return load_records(path)
    parts = mixture_parts(spec_or_path)
    if len(parts) > 1:
        return [r for i, part in enumerate(parts) for r in resolve_source(part, epoch, _part_seed(seed, i))]
    spec = parse_spec(spec_or_path)
    base = spec.seed if spec.seed is not None else seed
    samples = generate(spec.n, epoch_seed(base, epoch if spec.fresh else 0), spec.settings)
    return parse_records(samples, spec_or_path)
