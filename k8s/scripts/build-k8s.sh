#!/usr/bin/env bash
# Build Kubernetes binaries of one version from the Go module proxy, cached by version.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces the k8s.io/* staging
# modules with local paths. So we generate a small throwaway module that requires
# k8s.io/kubernetes vX.Y.Z and replaces every staging module with its published
# k8s.io/<name> v0.Y.Z, then `go build` the cmd/ packages from there.
#
# Usage: build-k8s.sh VERSION [CMD...]   (default CMDs: all seven below)
# Prints nothing but progress on stderr; binaries land in $FANOUT_CACHE/k8s/VERSION/bin.
set -euo pipefail

version=${1:?usage: build-k8s.sh vX.Y.Z [cmd...]}
shift
cmds=("$@")
[ ${#cmds[@]} -gt 0 ] || cmds=(kubeadm kubelet kubectl kube-apiserver kube-controller-manager kube-scheduler kube-proxy)

cache=${FANOUT_CACHE:-$HOME/.cache/fanout}
out="$cache/k8s/$version/bin"
go=$("$(cd "$(dirname "$0")" && pwd)/ensure-go.sh")
export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
export CGO_ENABLED=0

missing=()
for c in "${cmds[@]}"; do [ -x "$out/$c" ] || missing+=("$c"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "k8s $version: ${cmds[*]} cached in $out" >&2
  exit 0
fi

staging_version="v0.${version#v1.}"          # v1.33.13 -> v0.33.13
major=1
minor=$(echo "$version" | cut -d. -f2)
work="$cache/k8s/$version/module"
mkdir -p "$work" "$out"

if [ ! -f "$work/go.mod" ]; then
  echo "k8s $version: preparing build module in $work" >&2
  "$go" mod download -json "k8s.io/kubernetes@$version" >/dev/null
  upstream_mod="$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/$version.mod"
  {
    echo "module fanout.local/k8s-build"
    echo
    grep -E '^go ' "$upstream_mod"
    grep -E '^godebug ' "$upstream_mod" || true
    echo
    echo "require k8s.io/kubernetes $version"
    echo
    echo "replace ("
    # every "k8s.io/<name> => ./staging/src/k8s.io/<name>" becomes the published module
    sed -n -E 's#^[[:space:]]*(k8s\.io/[a-z0-9-]+) => \./staging/src/k8s\.io/[a-z0-9-]+$#\t\1 => \1 '"$staging_version"'#p' "$upstream_mod"
    echo ")"
  } > "$work/go.mod.tmp"
  mv "$work/go.mod.tmp" "$work/go.mod"
fi

# Stamp the version, or kubeadm sees v0.0.0-master and refuses to work.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

pkgs=()
for c in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
echo "k8s $version: building ${missing[*]} (this is the slow part on a cold cache)" >&2
cd "$work"
# -mod=mod lets go fill in go.sum (verified against sum.golang.org) on first use.
nice -n 15 "$go" build -mod=mod -trimpath -ldflags "$ldflags" -o "$out/" "${pkgs[@]}"
echo "k8s $version: done -> $out" >&2
