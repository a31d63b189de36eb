"""``engine bench long-row`` on a tiny Llama: the long row is the one the split takes apart
(its lengths checked by hand from the prompts), both kinds of step are timed as many times,
the ratio comes from the medians, and the shipped share is back in place after the run; a
model the lean forward does not take is refused saying why."""

from __future__ import annotations

import argparse

import pytest

from engine.bench import long_row
from engine.runner import flat_batch

TINY = ["--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "512", "--threads", "1"]


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    long_row.register(parser.add_subparsers())
    return parser.parse_args(["long-row", *TINY, "--rows", "8", "--short-tokens", "12", "--long-tokens", "300",
                              "--blocks", "2", "--block", "2", "--json", *extra])


def test_long_row_bench_splits_the_long_row_and_reports_its_medians(capsys):
    import json

    shipped = flat_batch.SPLIT_MAX_SHARE
    assert long_row.run(_args()) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lengths = report["row_lengths"]
    assert report["rows"] == 9 and len(lengths) == 9
    assert lengths[-1] > 280 and lengths[-2] < 30              # one ~300-token prompt, eight ~12-token ones
    short, long_rows = report["split"]
    assert short == lengths[-2] and len(long_rows) == 1        # the others' length; the long row alone apart
    assert report["steps_each"] == 4
    assert report["split_over_whole"] == pytest.approx(report["split_step_ms"] / report["whole_step_ms"])
    assert flat_batch.SPLIT_MAX_SHARE == shipped


def test_a_model_off_the_lean_path_is_refused(tmp_path, tiny_checkpoint):
    args = _args("--model", str(tiny_checkpoint("gpt2")))
    with pytest.raises(ValueError, match="lean forward"):
        long_row.run(args)
