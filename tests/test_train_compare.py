"""``engine.train.compare``: the time and samples axes of runs that continue another run's
checkpoint."""

from __future__ import annotations

import json

import pytest

from engine.train.compare import load_curves, main


def write_run(directory, epochs):
    directory.mkdir()
    lines = [{"kind": "step", "epoch": 1, "loss": 1.0}] + [{"kind": "epoch", **e} for e in epochs]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return directory


def test_a_continued_run_starts_where_its_parent_epoch_ended(tmp_path):
    cot = write_run(tmp_path / "cot", [{"epoch": e, "stage": 0, "train_seconds": 60, "val_accuracy": 0.5 + e / 10,
                                        "val_mean_tokens": 12} for e in (1, 2, 3)])
    coconut = write_run(tmp_path / "coconut", [
        {"epoch": 3, "stage": 1, "train_seconds": 30, "val_accuracy": 0.6, "val_mean_tokens": 9},
        {"epoch": 4, "stage": 2, "train_seconds": 90, "val_mean_tokens": 5}])
    [a, b] = load_curves([f"CoT={cot}", f"Coconut={coconut}@CoT:2"])
    assert a.minutes == [1, 2, 3] and a.accuracy == [0.6, 0.7, 0.8]
    # CoT's epochs 1-2 took 2 minutes; then 0.5 and 1.5 more
    assert b.minutes == [2, 2.5, 4] and b.accuracy == [0.7, 0.6, None] and b.stages == [0, 1, 2]
    out = tmp_path / "cmp.png"
    assert main(["--run", f"CoT={cot}", "--run", f"Coconut={coconut}@CoT:2", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_the_samples_axis_counts_the_parents_epochs_first(tmp_path):
    small = write_run(tmp_path / "small", [{"epoch": e, "train_seconds": 60, "samples": 100, "val_accuracy": 0.5, "val_mean_tokens": 3}
                                           for e in (1, 2, 3)])
    wide = write_run(tmp_path / "wide", [{"epoch": e, "train_seconds": 120, "samples": 250, "val_accuracy": 0.9, "val_mean_tokens": 3}
                                         for e in (4, 5)])
    [a, b] = load_curves([f"small={small}", f"wide={wide}@small:3"])
    assert a.samples == [100, 200, 300]
    assert b.samples == [300, 550, 800] and b.minutes == [3, 5, 7]
    out = tmp_path / "samples.png"
    assert main(["--run", f"small={small}", "--run", f"wide={wide}@small:3", "--x", "samples",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_bad_run_specs_say_what_was_expected(tmp_path):
    cot = write_run(tmp_path / "cot", [{"epoch": 1, "train_seconds": 1}])
    with pytest.raises(ValueError, match="LABEL=RUN_DIR"):
        load_curves([str(cot)])
    with pytest.raises(ValueError, match="another --run label"):
        load_curves([f"x={cot}@nope:1"])
    with pytest.raises(ValueError, match="no epoch lines"):
        load_curves([f"x={tmp_path}"])
