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

# shellcheck source=images/official.sh
. images/official.sh
if official_or_ours "$tag" "$hash" versitygw; then echo "$tag"; exit 0; fi
echo "versitygw: building $tag from the pinned binary (base $base)" >&2
ctx=$(mktemp -d); trap 'rm -rf "$ctx"' EXIT
k8s/scripts/install-tools.sh "$ctx" "versitygw=$version"
cp images/versitygw/Dockerfile "$ctx/"
nice -n 10 docker build --build-arg "BASE_IMAGE=$base" --label "fanout.hash=$hash" -t "$tag" "$ctx" >&2
echo "$tag"
