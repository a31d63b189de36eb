#!/usr/bin/env bash
# Train the ProsQA CPU recipe (configs/prosqa_{cot,coconut,no_cot}.yaml), one run after the
# other: CoT from scratch, COCONUT's latent stages on CoT's epoch 8, no-CoT from scratch.
# A run resumes exactly from its last checkpoint_<E> when interrupted: rerun the same command
# (a finished run is not trained again). Extra --set options apply to every run named.
# Usage: scripts/train_prosqa.sh [coconut|cot|no_cot ...] [-- --set key=value ...]
# Model selection uses the official ProsQA validation split when ../shared/data holds it,
# else the configs' generator split (seed 4242).
set -euo pipefail
cd "$(dirname "$0")/.."
engine=.venv/bin/engine
[ -x "$engine" ] || scripts/setup.sh
methods=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do methods+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#methods[@]} -gt 0 ] || methods=(cot coconut no_cot)   # COCONUT starts from CoT's epoch 8
extra=()
official=../shared/data/prosqa_valid.json
[ -f "$official" ] && extra+=(--set "val_path=$official")
for m in "${methods[@]}"; do
  mkdir -p runs/prosqa
  echo "training prosqa_$m (log: runs/prosqa/prosqa_$m.log)"
  "$engine" train "configs/prosqa_$m.yaml" "${extra[@]}" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$" >> "runs/prosqa/prosqa_$m.log" || true
done
