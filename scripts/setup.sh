#!/usr/bin/env bash
# Idempotent install into ./.venv: the CPU build of torch first (a plain `torch`
# requirement would pull a multi-GB CUDA build), then this project and its SDK.
# Usage: scripts/setup.sh [--test]   (--test also installs the test dependencies)
# TORCH_INDEX_URL, when set, is the index torch is installed from: the Docker images
# set it, e.g. https://download.pytorch.org/whl/cpu for the CPU build on a machine
# whose default index (plain PyPI) holds the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
python -m pip install -q -e ".${extras}" -e clients/python 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, transformers, engine, coconut_client; print(f'installed: torch {torch.__version__}, transformers {transformers.__version__}')"
