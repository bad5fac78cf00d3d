#!/usr/bin/env bash
# Build the Debian base images our Dockerfiles start FROM, when they cannot be pulled.
#
# Usage: images/base/build.sh [NAME ...]     (default: every image in the table below)
#
# Each image is "try docker pull (short timeout); else debootstrap a minbase rootfs from the
# Debian mirror this machine already uses, then docker import". Results are cached as
# `docker save` tarballs in $FANOUT_CACHE/images, keyed by a hash of this script, so a second
# run (or CI on the same machine) only `docker load`s them.
#
# To add an image (e.g. PostgreSQL later), add one line to IMAGES:
#   "TAG|SUITE|comma,separated,packages|post-install shell run in the rootfs (may be empty)"
set -euo pipefail

IMAGES=(
  "debian:bookworm-slim|bookworm||"
  # Same shape as the official python image: python3 on PATH as `python` and `python3`,
  # venv and pip usable (PEP 668 marker removed, like the official image allows pip).
  "python:3.11-slim-bookworm|bookworm|python3,python3-venv,python3-pip,python-is-python3,ca-certificates|rm -f /usr/lib/python3*/EXTERNALLY-MANAGED"
  # Node rootfs for our kind node image (systemd 257 still boots on cgroup v1 hosts).
  "fanout/kind-node-base:trixie|trixie|systemd,systemd-sysv,dbus,containerd,runc,containernetworking-plugins,iptables,nftables,conntrack,iproute2,ethtool,socat,util-linux,mount,kmod,ca-certificates,procps,libseccomp2,bash,findutils,gzip,tar|"
)

here=$(cd "$(dirname "$0")" && pwd)
cache=${FANOUT_CACHE:-$HOME/.cache/fanout}/images
pull_timeout=${PULL_TIMEOUT:-20}
mkdir -p "$cache"

# The mirror this machine's apt already trusts (deb822 or one-line format).
mirror() {
  local m
  m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
  [ -n "$m" ] || m=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1)
  echo "${m:-http://deb.debian.org/debian}"
}

build_one() {
  local spec=$1 tag suite pkgs post hash tarball rootfs
  IFS='|' read -r tag suite pkgs post <<<"$spec"
  hash=$( { cat "$0"; echo "$spec"; } | sha256sum | cut -c1-12)
  tarball="$cache/$(echo "$tag" | tr '/:' '__')-$hash.tar"

  if [ "$(docker image inspect -f '{{index .Config.Labels "fanout.hash"}}' "$tag" 2>/dev/null)" = "$hash" ]; then
    echo "base: $tag up to date" >&2; return
  fi
  if [ -f "$tarball" ]; then
    echo "base: $tag from cache $tarball" >&2; docker load -i "$tarball" >/dev/null; return
  fi
  # Official images win where a registry is reachable; ours are the offline stand-in.
  # Our own images (fanout/...) are never pulled.
  if [[ $tag != fanout/* ]] && timeout "$pull_timeout" docker pull -q "$tag" >/dev/null 2>&1; then
    echo "base: pulled $tag" >&2; return
  fi

  echo "base: debootstrap $suite for $tag" >&2
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' RETURN
  command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  debootstrap --variant=minbase ${pkgs:+--include="$pkgs"} "$suite" "$rootfs" "$(mirror)" >"$rootfs.log" 2>&1 \
    || { tail -30 "$rootfs.log" >&2; return 1; }
  rm -f "$rootfs.log"
  [ -z "$post" ] || chroot "$rootfs" /bin/sh -c "$post"
  # Slim it like the official images: no apt lists, caches or docs.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL fanout.hash=$hash" \
    --change 'CMD ["bash"]' - "$tag" >/dev/null
  docker save -o "$tarball.tmp" "$tag" && mv "$tarball.tmp" "$tarball"
  echo "base: built $tag" >&2
}

wanted=("$@")
for spec in "${IMAGES[@]}"; do
  tag=${spec%%|*}
  if [ ${#wanted[@]} -eq 0 ] || printf '%s\n' "${wanted[@]}" | grep -qxF "$tag"; then
    build_one "$spec"
  fi
done
