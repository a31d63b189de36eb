#!/usr/bin/env bash
# Train the ProsQA CPU recipe (configs/prosqa_{cot,coconut,no_cot}.yaml), one run after the
# other, each from the bundled linear-chain model (a curriculum of graph sizes); and
# `superposition` (configs/prosqa_superposition.yaml: COCONUT from scratch with symbols,
# frontier targets and teacher-forced thoughts); `superposition_wide`
# (configs/prosqa_superposition_wide.yaml: that run's best model widened to d=256, 8 heads, by
# `engine widen`, function-preserving, then trained on); `superposition_wide_cot` and
# `superposition_wide_no_cot` (its baselines at d=256, from the 10-node model widened). Not
# named: coconut, cot and no_cot.
# A run resumes exactly from its last checkpoint_<E> when interrupted: rerun the same command
# (a finished run is not trained again; --set num_epochs=N trains a finished one further).
# Extra --set options apply to every run named.
# Usage: scripts/train_prosqa.sh [coconut|cot|no_cot|superposition|superposition_wide|superposition_wide_cot|superposition_wide_no_cot ...] [-- --set key=value ...]
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
for m in "${methods[@]}"; do
  mkdir -p runs/prosqa
  # A run committed to the repository (checkpoints/prosqa/<run>: its last checkpoint with the
  # optimizer state, metrics and config) continues from there on a fresh clone.
  if [ -d "checkpoints/prosqa/prosqa_$m" ] && ! ls -d "runs/prosqa/prosqa_$m"/checkpoint_* >/dev/null 2>&1; then
    mkdir -p "runs/prosqa/prosqa_$m" && cp -r "checkpoints/prosqa/prosqa_$m"/. "runs/prosqa/prosqa_$m"/
    echo "continuing prosqa_$m from checkpoints/prosqa/prosqa_$m"
  fi
  # superposition_wide starts from the superposition run's best model widened (seed 0: the same
  # bytes on every clone); only used when no checkpoint of the run exists.
  wide_init=runs/prosqa/superposition_wide_init
  if [ "$m" = superposition_wide ] && [ ! -f "$wide_init/model.safetensors" ]; then
    "$engine" widen --from checkpoints/prosqa/prosqa_superposition/best --out "$wide_init" \
      --hidden-size 256 --heads 8 --intermediate-size 1024 --noise 1e-5 --seed 0
  fi
  # superposition_wide_cot / _no_cot (the baselines at that width) start from the 10-node model
  # the d=128 baselines started from, widened the same way
  small_wide_init=runs/prosqa/superposition_small_wide_init
  if [[ "$m" = superposition_wide_cot || "$m" = superposition_wide_no_cot ]] && [ ! -f "$small_wide_init/model.safetensors" ]; then
    "$engine" widen --from checkpoints/prosqa/prosqa_superposition_small/best --out "$small_wide_init" \
      --hidden-size 256 --heads 8 --intermediate-size 1024 --noise 1e-5 --seed 0
  fi
  echo "training prosqa_$m (log: runs/prosqa/prosqa_$m.log)"
  "$engine" train "configs/prosqa_$m.yaml" "${extra[@]}" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$" >> "runs/prosqa/prosqa_$m.log" || true
done
