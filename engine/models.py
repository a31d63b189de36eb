"""Where the bundled default model lives.

The repository ships one small trained checkpoint under ``models/``; ``engine serve``
and ``engine generate`` use it when no ``--model`` is given. ``COCONUT_MODEL`` (an
environment variable) overrides the default.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "prosqa-coconut"
REPO_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def default_model_dir() -> Path:
    env = os.environ.get("COCONUT_MODEL")
    if env:
        return Path(env)
    path = REPO_MODELS_DIR / DEFAULT_MODEL_NAME
    if not path.is_dir():
        raise FileNotFoundError(
            f"no --model given and the bundled default model is not at {path}; pass --model DIR "
            f"(or set COCONUT_MODEL), or run from a checkout of the repository")
    return path
