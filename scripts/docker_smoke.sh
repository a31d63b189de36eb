#!/usr/bin/env bash
# Build the CPU image (and its Ray variant), run it, and check it as an operator would.
#
#   scripts/docker_smoke.sh              (from anywhere; needs docker, curl, python3)
#
# For each variant (SMOKE_VARIANTS, default "cpu ray"; ray = --build-arg SETUP_FLAGS=--ray):
#   1. docker build -f docker/Dockerfile (the build on the host network), timed;
#   2. docker run, then wait for Docker's health status "healthy" (probed every 2 s here:
#      the image's own interval is 30 s), timed from `docker run`;
#   3. POST /v1/reason with the README's question: the answer must be the question's truth
#      ("Gabriel is a screrpus.": Gabriel -> pilpus -> grulpus -> screrpus);
#   4. the server runs as a user that is not root (PID 1's uid, and the image's USER);
#   5. the ray variant imports ray and server.ray_serve;
#   6. SIGTERM with a streamed request in flight: the stream completes ([DONE], all its
#      tokens) and the container exits 0;
#   7. prints the image size, the build time and the time to healthy.
# Exits non-zero at the first failed check; containers are removed on exit, images kept.
#
# Without a registry, give a local base image and, if torch's CPU index cannot be reached,
# a folder holding the CPU torch wheel (docker/README.md, "Without a container registry"):
#   BASE_IMAGE=coconut-base:bookworm WHEELS_DIR=/opt/wheels scripts/docker_smoke.sh
#
# Environment: BASE_IMAGE (--build-arg BASE_IMAGE; default: the Dockerfile's),
# WHEELS_DIR (served on 127.0.0.1 to the build as pip's --find-links),
# SMOKE_BUILD_ARGS (more `docker build` arguments, word-split), SMOKE_VARIANTS,
# SMOKE_TAG (image name, default coconut-serve; tags :smoke-cpu, :smoke-cpu-ray),
# SMOKE_HEALTHY_TIMEOUT_S (default 180).
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANTS=${SMOKE_VARIANTS:-cpu ray}
TAG=${SMOKE_TAG:-coconut-serve}
HEALTHY_TIMEOUT_S=${SMOKE_HEALTHY_TIMEOUT_S:-180}
QUESTION="Sally is a kirpus. Every kirpus is a sumpus. Gabriel is a pilpus. Every pilpus is a grulpus. Every grulpus is a screrpus. Is Gabriel a sumpus or screrpus?"
EXPECTED="Gabriel is a screrpus."

