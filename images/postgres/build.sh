#!/usr/bin/env bash
# Make the PostgreSQL image the chart uses available locally as TAG (default
# postgres:15-bookworm, the official image's name): pull it where a registry answers, else
# build images/postgres/Dockerfile from Debian's packages. A build is labelled with a hash of
# its inputs and skipped when the local image carries that hash already.
#
# Usage: images/postgres/build.sh        TAG=..., BASE_IMAGE=... (debian:bookworm-slim)
set -euo pipefail
cd "$(dirname "$0")/../.."

tag=${TAG:-postgres:15-bookworm}
base=${BASE_IMAGE:-debian:bookworm-slim}
hash=$( { cat images/postgres/Dockerfile images/postgres/docker-entrypoint.sh; echo "$base"; } | sha256sum | cut -c1-12)

# shellcheck source=images/official.sh
. images/official.sh
if official_or_ours "$tag" "$hash" postgres; then echo "$tag"; exit 0; fi
echo "postgres: building $tag from Debian packages (base $base)" >&2
tar -c images/postgres | nice -n 10 docker build --network host --build-arg "BASE_IMAGE=$base" \
  --label "fanout.hash=$hash" -f images/postgres/Dockerfile -t "$tag" - >&2
echo "$tag"
