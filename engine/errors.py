"""Errors shared by the engine's modules (a leaf module: it imports nothing of the engine)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory is missing something or holds a wrong value."""
