#!/usr/bin/env bash
# Rebuild the bundled default model (models/prosqa-coconut) from nothing: train the ProsQA CPU
# recipe (CoT, then COCONUT on its epoch 8, then the no-CoT baseline; scripts/train_prosqa.sh,
# each run resumes exactly when interrupted), copy COCONUT's last checkpoint with its stop
# classifier, write the held-out test split and measure every method on it and on the official
# validation split (when ../shared/data has it).
# Usage: scripts/build_prosqa_model.sh [RUNS_DIR [OUT_DIR]]   (default runs/prosqa, the bundled model)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/prosqa}
out=${2:-models/prosqa-coconut}
engine=$PWD/.venv/bin/engine
[ -x "$engine" ] || scripts/setup.sh
scripts/train_prosqa.sh cot -- --set save_path="$runs"
scripts/train_prosqa.sh coconut -- --set save_path="$runs" --set load_model_path="$runs/prosqa_cot/checkpoint_8"
scripts/train_prosqa.sh no_cot -- --set save_path="$runs"

last=$(ls -d "$runs"/prosqa_coconut/checkpoint_* | sort -V | tail -1)
rm -rf "$out" && mkdir -p "$out"
cp "$last"/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,coconut.json} "$out"/
cp "$last"/stop_classifier.safetensors "$out"/ 2>/dev/null || true
cp "$runs"/prosqa_coconut/{metrics.jsonl,metrics.png} "$out"/
# held out: 1,000 questions of the published distribution from a seed no epoch uses
"$engine" data prosqa --size full --n 1000 --seed 20261201 --out "$out/test.json"
(cd "$out" && "$engine" eval --model . --data test.json --max-tokens 24 --json > eval.json)
official=../shared/data/prosqa_valid.json
mkdir -p docs/recipe/prosqa
for m in coconut cot no_cot; do
  model="$runs/prosqa_$m/best"; [ "$m" = coconut ] && model="$out"
  "$engine" eval --model "$model" --data "$out/test.json" --max-tokens 24 --json > "docs/recipe/prosqa/eval_${m}_test.json"
  if [ -f "$official" ]; then
    "$engine" eval --model "$model" --data "$official" --max-tokens 24 --json > "docs/recipe/prosqa/eval_${m}_official.json"
  fi
done
cat "$out/eval.json"
