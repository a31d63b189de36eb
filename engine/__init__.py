"""Latent-reasoning (COCONUT) decoding engine.

    from engine import Engine, SamplingParams, LatentPolicy
    eng = Engine.from_pretrained(path, device="cpu", dtype="float32")
    results = eng.generate(questions, sampling=SamplingParams(max_tokens=32, temperature=0.0),
                           latent=LatentPolicy(mode="fixed", thoughts=6))

Names are imported lazily, so ``engine --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "engine.sync_engine",
    "EngineConfig": "engine.config",
    "SamplingParams": "engine.params",
    "LatentPolicy": "engine.params",
    "LatentFeedback": "engine.params",
    "FeedbackNoise": "engine.params",
    "InputMixture": "engine.params",
    "RequestOutput": "engine.output",
    "CoconutConfig": "engine.checkpoint",
    "CheckpointError": "engine.checkpoint",
    "RequestTooLongError": "engine.core",
    "AsyncEngine": "engine.async_engine",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
