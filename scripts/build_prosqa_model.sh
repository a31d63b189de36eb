#!/usr/bin/env bash
# Rebuild the bundled default model (models/prosqa-coconut) from the superposition recipe:
# train COCONUT at 128 wide, then widened to 256 (superposition_wide, from the first run's
# best), and the CoT and no-CoT baselines at both widths (scripts/train_prosqa.sh superposition
# superposition_wide superposition_cot superposition_no_cot superposition_wide_cot
# superposition_wide_no_cot: the 10-node model they start from is trained first
# when runs/prosqa holds none; each resumes exactly from its run directory when interrupted;
# nothing is resumed from the repository), copy the
# 256-wide run's best checkpoint (model selection on the official validation split when
# ../shared/data has it), write the held-out test split, and measure every run on it and on
# the official split: docs/recipe/prosqa/ (a run without a best checkpoint is skipped).
# Usage: scripts/build_prosqa_model.sh [--no-train] [OUT_DIR]   (default: models/prosqa-coconut)
set -euo pipefail
cd "$(dirname "$0")/.."
train=1
if [ "${1:-}" = "--no-train" ]; then train=0; shift; fi
out=${1:-models/prosqa-coconut}
runs=runs/prosqa
engine=$PWD/.venv/bin/engine
[ -x "$engine" ] || scripts/setup.sh
[ "$train" = 1 ] && scripts/train_prosqa.sh superposition superposition_wide superposition_cot superposition_no_cot \
    superposition_wide_cot superposition_wide_no_cot

best=$runs/prosqa_superposition_wide/best
mkdir -p "$out" && find "$out" -mindepth 1 ! -name README.md -delete   # the README is written by hand
cp "$best"/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,coconut.json} "$out"/
cp "$runs"/prosqa_superposition_wide/{metrics.jsonl,metrics.png} "$out"/
# held out: 1,000 questions of the published distribution from a seed no epoch uses
"$engine" data prosqa --size full --n 1000 --seed 20261201 --out "$out/test.json"
(cd "$out" && "$engine" eval --model . --data test.json --max-tokens 24 --json > eval.json)
official=../shared/data/prosqa_valid.json
docs=docs/recipe/prosqa
mkdir -p "$docs"
for m in superposition_wide superposition superposition_cot superposition_no_cot superposition_wide_cot superposition_wide_no_cot; do
  model="$runs/prosqa_$m/best"; [ "$m" = superposition_wide ] && model="$out"
  [ -f "$model/model.safetensors" ] || { echo "skipping $m: no $model"; continue; }
  "$engine" eval --model "$model" --data "$out/test.json" --max-tokens 24 --json > "$docs/eval_${m}_heldout.json"
  [ -f "$official" ] && "$engine" eval --model "$model" --data "$official" --max-tokens 24 --json \
      > "$docs/eval_${m}_official.json"
  "$engine" eval --model "$model" --data "prosqa:full?n=300&min_hops=6&max_hops=6" --seed 99991 --max-tokens 24 \
      --json > "$docs/eval_${m}_sixhop.json"
  cp "$runs/prosqa_$m/metrics.jsonl" "$docs/${m}_metrics.jsonl"
done
.venv/bin/python -m engine.train.eval_plot "$docs/eval_superposition_heldout.png" \
    "COCONUT 256 wide (bundled)=$docs/eval_superposition_wide_heldout.json" \
    "COCONUT 128 wide=$docs/eval_superposition_heldout.json" "CoT 256 wide=$docs/eval_superposition_wide_cot_heldout.json" \
    "no-CoT 256 wide=$docs/eval_superposition_wide_no_cot_heldout.json" --title "ProsQA, 1,000 held-out questions"
.venv/bin/python -m engine.train.compare --run "COCONUT 128 wide=$runs/prosqa_superposition" \
    --run "COCONUT 256 wide (bundled)=$runs/prosqa_superposition_wide@COCONUT 128 wide:70" \
    --run "CoT 128 wide=$runs/prosqa_superposition_cot" --run "no-CoT 128 wide=$runs/prosqa_superposition_no_cot" \
    --run "CoT 256 wide=$runs/prosqa_superposition_wide_cot" --run "no-CoT 256 wide=$runs/prosqa_superposition_wide_no_cot" \
    --out "$docs/superposition_comparison.png" --title "ProsQA, the superposition recipe"
.venv/bin/python -m engine.train.compare --run "COCONUT 128 wide=$runs/prosqa_superposition" \
    --run "COCONUT 256 wide (bundled)=$runs/prosqa_superposition_wide@COCONUT 128 wide:70" \
    --run "CoT 128 wide=$runs/prosqa_superposition_cot" --run "no-CoT 128 wide=$runs/prosqa_superposition_no_cot" \
    --run "CoT 256 wide=$runs/prosqa_superposition_wide_cot" --run "no-CoT 256 wide=$runs/prosqa_superposition_wide_no_cot" --x samples \
    --out "$docs/superposition_comparison_samples.png" --title "ProsQA, the superposition recipe, against samples"
cat "$out/eval.json"
