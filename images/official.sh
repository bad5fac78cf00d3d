# Sourced by the build scripts of images that stand in for an official image under its own
# name (postgres, versitygw): use the official one wherever it is here or can be pulled.
#
# official_or_ours TAG HASH NAME: succeeds when TAG needs no build: it is ours and labelled
# with HASH (the hash of its inputs), or it is not ours (the official image, pulled before),
# or it can be pulled now. Fails when it must be built. FORCE_BUILD=1 always builds.
official_or_ours() {
  local tag=$1 hash=$2 name=$3 have
  have=$(docker image inspect -f '{{index .Config.Labels "fanout.hash"}}|{{.Id}}' "$tag" 2>/dev/null || true)
  if [ "${have%%|*}" = "$hash" ]; then echo "$name: $tag up to date" >&2; return 0; fi
  [ "${FORCE_BUILD:-0}" = 1 ] && return 1
  if [ -n "$have" ] && [ -z "${have%%|*}" ]; then
    echo "$name: using existing $tag (not ours: official or pulled)" >&2; return 0
  fi
  if timeout "${PULL_TIMEOUT:-20}" docker pull -q "$tag" >/dev/null 2>&1; then
    echo "$name: pulled $tag" >&2; return 0
  fi
  return 1
}

# official_or_debian_build NAME TAG HASH BASE: TAG ready (official_or_ours), else built from
# images/NAME/Dockerfile on BASE (Debian's packages) and labelled with HASH. Prints TAG.
official_or_debian_build() {
  local name=$1 tag=$2 hash=$3 base=$4
  if ! official_or_ours "$tag" "$hash" "$name"; then
    echo "$name: building $tag from Debian packages (base $base)" >&2
    tar -c "images/$name" | nice -n 10 docker build --network host --build-arg "BASE_IMAGE=$base" \
      --label "fanout.hash=$hash" -f "images/$name/Dockerfile" -t "$tag" - >&2
  fi
  echo "$tag"
}
