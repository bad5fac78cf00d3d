#!/usr/bin/env bash
# Print the path of a Go toolchain new enough to build our pinned Kubernetes, kind and helm;
# fetch one when the machine has none.
#
# Usage: go=$(k8s/scripts/ensure-go.sh)       (GO=/path/to/go skips the search)
#
# Our machines have Go preinstalled; a clean one may not. The Go module proxy (reachable
# where release hosts are not) serves official toolchains as modules
# (golang.org/toolchain@v0.0.1-goX.Y.Z.<os>-<arch>), the same way `GOTOOLCHAIN` fetches
# them, so we download that zip once into $FANOUT_CACHE.
set -euo pipefail

min=${GO_MIN_VERSION:-1.24}
pinned=${GO_TOOLCHAIN_VERSION:-1.24.13}
cache=${FANOUT_CACHE:-$HOME/.cache/fanout}
proxy=${GOPROXY:-https://proxy.golang.org}; proxy=${proxy%%,*}

new_enough() { # go binary
  local v
  v=$("$1" env GOVERSION 2>/dev/null) || return 1   # e.g. go1.26.8
  v=${v#go}
  [ "$(printf '%s\n%s\n' "$min" "$v" | sort -V | head -1)" = "$min" ]
}

for cand in "${GO:-}" "$(command -v go || true)" /usr/local/go/bin/go "$cache/go-toolchain/go$pinned/bin/go"; do
  if [ -n "$cand" ] && [ -x "$cand" ] && new_enough "$cand"; then echo "$cand"; exit 0; fi
done

dest="$cache/go-toolchain/go$pinned"
echo "go: no Go >= $min here; fetching go$pinned from $proxy" >&2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
curl -fsSL --retry 3 -o "$tmp/go.zip" "$proxy/golang.org/toolchain/@v/v0.0.1-go$pinned.linux-amd64.zip"
python3 -m zipfile -e "$tmp/go.zip" "$tmp/x"
# The module zip holds golang.org/toolchain@.../{bin,pkg,src,...}: that directory is GOROOT.
root=$(dirname "$(dirname "$(find "$tmp/x" -path '*/bin/go' -type f | head -1)")")
chmod -R u+w,a+rX "$root"; find "$root/bin" "$root/pkg/tool" -type f -exec chmod a+x {} +
mkdir -p "$(dirname "$dest")"; rm -rf "$dest"; mv "$root" "$dest"
new_enough "$dest/bin/go" || { echo "go: fetched toolchain does not run" >&2; exit 1; }
echo "$dest/bin/go"
