"""Shared fixtures: tiny random checkpoints built from config (no downloads).

``tiny_checkpoint(arch, **kw)`` builds (once per session and argument set) a checkpoint
directory with ``engine.tiny.make_checkpoint`` and returns its path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report gets the tail of the log of every ``LiveServer`` running, and of
    every one an exception stopped since the last report."""
    from tests.live_server import LEFT_BY_ERROR, RUNNING

    outcome = yield
    report = outcome.get_result()
    left = LEFT_BY_ERROR[:]
    LEFT_BY_ERROR.clear()
    if not report.failed:
        return
    tails = left
    for server in RUNNING:
        try:
            tails.append((server.url, server.tail()))
        except OSError:
            pass
    for url, tail in tails:
        report.sections.append((f"live server {url} (last lines of its log)", tail))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from engine.tiny import make_checkpoint

    built: dict[str, Path] = {}

    def build(arch: str = "gpt2", **kwargs) -> Path:
        try:  # cache only on plain values: a module's repr does not show its weights
            key = json.dumps([arch, sorted(kwargs.items())])
        except TypeError:
            key = None
        if key is None or key not in built:
            directory = tmp_path_factory.mktemp(f"ckpt-{arch}")
            path = make_checkpoint(directory, arch, **kwargs)
            if key is None:
                return path
            built[key] = path
        return built[key]

    return build


@pytest.fixture(scope="session")
def gpt2_checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="session")
def prosqa_valid_path() -> Path:
    path = SHARED_DATA / "prosqa_valid.json"
    if not path.is_file():
        pytest.skip(f"the shared ProsQA validation split is not at {path} (../shared is absent)")
    return path


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (small tensors on a busy 2-core machine), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
