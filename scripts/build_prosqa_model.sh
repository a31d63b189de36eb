#!/usr/bin/env bash
# Rebuild the bundled default model (models/prosqa-coconut): train the ProsQA CPU recipe
# (scripts/train_prosqa.sh: COCONUT, CoT and no-CoT, each from the bundled linear-chain model;
# each run resumes exactly when interrupted), copy COCONUT's last checkpoint with its stop
# classifier, write the held-out test split, and measure every method on it and on the
# official validation split (when ../shared/data has it): docs/recipe/prosqa/.
# Usage: scripts/build_prosqa_model.sh [--no-train] [OUT_DIR]   (default: models/prosqa-coconut)
set -euo pipefail
cd "$(dirname "$0")/.."
train=1
if [ "${1:-}" = "--no-train" ]; then train=0; shift; fi
out=${1:-models/prosqa-coconut}
runs=runs/prosqa
engine=$PWD/.venv/bin/engine
[ -x "$engine" ] || scripts/setup.sh
[ "$train" = 1 ] && scripts/train_prosqa.sh coconut cot no_cot

last=$(ls -d "$runs"/prosqa_coconut/checkpoint_* | sort -V | tail -1)
mkdir -p "$out" && find "$out" -mindepth 1 ! -name README.md -delete   # the README is written by hand
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
  [ -f "$official" ] && "$engine" eval --model "$model" --data "$official" --max-tokens 24 --json \
      > "docs/recipe/prosqa/eval_${m}_official.json"
  cp "$runs/prosqa_$m/metrics.jsonl" "docs/recipe/prosqa/${m}_metrics.jsonl"
done
"$engine" eval --model "$out" --data models/prosqa-linear-coconut/test.json --max-tokens 24 --json \
    > docs/recipe/prosqa/eval_coconut_linear_test.json
.venv/bin/python -m engine.train.eval_plot docs/recipe/prosqa/eval_test.png \
    COCONUT=docs/recipe/prosqa/eval_coconut_test.json CoT=docs/recipe/prosqa/eval_cot_test.json \
    no-CoT=docs/recipe/prosqa/eval_no_cot_test.json --title "ProsQA, 1,000 held-out questions"
.venv/bin/python -m engine.train.compare --run "COCONUT=$runs/prosqa_coconut" --run "CoT=$runs/prosqa_cot" \
    --run "no-CoT=$runs/prosqa_no_cot" --out docs/recipe/prosqa/comparison.png
cat "$out/eval.json"
