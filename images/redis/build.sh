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
official_or_debian_build redis "$tag" "$hash" "$base"
