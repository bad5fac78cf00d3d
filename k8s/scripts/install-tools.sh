#!/usr/bin/env bash
# Put pinned tools (kind, kubectl, helm, kube-score, versitygw) into BIN_DIR, never trusting
# whatever is on PATH.
#
# Usage: install-tools.sh BIN_DIR TOOL=VERSION...   e.g. install-tools.sh .bin kind=v0.30.0
#
# Where the official release hosts answer we download (and check the published sha256);
# on our offline machines they don't, so we build from the Go module proxy instead. Either
# way the binary is kept in $FANOUT_CACHE/bin/<tool>-<version> and copied into BIN_DIR.
set -euo pipefail

bin_dir=${1:?usage: install-tools.sh BIN_DIR TOOL=VERSION...}
shift
here=$(cd "$(dirname "$0")" && pwd)
cache=${FANOUT_CACHE:-$HOME/.cache/fanout}
mkdir -p "$cache"
# One install at a time (CI runs `make e2e-prepare` beside `make test`, whose chart tests
# need helm and kube-score): the second waits, then finds everything cached.
exec 9>"$cache/.install-tools.lock"
flock 9
go=$("$(cd "$(dirname "$0")" && pwd)/ensure-go.sh")
mkdir -p "$bin_dir" "$cache/bin"

# One quick probe decides the path for every tool; FANOUT_OFFLINE=1/0 forces it.
if [ -z "${FANOUT_OFFLINE:-}" ]; then
  if curl -fsSL --max-time 5 -o /dev/null https://dl.k8s.io/release/stable.txt 2>/dev/null; then
    FANOUT_OFFLINE=0
  else
    FANOUT_OFFLINE=1
  fi
fi
[ "$FANOUT_OFFLINE" = 1 ] && echo "tools: release hosts unreachable, building from the Go module proxy" >&2

download() { # url sha256-url out
  local url=$1 sum_url=$2 out=$3 want
  curl -fsSL --retry 3 -o "$out.tmp" "$url"
  want=$(curl -fsSL --retry 3 "$sum_url" | awk '{print $1}')
  echo "$want  $out.tmp" | sha256sum -c --quiet - >&2
  chmod +x "$out.tmp"; mv "$out.tmp" "$out"
}

go_install() { # package@version out
  local tmp
  tmp=$(mktemp -d)
  GOBIN="$tmp" GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOTOOLCHAIN=local \
    CGO_ENABLED=0 GOFLAGS=-buildvcs=false nice -n 15 "$go" install -trimpath -ldflags "-s -w" "$1"
  mv "$tmp/$(basename "${1%@*}")" "$2"; rm -rf "$tmp"
}

install() { # name version
  local name=$1 version=$2 cached="$cache/bin/$1-$2"
  if [ ! -x "$cached" ]; then
    echo "tools: getting $name $version" >&2
    case "$name:$FANOUT_OFFLINE" in
      kind:0) download "https://github.com/kubernetes-sigs/kind/releases/download/$version/kind-linux-amd64" \
                "https://github.com/kubernetes-sigs/kind/releases/download/$version/kind-linux-amd64.sha256sum" "$cached" ;;
      kind:1) go_install "sigs.k8s.io/kind@$version" "$cached" ;;
      kubectl:0) download "https://dl.k8s.io/release/$version/bin/linux/amd64/kubectl" \
                   "https://dl.k8s.io/release/$version/bin/linux/amd64/kubectl.sha256" "$cached" ;;
      # kubectl lives in k8s.io/kubernetes, which `go install` cannot build (see build-k8s.sh).
      kubectl:1) "$here/build-k8s.sh" "$version" kubectl
                 cp "$cache/k8s/$version/bin/kubectl" "$cached" ;;
      helm:0) local tmp; tmp=$(mktemp -d)
              download "https://get.helm.sh/helm-$version-linux-amd64.tar.gz" \
                "https://get.helm.sh/helm-$version-linux-amd64.tar.gz.sha256sum" "$tmp/helm.tgz"
              tar -C "$tmp" -xzf "$tmp/helm.tgz" linux-amd64/helm
              mv "$tmp/linux-amd64/helm" "$cached"; rm -rf "$tmp" ;;
      helm:1) go_install "helm.sh/helm/v${version:1:1}/cmd/helm@$version" "$cached" ;;
      kube-score:0) local tmp base="https://github.com/zegl/kube-score/releases/download/$version"
              tmp=$(mktemp -d)
              curl -fsSL --retry 3 -o "$tmp/ks.tgz" "$base/kube-score_${version#v}_linux_amd64.tar.gz"
              curl -fsSL --retry 3 "$base/kube-score_${version#v}_checksums.txt" \
                | awk -v f="kube-score_${version#v}_linux_amd64.tar.gz" '$2 == f {print $1 "  '"$tmp"'/ks.tgz"}' \
                | sha256sum -c --quiet - >&2
              tar -C "$tmp" -xzf "$tmp/ks.tgz" kube-score
              mv "$tmp/kube-score" "$cached"; rm -rf "$tmp" ;;
      kube-score:1) go_install "github.com/zegl/kube-score/cmd/kube-score@$version" "$cached" ;;
      # The S3-compatible object server of the integration tier (the chart's bundled store).
      versitygw:0) local tmp base="https://github.com/versity/versitygw/releases/download/$version"
              local archive="versitygw_${version}_Linux_x86_64"
              tmp=$(mktemp -d)
              curl -fsSL --retry 3 -o "$tmp/vgw.tgz" "$base/$archive.tar.gz"
              curl -fsSL --retry 3 "$base/checksums.txt" \
                | awk -v f="$archive.tar.gz" '$2 == f {print $1 "  '"$tmp"'/vgw.tgz"}' \
                | sha256sum -c --quiet - >&2
              tar -C "$tmp" -xzf "$tmp/vgw.tgz" "$archive/versitygw"
              mv "$tmp/$archive/versitygw" "$cached"; rm -rf "$tmp" ;;
      versitygw:1) go_install "github.com/versity/versitygw/cmd/versitygw@$version" "$cached" ;;
      *) echo "tools: unknown tool $name" >&2; exit 2 ;;
    esac
  fi
  if ! cmp -s "$cached" "$bin_dir/$name"; then
    cp "$cached" "$bin_dir/$name.tmp" && mv "$bin_dir/$name.tmp" "$bin_dir/$name"
  fi
  echo "tools: $bin_dir/$name ($version)" >&2
}

for pin in "$@"; do
  [[ $pin == *=v* ]] || { echo "tools: expected TOOL=VERSION, got '$pin'" >&2; exit 2; }
  install "${pin%%=*}" "${pin#*=}"
done