say() { printf '[smoke %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { say "FAIL: $*"; exit 1; }
for tool in docker curl python3; do
  command -v "$tool" >/dev/null || fail "needs $tool"
done
docker info >/dev/null 2>&1 || fail "no Docker daemon answers (docker info)"

containers=()
server_pid=""
cleanup() {
  for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

build_args=(--network host)
[ -n "${BASE_IMAGE:-}" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ -n "${WHEELS_DIR:-}" ]; then
  [ -d "$WHEELS_DIR" ] || fail "WHEELS_DIR=$WHEELS_DIR is not a folder"
  wheels_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 -m http.server "$wheels_port" --bind 127.0.0.1 --directory "$WHEELS_DIR" >/dev/null 2>&1 &
  server_pid=$!
  build_args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$wheels_port/")
  say "serving $WHEELS_DIR to the build as pip's find-links (http://127.0.0.1:$wheels_port/)"
fi
# shellcheck disable=SC2206
[ -n "${SMOKE_BUILD_ARGS:-}" ] && build_args+=(${SMOKE_BUILD_ARGS})

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

smoke() {  # $1: cpu | ray
  local variant=$1 image name port flags=() run_flags=() t0 t1 build_s healthy_s status
  case "$variant" in
    cpu) image="$TAG:smoke-cpu" ;;
    ray) image="$TAG:smoke-cpu-ray"; flags=(--build-arg SETUP_FLAGS=--ray); run_flags=(--shm-size=2g) ;;
    *) fail "unknown variant $variant (cpu or ray)" ;;
  esac
  say "[$variant] building $image"
  t0=$(date +%s)
  docker build "${build_args[@]}" "${flags[@]}" -f docker/Dockerfile -t "$image" . > "/tmp/docker-smoke-build-$variant.log" 2>&1 \
    || { tail -30 "/tmp/docker-smoke-build-$variant.log"; fail "[$variant] docker build failed (log: /tmp/docker-smoke-build-$variant.log)"; }
  build_s=$(( $(date +%s) - t0 ))
  grep -E "^(installing torch|no NVIDIA|.*cannot be reached|installed:)" "/tmp/docker-smoke-build-$variant.log" \
    | sed "s/^/[smoke]   build: /" || true
  docker run --rm --entrypoint python "$image" -c "import torch; assert torch.version.cuda is None, torch.version.cuda; print('torch', torch.__version__, '(CPU build)')" \
    | sed "s/^/[smoke]   /" || fail "[$variant] the image's torch is not the CPU build"

  name="coconut-smoke-$variant-$$"
  port=$(free_port)
  t0=$(date +%s.%N)
  docker run -d --name "$name" -p "127.0.0.1:$port:8000" --stop-timeout 60 -e COCONUT_DRAIN_TIMEOUT_S=50 \
    --health-interval 2s "${run_flags[@]}" "$image" >/dev/null
  containers+=("$name")
  while :; do
    status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$name")
    [ "$status" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || { docker logs "$name" | tail -30; fail "[$variant] the container exited"; }
    if python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $t0 > $HEALTHY_TIMEOUT_S else 1)"; then
      docker logs "$name" | tail -30; fail "[$variant] not healthy after ${HEALTHY_TIMEOUT_S}s (status: $status)"
    fi
    sleep 0.5
  done
  t1=$(date +%s.%N)
  healthy_s=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
  say "[$variant] healthy ${healthy_s}s after docker run"

  local body answer
  body=$(python3 -c 'import json, sys; print(json.dumps({"question": sys.argv[1], "max_tokens": 32, "latent": {"mode": "fixed", "thoughts": 7}}))' "$QUESTION")
  answer=$(curl -sf "http://127.0.0.1:$port/v1/reason" -H 'Content-Type: application/json' -d "$body" \
    | python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["answer"]); print(repr(r["text"]), r["finish_reason"], r["usage"], file=sys.stderr)') \
    || fail "[$variant] /v1/reason did not answer 200"
  [ "$answer" = "$EXPECTED" ] || fail "[$variant] /v1/reason answered '$answer', the question's truth is '$EXPECTED'"
  say "[$variant] /v1/reason: \"$answer\" (right)"

  local uid user
  uid=$(docker exec "$name" awk '/^Uid:/ {print $2}' /proc/1/status)
  user=$(docker image inspect -f '{{.Config.User}}' "$image")
  [ "$uid" != 0 ] && [ -n "$user" ] && [ "${user%%:*}" != 0 ] && [ "${user%%:*}" != root ] \
    || fail "[$variant] runs as root (PID 1 uid $uid, USER '$user')"
  say "[$variant] not root: PID 1 runs as uid $uid (USER $user)"

  if [ "$variant" = ray ]; then
    docker exec "$name" python -c "import ray, server.ray_serve; print('ray', ray.__version__)" | sed "s/^/[smoke]   /" \
      || fail "[$variant] ray does not import"
  fi

  # SIGTERM with a streamed request in flight: it must complete, and the container exit 0.
  python3 - "$port" "$name" "$QUESTION" <<'EOF' || fail "[$variant] the in-flight request did not complete after SIGTERM"
import http.client, json, subprocess, sys
port, name, question = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tokens = 360   # within the bundled model's 512 positions (its prompts: ~20-120 tokens, 7 thoughts)
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
conn.request("POST", "/v1/reason", json.dumps({"question": question, "max_tokens": tokens, "ignore_eos": True,
                                               "stream": True}), {"Content-Type": "application/json"})
resp = conn.getresponse()
assert resp.status == 200, resp.status
events, signalled = [], False
for raw in resp:
    line = raw.decode().strip()
    if not line.startswith("data: "):
        continue
    events.append(line[6:])
    if not signalled:
        assert events[-1] != "[DONE]" and json.loads(events[-1])["finish_reason"] is None, "finished before SIGTERM"
        subprocess.run(["docker", "kill", "--signal", "TERM", name], check=True, capture_output=True)
        signalled = True
        after = len(events)
assert events[-1] == "[DONE]", events[-3:]
final = json.loads(events[-2])
assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == tokens, final
print(f"[smoke]   SIGTERM sent with the stream in flight; {len(events) - after} more events, the last "
      f"finish_reason=length with {tokens} tokens, then [DONE]")
EOF
  local code
  code=$(docker wait "$name")
  [ "$code" = 0 ] || { docker logs "$name" | tail -20; fail "[$variant] the container exited $code after SIGTERM"; }
  docker logs "$name" 2>&1 | grep -E "shutting down|server stopped" | tail -2 \
    | python3 -c 'import json, sys; [print("[smoke]   log:", json.loads(l)["message"]) for l in sys.stdin]' || true
  say "[$variant] exited 0 after SIGTERM"
  docker rm "$name" >/dev/null

  local size
  size=$(docker image inspect -f '{{.Size}}' "$image" | python3 -c 'import sys; print(f"{int(sys.stdin.read()) / 1e6:.0f} MB")')
  say "[$variant] PASS: image $image $size, built in ${build_s}s, healthy ${healthy_s}s after docker run"
}

for variant in $VARIANTS; do
  smoke "$variant"
done
say "all passed: $VARIANTS"
