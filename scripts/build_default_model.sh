#!/usr/bin/env bash
# Rebuild the bundled default model (models/prosqa-linear-coconut) from nothing:
# train CoT (stage 0) and the COCONUT stages with the committed CPU recipe, copy the final
# checkpoint (with its stop classifier), write a held-out test split and measure it.
# About 35 minutes on one CPU core.
# Usage: scripts/build_default_model.sh [RUNS_DIR [OUT_DIR]]  (default runs/recipes, the bundled model)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/recipes}
out=${2:-models/prosqa-linear-coconut}
engine=.venv/bin/engine
[ -x "$engine" ] || scripts/setup.sh

$engine train configs/prosqa_linear_cot.yaml --set save_path="$runs"
$engine train configs/prosqa_linear_coconut.yaml --set save_path="$runs" \
    --set load_model_path="$runs/prosqa_linear_cot/checkpoint_8"

last=$(ls -d "$runs"/prosqa_linear_coconut/checkpoint_* | sort -V | tail -1)
rm -rf "$out" && mkdir -p "$out"
cp "$last"/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,coconut.json} "$out"/
cp "$last"/stop_classifier.safetensors "$out"/ 2>/dev/null || true
cp "$runs"/prosqa_linear_coconut/{metrics.jsonl,metrics.png} "$out"/
# held out: a seed no training epoch or validation split uses, in the natural (reference) wording
$engine data prosqa --size linear --n 500 --seed 20261128 --out "$out/test.json"
(cd "$out" && "$OLDPWD/$engine" eval --model . --data test.json --max-tokens 32 --json > eval.json)
cat "$out/eval.json"
