#!/usr/bin/env bash
# Build a small main module of ours (go.mod + main.go in DIR) into a static binary,
# cached by the content hash of DIR.
#
# Usage: build-go-main.sh DIR NAME   -> prints the path of the built binary on stdout
set -euo pipefail

src=$(cd "${1:?usage: build-go-main.sh DIR NAME}" && pwd)
name=${2:?usage: build-go-main.sh DIR NAME}
cache=${FANOUT_CACHE:-$HOME/.cache/fanout}
go=$("$(cd "$(dirname "$0")" && pwd)/ensure-go.sh")
export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
export CGO_ENABLED=0

hash=$(cd "$src" && cat go.mod ./*.go | sha256sum | cut -c1-12)
out="$cache/bin/$name-$hash"
if [ ! -x "$out" ]; then
  # Build in a copy so go.sum (filled in and checked against sum.golang.org) stays out of the repo.
  work="$cache/modules/$name-$hash"
  mkdir -p "$work" "$cache/bin"
  cp "$src"/go.mod "$src"/*.go "$work/"
  echo "go: building $name from $src (cold cache: a few minutes)" >&2
  (cd "$work" && nice -n 15 "$go" build -mod=mod -trimpath -ldflags "-s -w" -o "$out.tmp" .)
  mv "$out.tmp" "$out"
fi
echo "$out"
