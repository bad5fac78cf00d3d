#!/usr/bin/env bash
# Make the object server image the chart's bundled storage uses available locally as
# versity/versitygw:VERSION (the official image's name): pull it where a registry answers,
# else put the pinned versitygw binary (k8s/scripts/install-tools.sh: release download, else
# the Go module proxy) on debian:bookworm-slim. A build is labelled with a hash of its inputs
# and skipped when the local image carries that hash already. Prints the image name.
#
# Usage: images/versitygw/build.sh VERSION        BASE_IMAGE=... (debian:bookworm-slim)
set -euo pipefail
cd "$(dirname "$0")/../.."

version=${1:?usage: images/versitygw/build.sh VERSION}
tag="versity/versitygw:$version"
base=${BASE_IMAGE:-debian:bookworm-slim}
hash=$( { cat images/versitygw/Dockerfile; echo "$base $version"; } | sha256sum | cut -c1-12)

have=$(docker image inspect -f '{{index .Config.Labels "fanout.hash"}}|{{.Id}}' "$tag" 2>/dev/null || true)
if [ "${have%%|*}" = "$hash" ]; then echo "versitygw: $tag up to date" >&2; echo "$tag"; exit 0; fi
if [ -n "$have" ] && [ "${have%%|*}" = "" ] && [ "${FORCE_BUILD:-0}" != 1 ]; then
  echo "versitygw: using existing $tag (not ours: official or pulled)" >&2; echo "$tag"; exit 0
fi
if [ "${FORCE_BUILD:-0}" != 1 ] && timeout "${PULL_TIMEOUT:-20}" docker pull -q "$tag" >/dev/null 2>&1; then
  echo "versitygw: pulled $tag" >&2; echo "$tag"; exit 0
fi
echo "versitygw: building $tag from the pinned binary (base $base)" >&2
ctx=$(mktemp -d); trap 'rm -rf "$ctx"' EXIT
k8s/scripts/install-tools.sh "$ctx" "versitygw=$version"
cp images/versitygw/Dockerfile "$ctx/"
nice -n 10 docker build --build-arg "BASE_IMAGE=$base" --label "fanout.hash=$hash" -t "$tag" "$ctx" >&2
echo "$tag"
