"""A run directory: epoch checkpoints, the best one, and what resuming needs.

Layout (``run_dir = save_path[/name]``)::

    checkpoint_<E>/     servable checkpoint after epoch E (1-based, the reference's name)
        trainer_state.json    epoch, stage, optimizer step, best accuracy, metrics so far
        optimizer.pt          torch.save({"optimizer": state_dict, "rng": cpu rng state});
                              under FSDP the full (gathered) optimizer state
    best/               a copy of the best checkpoint by validation accuracy (no state)
    metrics.jsonl, metrics.png, config.yaml

Optimizer files hold tensors and plain containers only and are read back with
``torch.load(weights_only=True)``; model weights are safetensors. Nothing else is ever
unpickled. This module knows files, not training.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"checkpoint_{epoch}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Resumable checkpoints (those with a trainer state), oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        m = _CHECKPOINT.match(path.name)
        if m and (path / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def optimizer_file(directory: Path, rank: int, sharded: bool) -> Path:
    return directory / (f"optimizer_rank{rank}.pt" if sharded else "optimizer.pt")


def save_training_state(directory: Path, state: dict) -> None:
    (directory / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")


def save_optimizer(directory: Path, optimizer_state: dict) -> None:
    """The optimizer's (full) state dict and the CPU RNG state, for ``load_optimizer``."""
    torch.save({"optimizer": optimizer_state, "rng": torch.get_rng_state()}, optimizer_file(directory, 0, False))


def load_training_state(directory: Path) -> dict:
    path = directory / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot resume from it ({e})") from None


def load_optimizer(directory: Path, rank: int, sharded: bool) -> dict | None:
    path = optimizer_file(directory, rank, sharded)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def copy_as_best(source: Path, run_dir: Path) -> Path:
    """Replace ``best/`` with the servable part of ``source`` (no optimizer state)."""
    best = run_dir / "best"
    tmp = run_dir / ".best.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("optimizer*.pt"))
    if best.exists():
        shutil.rmtree(best)
    tmp.rename(best)
    return best


def is_new_best(accuracy: float | None, stage: int, best_accuracy: float, best_stage: int) -> bool:
    """Whether an epoch's validation accuracy at curriculum ``stage`` (capped at the last
    stage) replaces ``best/``: ``best/`` stands for the finished curriculum, so an epoch of
    a later stage (more thoughts, less language) wins whatever its accuracy; within a stage
    the higher accuracy wins."""
    return accuracy is not None and (stage, accuracy) > (best_stage, best_accuracy)


def prune(run_dir: Path, keep: int, keep_every: int = 0) -> None:
    """Keep the newest ``keep`` epoch checkpoints (0: keep all) and every epoch that is a
    multiple of ``keep_every`` (0: none of them specially)."""
    if keep <= 0:
        return
    for epoch, path in list_checkpoints(run_dir)[:-keep]:
        if keep_every and epoch % keep_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)
