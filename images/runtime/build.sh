#!/usr/bin/env bash
# Build the fanout runtime image, tagged by a content hash of its inputs; skip when an image
# with that tag exists already.
#
# Usage: images/runtime/build.sh [--print-tag]     (run from anywhere; uses the repo root)
#   REPOSITORY (default fanout/runtime), BASE_IMAGE (default python:3.11-slim-bookworm)
#
# The build context is a tar of exactly the inputs below (never .venv, .bin or .git), so the
# hash and the image agree on what went in. Machines whose HTTPS goes through an
# intercepting proxy need its CA to reach PyPI: set BUILD_CA_FILE (default: $PIP_CERT, else
# $SSL_CERT_FILE, if set) and it is used in the build stage only, not in the final image
# and not in the hash.
set -euo pipefail
cd "$(dirname "$0")/../.."

repository=${REPOSITORY:-fanout/runtime}
base=${BASE_IMAGE:-python:3.11-slim-bookworm}
inputs=(flows/pyproject.toml flows/README.md flows/requirements.lock flows/src images/runtime/Dockerfile)

context() { # deterministic tar of the inputs, extra members appended by the caller
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --exclude=__pycache__ \
      --exclude='*.pyc' -c "$@" "${inputs[@]}"
}
hash=$( { context -f -; echo "$base"; } | sha256sum | cut -c1-12)
tag="$repository:$hash"
if [ "${1:-}" = --print-tag ]; then echo "$tag"; exit 0; fi

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "runtime: $tag up to date" >&2; echo "$tag"; exit 0
fi
ca=${BUILD_CA_FILE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/images/runtime/build-ca"
[ -n "$ca" ] && [ -f "$ca" ] && cp "$ca" "$tmp/images/runtime/build-ca/ca.pem"
{ context -f "$tmp/ctx.tar"; tar -C "$tmp" -rf "$tmp/ctx.tar" images/runtime/build-ca; }
echo "runtime: building $tag (base $base)" >&2
start=$(date +%s)
nice -n 10 docker build --network host --build-arg "BASE_IMAGE=$base" \
  --label "fanout.hash=$hash" -f images/runtime/Dockerfile -t "$tag" - <"$tmp/ctx.tar" >&2
echo "runtime: built $tag in $(( $(date +%s) - start ))s, $(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec)" >&2
echo "$tag"
