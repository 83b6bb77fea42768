#!/usr/bin/env bash
# Build the shaper image with podman, with no registry and no Docker engine:
#  1. the base `debian:bookworm-slim` is made with debootstrap from the Debian
#     mirror apt uses, unless podman already has an image of that name;
#  2. `podman build` of ./Dockerfile, tagged $SHAPER_IMAGE (default localhost/shaper:dev).
# podman's settings come from scripts/containers.conf (CONTAINERS_CONF), not /etc.
# As root. Prints the image name and its size.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/scripts/containers.conf}"
IMAGE="${SHAPER_IMAGE:-localhost/shaper:dev}"
BASE=debian:bookworm-slim

mirror() {
    local uri
    uri=$(grep -hs -m1 -E '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true)
    [ -n "$uri" ] || uri=$(grep -hs -m1 -E '^deb ' /etc/apt/sources.list | awk '{print $2}' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

if ! podman image exists "$BASE"; then
    root=$(mktemp -d /var/tmp/shaper-base.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "image: making $BASE with debootstrap from $(mirror)"
    debootstrap --variant=minbase bookworm "$root" "$(mirror)" >/dev/null
    # What debian:bookworm-slim also leaves out: package caches and lists, docs.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
           "$root"/usr/share/man/* "$root"/usr/share/locale/*
    tar -C "$root" -c . | podman import --quiet - "localhost/$BASE" >/dev/null
fi

secret=()
# A TLS-intercepting proxy's CA (this machine has one) must reach pip in the build.
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    secret=(--secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt)
fi
old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
podman build --quiet --pull=never --network host "${secret[@]}" -t "$IMAGE" . >/dev/null
# Leave no 500 MB image behind per rebuild: the previous one (unless a container
# uses it) and the build stage's (its cached layers below stay).
new=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$old" ] && [ "$old" != "$new" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
fi
podman image prune --force --filter label=io.shaper.stage=build >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image: $IMAGE $((size / 1000000)) MB"
