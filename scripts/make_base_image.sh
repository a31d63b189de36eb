#!/usr/bin/env bash
# Build a Debian bookworm base image for docker/Dockerfile from Debian's own packages, for
# machines that reach a Debian mirror (and PyPI) but no container registry.
#
#   scripts/make_base_image.sh [TAG] [--ca-cert FILE]...   (as root; needs debootstrap, docker)
#
# TAG defaults to coconut-base:bookworm. The image holds python3 (3.11), python3-venv and
# ca-certificates, nothing else (debootstrap's minbase variant). Each --ca-cert FILE (a PEM
# certificate, e.g. a TLS-intercepting proxy's CA the host trusts) is added to the image's
# trust store, and the image then sets PIP_CERT to that store: pip in the build (and in the
# image) trusts what the host trusts. Then:
#
#   docker build --network host --build-arg BASE_IMAGE=coconut-base:bookworm -f docker/Dockerfile .
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), SUITE (bookworm).
set -euo pipefail
TAG=coconut-base:bookworm
CERTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ca-cert) CERTS+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) TAG=$1; shift ;;
  esac
done
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install debootstrap docker.io)" >&2; exit 2; }
done
for cert in "${CERTS[@]}"; do
  [ -r "$cert" ] || { echo "--ca-cert $cert: not a readable file" >&2; exit 2; }
done
ROOT=$(mktemp -d /tmp/coconut-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
start=$(date +%s)
echo "debootstrap $SUITE from $MIRROR into $ROOT"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOT" "$MIRROR" \
  > "$ROOT.log" 2>&1 || { tail -20 "$ROOT.log" >&2; exit 1; }
rm -f "$ROOT.log"
changes=()
if [ ${#CERTS[@]} -gt 0 ]; then
  for cert in "${CERTS[@]}"; do
    cp "$cert" "$ROOT/usr/local/share/ca-certificates/$(basename "${cert%.*}").crt"
  done
  chroot "$ROOT" update-ca-certificates >/dev/null
  changes+=(--change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
fi
# what a container does not need: the package lists and caches, docs and man pages
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
  "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*
tar -C "$ROOT" -c . | docker import "${changes[@]}" --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "built $TAG in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
