#!/usr/bin/env bash
# Install (if needed) and start the server on the bundled default model.
# Extra arguments go to `engine serve` (see `engine serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/engine serve "$@"
