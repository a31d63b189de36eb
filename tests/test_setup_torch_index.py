"""scripts/setup.sh picks where torch comes from: the CPU build on a machine without an
NVIDIA GPU (PyPI's torch is the CUDA build: a 526 MB wheel and ~3 GB of nvidia-*
packages), the default index (CUDA build) on a GPU machine, TORCH_INDEX_URL when set.

The decision runs with ``PATH`` reduced to a folder that holds a fake ``nvidia-smi`` (one
that lists a GPU, one that fails) or none. The install itself runs on a copy of the
script in a scratch folder whose ``.venv/bin/python`` is a fake that logs its arguments
and fails the CPU-index install on demand, so the order of the pip calls and the
fallback are checked without installing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BASH = shutil.which("bash") or "/bin/bash"

GPU_SMI = "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n"
BROKEN_SMI = ("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver' >&2\n"
              "exit 9\n")


def _bin(tmp_path: Path, smi: str | None, tools: tuple[str, ...] = ()) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    if smi is not None:
        (folder / "nvidia-smi").write_text(smi)
        (folder / "nvidia-smi").chmod(0o755)
    for tool in tools:
        found = shutil.which(tool)
        assert found, f"{tool} is not on this machine"
        (folder / tool).symlink_to(found)
    return folder


def plan(tmp_path: Path, smi: str | None, **env: str) -> str:
    folder = _bin(tmp_path, smi)
    result = subprocess.run([BASH, str(SETUP), "--print-torch-index"], capture_output=True, text=True,
                            env={"PATH": str(folder), **env}, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_no_gpu_means_the_cpu_index_then_the_default(tmp_path):
    assert plan(tmp_path, None) == f"cpu-then-default {CPU_INDEX}"


def test_a_gpu_means_the_default_index(tmp_path):
    assert plan(tmp_path, GPU_SMI) == "default"


def test_a_failing_nvidia_smi_is_no_gpu(tmp_path):
    assert plan(tmp_path, BROKEN_SMI) == f"cpu-then-default {CPU_INDEX}"


@pytest.mark.parametrize("smi", [None, GPU_SMI])
def test_torch_index_url_wins(tmp_path, smi):
    assert plan(tmp_path, smi, TORCH_INDEX_URL="https://example.org/simple") == "index https://example.org/simple"


def test_an_empty_torch_index_url_is_unset(tmp_path):
    assert plan(tmp_path, None, TORCH_INDEX_URL="") == f"cpu-then-default {CPU_INDEX}"


@pytest.mark.parametrize("smi", [None, GPU_SMI])
def test_torch_index_url_default_means_the_default_index_without_a_gpu(tmp_path, smi):
    """The CUDA image's build: no GPU there, yet the default index's (CUDA) torch."""
    assert plan(tmp_path, smi, TORCH_INDEX_URL="default") == "default"


# ---------------------------------------------------------------- the install steps

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$*" in
  "-c import torch") exit 1 ;;
  *"--index-url https://download.pytorch.org/whl/cpu"*) exit "${CPU_INDEX_RC:-0}" ;;
esac
exit 0
"""


def run_setup(tmp_path: Path, smi: str | None, cpu_index_rc: int = 0, python: str = FAKE_PYTHON,
              **env: str) -> tuple[list[str], str]:
    """Run a copy of setup.sh whose venv python is ``python``; its calls and stdout."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, root / "scripts" / "setup.sh")
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(python)
    (venv_bin / "python").chmod(0o755)
    (venv_bin / "activate").write_text('PATH="$(pwd)/.venv/bin:$PATH"; export PATH\n')
    folder = _bin(tmp_path, smi, tools=("dirname", "grep"))
    log = tmp_path / "calls.log"
    result = subprocess.run([BASH, str(root / "scripts" / "setup.sh")], capture_output=True, text=True,
                            env={"PATH": str(folder), "FAKE_LOG": str(log), "CPU_INDEX_RC": str(cpu_index_rc),
                                 **env}, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return log.read_text().splitlines(), result.stdout


def _torch_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip install") and "torch==2.13.0" in c]


def test_without_a_gpu_the_cpu_build_is_installed_from_its_index(tmp_path):
    calls, out = run_setup(tmp_path, None, cpu_index_rc=0)
    assert _torch_installs(calls) == [f"-m pip install -q --timeout 15 --retries 0 --index-url {CPU_INDEX} "
                                      f"torch==2.13.0"]
    assert "CPU build" in out


def test_an_unreachable_cpu_index_falls_back_to_the_default_index(tmp_path):
    calls, out = run_setup(tmp_path, None, cpu_index_rc=1)
    assert _torch_installs(calls) == [
        f"-m pip install -q --timeout 15 --retries 0 --index-url {CPU_INDEX} torch==2.13.0",
        "-m pip install -q torch==2.13.0"]
    assert "cannot be reached" in out


def test_with_a_gpu_the_default_index_gives_the_cuda_build(tmp_path):
    calls, out = run_setup(tmp_path, GPU_SMI, cpu_index_rc=1)
    assert _torch_installs(calls) == ["-m pip install -q torch==2.13.0"]
    assert "CUDA build" in out


def test_torch_index_url_default_installs_from_pip_s_own_index(tmp_path):
    calls, out = run_setup(tmp_path, None, cpu_index_rc=1, TORCH_INDEX_URL="default")
    assert _torch_installs(calls) == ["-m pip install -q torch==2.13.0"]
    assert "TORCH_INDEX_URL=default" in out and "CUDA build" in out


def test_torch_index_url_is_the_only_index_tried(tmp_path):
    calls, _ = run_setup(tmp_path, None, cpu_index_rc=1, TORCH_INDEX_URL="https://example.org/simple")
    assert _torch_installs(calls) == ["-m pip install -q --index-url https://example.org/simple torch==2.13.0"]


def test_the_project_is_installed_after_torch(tmp_path):
    calls, _ = run_setup(tmp_path, None, cpu_index_rc=0)
    torch_at = calls.index(_torch_installs(calls)[0])
    project = [i for i, c in enumerate(calls) if "-e ." in c and "-e clients/python" in c]
    assert project and project[0] > torch_at


def test_an_installed_torch_is_kept(tmp_path):
    """Idempotent: when torch imports, no torch install runs (the project install does)."""
    python = FAKE_PYTHON.replace('"-c import torch") exit 1', '"-c import torch") exit 0')
    calls, _ = run_setup(tmp_path, None, python=python)
    assert _torch_installs(calls) == []
    assert any("-e ." in c for c in calls)


def test_the_docker_images_torch_index_still_reaches_pip():
    """The images pass TORCH_INDEX_URL (docker/Dockerfile*): the script hands it to pip."""
    assert '--index-url "$TORCH_INDEX_URL"' in SETUP.read_text()
    assert os.access(SETUP, os.X_OK)
