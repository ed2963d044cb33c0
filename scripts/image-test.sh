#!/bin/bash
# Build the image and run the capability tests with the daemon inside it, as the
# DaemonSet runs it (tests/test_capabilities.py: the manifest's capabilities,
# --read-only, no_new_privs, the runtime's seccomp profile, no hostPID, its volumes).
#
#   sudo make image-test            (after make setup)
#
# Needs root, Debian's podman, runc and mmdebstrap (installed here if missing).
# No registry is needed: when the base image (debian:12-slim) is not in podman's
# store, one is made from Debian's packages with mmdebstrap and imported under that
# name. A build host behind a TLS-intercepting proxy has its CA bundle (pip's
# `cert`, or PIP_CERT) passed to the build as the secret pip-ca.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${AFXDP_TEST_IMAGE:-localhost/afxdp:test}
BASE=docker.io/library/debian:12-slim
# crun refuses a hybrid cgroup layout; runc does not.
PODMAN=(podman --runtime runc)

if [ "$(id -u)" != 0 ]; then
    echo "image-test: needs root (netns, XDP, podman as root)" >&2
    exit 2
fi
missing=()
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "image-test: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc mmdebstrap \
        uidmap >/dev/null
fi

if ! "${PODMAN[@]}" image exists "$BASE"; then
    echo "image-test: making $BASE with mmdebstrap (minbase bookworm)" >&2
    tar=$(mktemp /tmp/afxdp-base-XXXXXX.tar)
    trap 'rm -f "$tar"' EXIT
    mmdebstrap --quiet --variant=minbase bookworm "$tar" \
        "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main"
    "${PODMAN[@]}" import --quiet "$tar" "$BASE" >/dev/null
fi

secret=()
ca=${PIP_CERT:-$(.venv/bin/pip config get global.cert 2>/dev/null || true)}
if [ -n "$ca" ] && [ -f "$ca" ]; then
    secret=(--secret "id=pip-ca,src=$ca")
fi
echo "image-test: building $IMAGE" >&2
"${PODMAN[@]}" build --quiet --pull=never "${secret[@]}" -t "$IMAGE" . >/dev/null

echo "image-test: the capability tests, daemon in $IMAGE" >&2
AFXDP_TEST_IMAGE=$IMAGE .venv/bin/python -m pytest -q tests/test_capabilities.py
