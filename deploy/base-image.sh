#!/usr/bin/env bash
# Build a minimal Debian 12 image from a Debian mirror, no container registry needed:
# debootstrap's minbase plus Python 3.11 (bentofile.yaml's python_version), venv, CA
# certificates and tini, imported into the container engine (POX_CONTAINER_ENGINE, podman).
# Usage: deploy/base-image.sh IMAGE; POX_DEBIAN_MIRROR defaults to the mirror apt uses here.
set -euo pipefail
image=$1
suite=bookworm
mirror=${POX_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI)' "Codename: $suite" \
  'Label: Debian' 'Identifier: Packages' | head -n 1)}
[ -n "$mirror" ] || { echo "$0: apt knows no $suite mirror: set POX_DEBIAN_MIRROR" >&2; exit 1; }
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv,tini \
  "$suite" "$rootfs" "$mirror" >/dev/null
chroot "$rootfs" apt-get clean  # the downloaded packages (45 MB)
rm -rf "$rootfs"/var/lib/apt/lists/*  # apt-get update fetches them again
tar -C "$rootfs" -c . |
  "${POX_CONTAINER_ENGINE:-podman}" import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "$0: built $image from $mirror"
