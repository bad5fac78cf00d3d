#!/usr/bin/env bash
# Make the Redis image the chart uses available locally as TAG (default
# redis:7.0.15-bookworm, the official image's name): pull it where a registry answers, else
# build images/redis/Dockerfile from Debian's packages. A build is labelled with a hash of
# its inputs and skipped when the local image carries that hash already.
#
# Usage: images/redis/build.sh        TAG=..., BASE_IMAGE=... (debian:bookworm-slim)
set -euo pipefail
cd "$(dirname "$0")/../.."

tag=${TAG:-redis:7.0.15-bookworm}
base=${BASE_IMAGE:-debian:bookworm-slim}
hash=$( { cat images/redis/Dockerfile; echo "$base"; } | sha256sum | cut -c1-12)

# shellcheck source=images/official.sh
. images/official.sh
if official_or_ours "$tag" "$hash" redis; then echo "$tag"; exit 0; fi
echo "redis: building $tag from Debian packages (base $base)" >&2
tar -c images/redis | nice -n 10 docker build --network host --build-arg "BASE_IMAGE=$base" \
  --label "fanout.hash=$hash" -f images/redis/Dockerfile -t "$tag" - >&2
echo "$tag"
