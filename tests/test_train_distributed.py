"""``engine train`` under ``torchrun`` with 2 CPU processes (gloo): DDP replicas agree, and FSDP
(sharded, passes synchronised across ranks) ends with the very same weights as DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.test_train_e2e import write_config


def torchrun(config_path, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "engine.cli", "train", str(config_path)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_ddp_and_fsdp_on_two_cpu_processes(tmp_path):
    from safetensors.torch import load_file

    from engine import Engine, SamplingParams

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}   # same maths in both
    runs = {}
    for parallel in ("ddp", "fsdp"):
        config = write_config(tmp_path, name=f"run_{parallel}", num_epochs=2, max_latent_stage=1,
                              parallel=parallel, plot=False)
        config["model"].update(no_dropout)
        path = tmp_path / f"{parallel}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = torchrun(path, repo)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = tmp_path / f"run_{parallel}"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]     # rank 0 alone logs
        runs[parallel] = (run_dir, rows)
    summary = [r for r in runs["ddp"][1] if r["kind"] == "summary"][0]
    checksums = summary["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    ddp = load_file(runs["ddp"][0] / "checkpoint_2" / "model.safetensors")
    fsdp = load_file(runs["fsdp"][0] / "checkpoint_2" / "model.safetensors")
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        assert (ddp[key] - fsdp[key]).abs().max() < 1e-5, key
    initial = [r for r in runs["ddp"][1] if r["kind"] == "epoch"][0]
    assert initial["samples"] == 256                 # both ranks' shards counted once each
    out = Engine.from_pretrained(runs["fsdp"][0] / "checkpoint_2").generate(["What is Tom?"],
                                                                         SamplingParams(max_tokens=4))[0]
    assert out.num_thoughts == 1
