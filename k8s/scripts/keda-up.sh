#!/usr/bin/env bash
# KEDA (pinned) into the kind cluster: the official images and release manifest where a
# registry answers; on machines where none does, the operator and metrics adapter built
# from the Go module proxy (github.com/kedacore/keda/v2), packed into images under the
# official names, and the module's own manifests (config/minimal: CRDs, RBAC, operator,
# metrics server; no admission webhooks). Binaries are cached by version in $FANOUT_CACHE.
#
# Env: KEDA_VERSION (v2.21.0), KIND, KUBECTL, CLUSTER_NAME; KEDA_IMAGES_ONLY=1 only gets
# the images (no cluster needed: CI builds them while the tests that need none run).
set -euo pipefail

version=${KEDA_VERSION:?KEDA_VERSION, e.g. v2.21.0}
tag=${version#v}
kind=${KIND:-kind}
kubectl=${KUBECTL:-kubectl}
cluster=${CLUSTER_NAME:-fanout}
cache=${FANOUT_CACHE:-$HOME/.cache/fanout}
scripts=$(cd "$(dirname "$0")" && pwd)
operator=ghcr.io/kedacore/keda:$tag
adapter=ghcr.io/kedacore/keda-metrics-apiserver:$tag
k() { "$kubectl" --context "kind-$cluster" "$@"; }

images_only=${KEDA_IMAGES_ONLY:-0}
installed=$([ "$images_only" = 1 ] || k -n keda get deployment keda-operator -o jsonpath='{.spec.template.spec.containers[0].image}' 2>/dev/null || true)
if [ "$installed" = "$operator" ] && k -n keda wait --for=condition=Available deployment --all --timeout=5s >/dev/null 2>&1 \
  && k wait --for=condition=Available apiservice/v1beta1.external.metrics.k8s.io --timeout=5s >/dev/null 2>&1; then
  echo "keda: $version already installed"
  exit 0
fi

module_dir() {
  local go
  go=$("$scripts/ensure-go.sh")
  (cd / && GOMODCACHE="$cache/go/mod" GOFLAGS=-mod=mod GOTOOLCHAIN=local \
    "$go" mod download -json "github.com/kedacore/keda/v2@$version") | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'
}

build_image() { # build_image IMAGE BINARY ENTRYPOINT
  local ctx
  ctx=$(mktemp -d)
  cp "$2" "$ctx/bin"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates.crt"
  cat >"$ctx/Dockerfile" <<EOF
FROM scratch
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY bin /$3
USER 65532:65532
ENTRYPOINT ["/$3"]
EOF
  docker build -q -t "$1" "$ctx" >/dev/null
  rm -rf "$ctx"
}

if docker image inspect "$operator" "$adapter" >/dev/null 2>&1; then
  echo "keda: images $operator, $adapter present"
elif timeout 120 docker pull -q "$operator" >/dev/null 2>&1 && timeout 120 docker pull -q "$adapter" >/dev/null 2>&1; then
  echo "keda: pulled the official images"
else
  echo "keda: no registry; building $version from the Go module proxy (cold: ~10 minutes)"
  dir=$(module_dir)
  [ -n "$dir" ] || { echo "keda: cannot download github.com/kedacore/keda/v2@$version" >&2; exit 1; }
  go=$("$scripts/ensure-go.sh")
  mkdir -p "$cache/bin"
  for cmd in operator adapter; do
    out="$cache/bin/keda-$cmd-$version"
    if [ ! -x "$out" ]; then
      # A writable copy: the build fills in go.sum entries it checks against sum.golang.org.
      work="$cache/modules/keda-$version"
      mkdir -p "$cache/modules"; [ -d "$work" ] || { cp -r "$dir" "$work.tmp" && chmod -R u+w "$work.tmp" && mv "$work.tmp" "$work"; }
      echo "keda: go build ./cmd/$cmd"
      (cd "$work" && GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
        CGO_ENABLED=0 nice -n 15 "$go" build -mod=mod -trimpath \
        -ldflags "-s -w -X=github.com/kedacore/keda/v2/version.Version=$tag" -o "$out.tmp" "./cmd/$cmd")
      mv "$out.tmp" "$out"
    fi
  done
  build_image "$operator" "$cache/bin/keda-operator-$version" keda
  build_image "$adapter" "$cache/bin/keda-adapter-$version" keda-adapter
fi
if [ "$images_only" = 1 ]; then
  echo "keda: images ready"
  exit 0
fi
# The release's manifest where its host answers, else the module's own kustomization.
manifest=$(curl -fsSL --max-time 30 "https://github.com/kedacore/keda/releases/download/$version/keda-$tag-core.yaml" || true)
if [ -z "$manifest" ]; then
  dir=${dir:-$(module_dir)}
  # The module's own kustomization, images pinned to this version and never pulled.
  manifest=$(k kustomize "$dir/config/minimal" \
    | sed -e "s#ghcr.io/kedacore/keda:[^\"'[:space:]]*#$operator#" \
          -e "s#ghcr.io/kedacore/keda-metrics-apiserver:[^\"'[:space:]]*#$adapter#" \
          -e "s#imagePullPolicy: Always#imagePullPolicy: IfNotPresent#")
fi

# The manifest's documents with (1) or without (0) the APIService of the metrics adapter.
docs() { printf '%s\n' "$manifest" | awk -v want="$1" 'BEGIN { RS = "\n---\n" }
  { api = ($0 ~ /(^|\n)kind: APIService\n/) } (api && want == 1) || (!api && want == 0) { printf "%s\n---\n", $0 }'; }

"$kind" load docker-image --name "$cluster" "$operator" "$adapter"
docs 0 | k apply --server-side --force-conflicts -f - >/dev/null
# (The operator and its metrics server; their names differ between the release manifest
# and the module's kustomization.)
k -n keda wait --for=condition=Available deployment --all --timeout=300s
# The APIService only now: registered together with its Service, the API server's first
# discovery check can race kube-proxy's rules for the new Service IP, and on a machine
# whose gateway answers any address (a transparent proxy) it keeps that HTTP/2
# connection, never reaching KEDA (seen here: FailedDiscoveryCheck, 404, for good).
docs 1 | k apply --server-side --force-conflicts -f - >/dev/null
k wait --for=condition=Available apiservice/v1beta1.external.metrics.k8s.io --timeout=300s
echo "keda: $version ready"
