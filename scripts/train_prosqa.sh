#!/usr/bin/env bash
# Train the ProsQA CPU recipes into runs/prosqa/prosqa_<run>/ (one run after the other):
# `superposition_small` (configs/prosqa_superposition_small.yaml: COCONUT from scratch on
# 10-node graphs with symbols, frontier targets and teacher-forced thoughts, 12 min);
# `superposition` (configs/prosqa_superposition.yaml: that model continued on the full
# mixture with 7 thoughts); `superposition_wide` (configs/prosqa_superposition_wide.yaml: that
# run's best model widened to d=256, 8 heads, by `engine widen`, function-preserving, then
# trained on: the bundled model's run); `superposition_cot`, `superposition_no_cot` and
# `superposition_wide_cot`, `superposition_wide_no_cot` (the baselines at d=128 and d=256,
# from the 10-node model, widened for the latter); and the first, curriculum recipe
# (configs/prosqa_{cot,coconut,no_cot}.yaml, from the bundled linear-chain model), run when
# no run is named.
# A run that starts from another run's best checkpoint (superposition*, from
# superposition_small; superposition_wide, from superposition) has that run trained first
# when its best/ is missing (without the extra --set options; name it to pass them).
# A run resumes exactly from the newest checkpoint_<E> of its run directory when interrupted:
# rerun the same command (a finished run is not trained again; --set num_epochs=N trains a
# finished one further). Nothing is resumed from the repository: docs/training.md,
# "Rebuilding the bundled model, and resuming a run".
# Extra --set options apply to every run named.
# Usage: scripts/train_prosqa.sh [coconut|cot|no_cot|superposition_small|superposition|superposition_wide|superposition_cot|superposition_no_cot|superposition_wide_cot|superposition_wide_no_cot ...] [-- --set key=value ...]
# Model selection uses the official ProsQA validation split when ../shared/data holds it,
# else the configs' generator split (seed 4242).
set -euo pipefail
cd "$(dirname "$0")/.."
engine=.venv/bin/engine
[ -x "$engine" ] || scripts/setup.sh
methods=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do methods+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#methods[@]} -gt 0 ] || methods=(coconut cot no_cot)
# Every method starts from the bundled linear-chain model, with room for longer prompts
# (max_position_embeddings 512; rotary positions, so nothing else changes).
init=runs/prosqa/linear_init
if [ ! -f "$init/model.safetensors" ]; then
  mkdir -p "$init"
  cp models/prosqa-linear-coconut/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,coconut.json} "$init"/
  .venv/bin/python - "$init/config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["max_position_embeddings"] = 512
json.dump(config, open(sys.argv[1], "w"), indent=2)
PY
fi
extra=()
# bf16 autocast is 6x slower than float32 on a CPU without bf16 instructions (superposition_wide
# on an Ice Lake Xeon: 9 against 52 samples/s; with AMX, bf16 ran it at 72): float32 there
# (a later --set bf16=true still wins)
if [ -r /proc/cpuinfo ] && ! grep -qE "avx512_bf16|amx_bf16" /proc/cpuinfo; then
  echo "this CPU has no bf16 instructions: training in float32 (--set bf16=false)"
  extra+=(--set bf16=false)
fi
official=../shared/data/prosqa_valid.json
[ -f "$official" ] && extra+=(--set "val_path=$official")
mkdir -p runs/prosqa

# the run whose best checkpoint a run starts from (none: from scratch or a bundled model)
start_of() {
  case "$1" in
    superposition|superposition_cot|superposition_no_cot|superposition_wide_cot|superposition_wide_no_cot)
      echo superposition_small ;;
    superposition_wide) echo superposition ;;
  esac
}

train() {   # train (or resume) one run; extra arguments go to `engine train`
  local m=$1; shift
  # superposition_wide starts from the superposition run's best model widened (seed 0: the
  # same bytes from the same best/); only used when no checkpoint of the run exists.
  local wide_init=runs/prosqa/superposition_wide_init
  if [ "$m" = superposition_wide ] && [ ! -f "$wide_init/model.safetensors" ]; then
    "$engine" widen --from runs/prosqa/prosqa_superposition/best --out "$wide_init" \
      --hidden-size 256 --heads 8 --intermediate-size 1024 --noise 1e-5 --seed 0
  fi
  # superposition_wide_cot / _no_cot (the baselines at that width) start from the 10-node model
  # the d=128 baselines started from, widened the same way
  local small_wide_init=runs/prosqa/superposition_small_wide_init
  if [[ "$m" = superposition_wide_cot || "$m" = superposition_wide_no_cot ]] && [ ! -f "$small_wide_init/model.safetensors" ]; then
    "$engine" widen --from runs/prosqa/prosqa_superposition_small/best --out "$small_wide_init" \
      --hidden-size 256 --heads 8 --intermediate-size 1024 --noise 1e-5 --seed 0
  fi
  echo "training prosqa_$m (log: runs/prosqa/prosqa_$m.log)"
  "$engine" train "configs/prosqa_$m.yaml" "${extra[@]}" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$" >> "runs/prosqa/prosqa_$m.log" || true
}

needs() {   # the runs $1 starts from, trained first (recursively) while their best/ is missing
  local start
  start=$(start_of "$1")
  [ -n "$start" ] || return 0
  if [ ! -f "runs/prosqa/prosqa_$start/best/model.safetensors" ]; then
    needs "$start"
    echo "prosqa_$1 starts from prosqa_$start/best, which is missing: training prosqa_$start first"
    train "$start"
  fi
}

for m in "${methods[@]}"; do
  needs "$m"
  train "$m" "$@"
done
