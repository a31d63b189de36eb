#!/usr/bin/env bash
# The fast path's figures on a GPU, as one prepared run (sized for one 10-minute device call;
# not yet run on a GPU: rehearsed on CPU only).
#
#   scripts/gpu_bench.sh fetch            # here, with PyPI: wheels the GPU image lacks -> .whl/
#   scripts/gpu_bench.sh run OUTDIR       # there, from the repository root (carry .whl)
#
# On the lent device: run(command="scripts/gpu_bench.sh run /tmp/gb && cp /tmp/gb.tgz $OUT/",
# carry=[".whl"], timeout_s=600).
#
# `run` installs the carried wheels into /tmp/site (no network needed), then writes JSON and
# plots into OUTDIR: `engine bench latency` (bf16 and fp32, the compiled step with CUDA graphs,
# against the bare forward and Hugging Face generate), `engine bench churn`, `engine bench
# arrivals`, and the bundled model over HTTP (`engine bench serve`, in-process engine and
# --engine-process). GPU_BENCH_DEVICE=cpu GPU_BENCH_QUICK=1 rehearses it on a CPU with tiny
# models (what CI-less machines can check before spending device time).
set -euo pipefail
cd "$(dirname "$0")/.."

# what the GPU image lacks (or has too old), at the versions this checkout's .venv runs
NEEDED='^(pydantic|pydantic[-_]core|pydantic[-_]settings|annotated[-_]types|typing[-_]inspection|python[-_]dotenv|fastapi|starlette|uvicorn|transformers|huggingface[-_]hub|annotated[-_]doc)=='

case "${1:-}" in
fetch)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    wheels=$(.venv/bin/python -m pip freeze | grep -iE "$NEEDED")
    # shellcheck disable=SC2086
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $wheels
    ls .whl
    ;;
run)
    out=${2:?usage: scripts/gpu_bench.sh run OUTDIR}
    mkdir -p "$out"
    # the wheels are for the GPU image's Python 3.12 (a rehearsal elsewhere uses its own packages)
    if compgen -G ".whl/*.whl" > /dev/null && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    device=${GPU_BENCH_DEVICE:-cuda}
    small=()
    if [[ -n "${GPU_BENCH_QUICK:-}" ]]; then
        small=(--hidden 64 --layers 2 --heads 2 --vocab 400)
    fi
    bench() { python3 -m engine.cli bench "$@"; }
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    if [[ -n "${GPU_BENCH_QUICK:-}" ]]; then
        lat=(--batch 4 --prompt-tokens 40 --thoughts 2 --max-tokens 3 --rounds 1 --reference-questions 1)
        churn=(--rows 3 --prompt-tokens 40 --join-tokens 8 --cycles 2)
        arrivals=(--concurrency 4 --num-requests 8 --prompt-tokens 30 --max-tokens 4 --budgets 0,16 --rounds 1)
        serve=(--concurrency 4 --num-prompts 8)
    else
        lat=(--batch 32 --rounds 2 --reference-questions 1)
        churn=()
        arrivals=(--budgets 0,2048,512,256)
        serve=(--concurrency 1,8,32,64 --num-prompts 512)
    fi
    for dtype in bfloat16 float32; do
        bench latency --device "$device" --dtype "$dtype" --compile --hf-generate "${small[@]}" "${lat[@]}" \
            --json --plot "$out/latency_${dtype}.png" > "$out/latency_${dtype}.json"
    done
    bench churn --device "$device" "${small[@]}" "${churn[@]}" --json --plot "$out/churn.png" > "$out/churn.json"
    bench arrivals --device "$device" "${small[@]}" "${arrivals[@]}" --json --plot "$out/arrivals.png" \
        > "$out/arrivals.json"
    for mode in no-engine-process engine-process; do
        port=$((8100 + RANDOM % 500))
        python3 -m engine.cli serve --device "$device" --max-batch-size 64 --port "$port" "--$mode" \
            > "$out/serve_${mode}.log" 2>&1 &
        server=$!
        for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/ready" > /dev/null && break; sleep 1; done
        bench serve --url "http://127.0.0.1:$port" "${serve[@]}" --json > "$out/serve_${mode}.json" || true
        kill "$server"; wait "$server" || true
    done
    ls -l "$out"
    tar -czf "$out.tgz" -C "$out" . && echo "wrote $out.tgz"   # one file: the device returns at most 8
    ;;
*)
    sed -n 2,13p "$0"
    exit 2
    ;;
esac
