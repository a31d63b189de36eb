"""The offline COCONUT trainer (``engine train``) and its reusable objective.

``from engine.train import coconut_loss`` gives the batched objective (see
``engine.train.loss``); ``naive_coconut_loss`` is its per-sample oracle. Names are
imported lazily so that ``engine --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "coconut_loss": "engine.train.loss",
    "coconut_hidden_states": "engine.train.loss",
    "naive_coconut_loss": "engine.train.naive",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.train' has no attribute {name!r}")
