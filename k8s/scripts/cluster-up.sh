#!/usr/bin/env bash
# Create the kind cluster (idempotent) and wait until it is usable: every node Ready,
# DNS answering, the pod network and storage agents running.
#
# Usage: cluster-up.sh   (env: KIND KUBECTL CLUSTER_NAME KIND_CONFIG K8S_VERSION KIND_NODE_IMAGE)
set -euo pipefail

: "${KIND:?}" "${KUBECTL:?}" "${CLUSTER_NAME:?}" "${KIND_CONFIG:?}" "${K8S_VERSION:?}"
here=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)

healthy() {
  local kc
  kc=$(mktemp)
  "$KIND" get kubeconfig --name "$CLUSTER_NAME" > "$kc" 2>/dev/null \
    && "$KUBECTL" --kubeconfig "$kc" --request-timeout=10s get --raw /readyz >/dev/null 2>&1
  local rc=$?; rm -f "$kc"; return $rc
}

# When each node container last started. Docker hands out new addresses when it
# restarts containers, and a kind cluster does not survive its nodes changing address
# (certificates, routes and kubelet configs name the old ones), so a change means recreate.
node_starts() {
  docker ps -a --filter "label=io.x-k8s.kind.cluster=$CLUSTER_NAME" -q \
    | xargs -r docker inspect -f '{{.Name}} {{.State.StartedAt}}' | sort
}

image=${KIND_NODE_IMAGE:-}
if [ -z "$image" ]; then
  # The official node image where a registry answers; our own build where none does.
  if timeout "${PULL_TIMEOUT:-30}" docker pull -q "kindest/node:$K8S_VERSION" >/dev/null 2>&1; then
    image="kindest/node:$K8S_VERSION"
  else
    image=$("$here/build-node-image.sh" "$K8S_VERSION")
  fi
fi
# What the cluster was made from; a different node image or kind config means recreate.
marker="${FANOUT_CACHE:-$HOME/.cache/fanout}/clusters/$CLUSTER_NAME"
want="$image $(sha256sum < "$KIND_CONFIG" | cut -c1-12)"
mkdir -p "$(dirname "$marker")"

if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  if [ "$(cat "$marker" 2>/dev/null)" != "$want" ]; then
    echo "cluster: $CLUSTER_NAME was made from another node image or kind config; recreating" >&2
    "$KIND" delete cluster --name "$CLUSTER_NAME"
  # A cluster left from before a docker restart may be half dead: replace it then.
  elif [ "$(node_starts)" != "$(cat "$marker.started" 2>/dev/null)" ]; then
    echo "cluster: $CLUSTER_NAME nodes restarted since it was made (new addresses); recreating" >&2
    "$KIND" delete cluster --name "$CLUSTER_NAME"
  elif ! healthy && { sleep 20; ! healthy; }; then
    echo "cluster: $CLUSTER_NAME exists but its API server does not answer; recreating" >&2
    "$KIND" delete cluster --name "$CLUSTER_NAME"
  fi
fi
if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  echo "cluster: $CLUSTER_NAME exists and answers" >&2
else
  # The directory every node mounts at /shared (k8s/kind.yaml); sticky and world
  # writable like /tmp, so the non-root pods of any release can use it.
  shared=$(sed -n 's/^ *- hostPath: *//p' "$KIND_CONFIG" | sort -u)
  for d in $shared; do mkdir -p "$d" && chmod 1777 "$d"; done
  echo "cluster: creating $CLUSTER_NAME from $image" >&2
  # kind gives each node's systemd a fixed time to boot; on a machine busy with builds
  # it can miss that ("could not find a log line that matches ... Multi-User System"):
  # try again, up to three times, before failing.
  for attempt in 1 2 3; do
    if "$KIND" create cluster --name "$CLUSTER_NAME" --config "$KIND_CONFIG" --image "$image" --wait 5m; then
      break
    fi
    "$KIND" delete cluster --name "$CLUSTER_NAME" >/dev/null 2>&1 || true
    [ "$attempt" -lt 3 ] || { echo "cluster: kind create cluster failed 3 times" >&2; exit 1; }
    echo "cluster: creating $CLUSTER_NAME failed (attempt $attempt); trying again" >&2
    sleep 10
  done
  echo "$want" > "$marker"
  node_starts > "$marker.started"
fi

kubeconfig=$(mktemp)
trap 'rm -f "$kubeconfig"' EXIT
"$KIND" get kubeconfig --name "$CLUSTER_NAME" > "$kubeconfig"
k() { "$KUBECTL" --kubeconfig "$kubeconfig" "$@"; }
k wait --for=condition=Ready nodes --all --timeout=300s
k -n kube-system rollout status deployment/coredns --timeout=300s
for ds in $(k -n kube-system get ds -o name); do
  k -n kube-system rollout status "$ds" --timeout=300s
done
k get nodes -o wide
echo "cluster: $CLUSTER_NAME ready in $(( $(date +%s) - start ))s" >&2
