#!/usr/bin/env bash
# Idempotent install into ./.venv: torch first, then this project and its SDK.
# Usage: scripts/setup.sh [--test|--ray|--gguf]  (--ray also installs the Ray Serve extra for
#                                          `engine serve --replicas`; --gguf the GGUF reader for
#                                          .gguf models; --test the test dependencies and both
#                                          extras, whose tests run)
#        scripts/setup.sh --print-torch-index
#                                         (print where torch would come from; installs nothing)
#
# Where torch comes from (a plain `torch` requirement on PyPI is the CUDA build: a
# 526 MB wheel plus ~3 GB of nvidia-* packages):
# - TORCH_INDEX_URL=default: pip's default index (PyPI or the mirror pip is configured
#   with), whose Linux torch is the CUDA build: the CUDA image sets it (no GPU in a build).
# - TORCH_INDEX_URL set to a URL: that index only.
# - TORCH_INDEX_URL empty or unset: decide as follows (the CPU image leaves it empty).
# - else, an NVIDIA GPU (`nvidia-smi -L` runs and succeeds): the default index, i.e. the
#   CUDA build, which is what a GPU machine wants.
# - else (no GPU): the CPU build from https://download.pytorch.org/whl/cpu, tried with a
#   short timeout; if that index cannot be reached, the default index (pip's own
#   configuration: its find-links or mirror may hold a CPU wheel; plain PyPI gives the
#   CUDA build, which also runs on CPU).
set -euo pipefail
TORCH_VERSION=2.13.0
CPU_INDEX_URL=https://download.pytorch.org/whl/cpu

# The decision uses shell builtins only (so it can be tested with any PATH). Prints
# "index URL" (that index only), "default" (the default index), or
# "cpu-then-default URL" (the CPU index, falling back to the default one).
torch_index_plan() {
  if [ "${TORCH_INDEX_URL:-}" = "default" ]; then
    echo "default"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "index $TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "default"
  else
    echo "cpu-then-default $CPU_INDEX_URL"
  fi
}

if [ "${1:-}" = "--print-torch-index" ]; then
  torch_index_plan
  exit 0
fi

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
quiet_pip() { python -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
quiet_pip --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  plan=$(torch_index_plan)
  case "$plan" in
    index\ *)
      echo "installing torch $TORCH_VERSION from TORCH_INDEX_URL=$TORCH_INDEX_URL"
      quiet_pip ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
      ;;
    default)
      # A GPU machine (or TORCH_INDEX_URL=default): the default index's torch is the CUDA build.
      if [ "${TORCH_INDEX_URL:-}" = "default" ]; then
        echo "TORCH_INDEX_URL=default: installing torch $TORCH_VERSION from the default index (the CUDA build)"
      else
        echo "NVIDIA GPU found (nvidia-smi): installing the CUDA build of torch $TORCH_VERSION from the default index"
      fi
      quiet_pip "torch==$TORCH_VERSION"
      ;;
    *)
      echo "no NVIDIA GPU (nvidia-smi absent or failing): installing the CPU build of torch $TORCH_VERSION from $CPU_INDEX_URL"
      if ! python -m pip install -q --timeout 15 --retries 0 --index-url "$CPU_INDEX_URL" \
          "torch==$TORCH_VERSION" >/dev/null 2>&1; then
        echo "$CPU_INDEX_URL cannot be reached: installing torch $TORCH_VERSION from the default index"
        quiet_pip "torch==$TORCH_VERSION"
      fi
      ;;
  esac
fi
extras=""
case "${1:-}" in
  --test) extras="[test,ray,gguf]" ;;
  --ray) extras="[ray]" ;;
  --gguf) extras="[gguf]" ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--test|--ray|--gguf]" >&2; exit 2 ;;
esac
quiet_pip -e ".${extras}" -e clients/python
python -c "import torch, transformers, engine, coconut_client; print(f'installed: torch {torch.__version__}, transformers {transformers.__version__}')"
