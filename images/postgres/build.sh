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
official_or_debian_build postgres "$tag" "$hash" "$base"
