#!/usr/bin/env bash
# Assemble a kind node image offline, for when kindest/node cannot be pulled.
#
# Usage: build-node-image.sh K8S_VERSION    -> prints the image tag on stdout
#
# Everything comes from the Go module proxy and Debian: Kubernetes, etcd and CoreDNS are
# built from Go modules, the rootfs is Debian trixie (systemd 257 still runs on cgroup v1
# hosts), and every image the cluster needs is baked in. The tag carries the Kubernetes
# version and a hash of every file that goes into the image, so a second run reuses it
# (from docker, else from the tarball in $FANOUT_CACHE/images).
set -euo pipefail

version=${1:?usage: build-node-image.sh vX.Y.Z}
root=$(cd "$(dirname "$0")/../.." && pwd)
scripts="$root/k8s/scripts"
cache=${FANOUT_CACHE:-$HOME/.cache/fanout}
mkdir -p "$cache/images"

# Everything that shapes the image, hashed in a stable order.
inputs=(images/kind-node images/pause images/k8s-static images/node-tools images/etcd
        images/coredns images/base/build.sh k8s/scripts/build-node-image.sh
        k8s/scripts/build-k8s.sh k8s/scripts/build-go-main.sh)
hash=$(cd "$root" && { echo "$version"; find "${inputs[@]}" -type f | LC_ALL=C sort | xargs sha256sum; } \
       | sha256sum | cut -c1-12)
tag="fanout/kind-node:$version-$hash"
tarball="$cache/images/kind-node-$version-$hash.tar"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "node-image: $tag present" >&2
  # Keep the cache complete, so a machine whose docker is wiped still starts warm.
  [ -f "$tarball" ] || { docker save -o "$tarball.tmp" "$tag" && mv "$tarball.tmp" "$tarball"; }
  echo "$tag"; exit 0
fi
if [ -f "$tarball" ]; then
  echo "node-image: loading $tag from $tarball" >&2
  docker load -i "$tarball" >/dev/null; echo "$tag"; exit 0
fi

start=$(date +%s)
echo "node-image: building $tag (cold: Kubernetes from Go modules takes a while)" >&2
"$scripts/build-k8s.sh" "$version" kubeadm kubelet kubectl kube-apiserver \
  kube-controller-manager kube-scheduler kube-proxy
k8s_bin="$cache/k8s/$version/bin"
etcd_bin=$("$scripts/build-go-main.sh" "$root/images/etcd" etcd)
coredns_bin=$("$scripts/build-go-main.sh" "$root/images/coredns" coredns)
"$root/images/base/build.sh" debian:bookworm-slim fanout/kind-node-base:trixie

stage="$cache/node-build/$version-$hash"
rm -rf "$stage"; mkdir -p "$stage"/{bin,images,ctx}
trap 'rm -rf "$stage"' EXIT

# The image names kubeadm of this version will ask the kubelet for.
mapfile -t wanted < <("$k8s_bin/kubeadm" config images list --kubernetes-version "$version" 2>/dev/null)
image_for() { printf '%s\n' "${wanted[@]}" | grep -E "/$1:" ; }
pause_image=$(image_for pause)
node_tools_image="fanout/node-tools:$version-$hash"

# Build one image from DOCKERFILE_DIR with the given files copied into a fresh context.
build_image() {
  local tag=$1 dir=$2; shift 2
  local ctx="$stage/ctx/$(echo "$tag" | tr '/:' '__')"
  mkdir -p "$ctx"
  cp "$dir/Dockerfile" "$@" "$ctx/"
  # Quiet unless it fails (docker's CLI also nags about the legacy builder on every build).
  if ! docker build --network host "${build_args[@]}" -t "$tag" "$ctx" >"$ctx.log" 2>&1; then
    cat "$ctx.log" >&2; return 1
  fi
  echo "node-image: built $tag" >&2
}
build_args=()
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  build_args=(--build-arg "BIN=$c")
  build_image "$(image_for "$c")" "$root/images/k8s-static" "$k8s_bin/$c"
done
cp "$etcd_bin" "$stage/ctx/etcd"
build_args=(--build-arg BIN=etcd)
build_image "$(image_for etcd)" "$root/images/k8s-static" "$stage/ctx/etcd"
cp "$coredns_bin" "$stage/ctx/coredns"
build_args=()
build_image "$(image_for coredns)" "$root/images/coredns" "$stage/ctx/coredns"

command -v cc >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null; }
cc -Os -static -o "$stage/ctx/pause" "$root/images/pause/pause.c"
build_image "$pause_image" "$root/images/pause" "$stage/ctx/pause"

build_args=(--build-arg BASE_IMAGE=debian:bookworm-slim)
build_image "$node_tools_image" "$root/images/node-tools" "$k8s_bin/kube-proxy" "$k8s_bin/kubectl" \
  "$root/images/node-tools/fanout-net" "$root/images/node-tools/fanout-storage"
docker tag "$node_tools_image" "$(image_for kube-proxy)"

all_images=("${wanted[@]}" "$node_tools_image")
docker save -o "$stage/images/k8s.tar" "${all_images[@]}"

# Node image context: our files with image names filled in, the binaries, the images.
cp "$root/images/kind-node/Dockerfile" "$stage/"
cp -a "$root/images/kind-node/files" "$stage/files"
grep -rl '@PAUSE_IMAGE@\|@NODE_TOOLS_IMAGE@' "$stage/files" | xargs sed -i \
  -e "s#@PAUSE_IMAGE@#$pause_image#g" -e "s#@NODE_TOOLS_IMAGE@#$node_tools_image#g"
cp "$k8s_bin/kubeadm" "$k8s_bin/kubelet" "$k8s_bin/kubectl" "$stage/bin/"
rm -rf "$stage/ctx"
docker build --build-arg "K8S_VERSION=$version" -t "$tag" "$stage" >"$stage.log" 2>&1 \
  || { cat "$stage.log" >&2; exit 1; }
rm -f "$stage.log"

docker save -o "$tarball.tmp" "$tag" && mv "$tarball.tmp" "$tarball"
# Older node images of this version are dead weight, in the cache and in docker
# (docker refuses to remove one that a cluster still runs on, which is what we want).
find "$cache/images" -name "kind-node-$version-*.tar" ! -name "$(basename "$tarball")" -delete
docker images --format '{{.Repository}}:{{.Tag}}' \
  | grep -E "^fanout/(kind-node|node-tools):$version-" | grep -v -- "-$hash\$" \
  | xargs -r docker rmi >/dev/null 2>&1 || true
echo "node-image: built $tag in $(( $(date +%s) - start ))s" >&2
echo "$tag"
