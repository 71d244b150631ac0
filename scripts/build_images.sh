#!/bin/sh
# Builds EPEE Serve's two images with buildah, without a docker daemon or a registry (docs/images.md):
#   TORCHSERVE_TAG (epee-serve:cpu)        from docker/Dockerfile         TorchServe 0.12, the .mar platform
#   KSERVE_TAG     (epee-serve-kserve:cpu) from docker/Dockerfile.kserve  `epee serve`, KServe's model server
# The Dockerfiles stay standard (FROM python:3.11-slim-bookworm). When that base is not in buildah's storage it is
# made here: a Debian bookworm rootfs from Debian's packages (debootstrap) with Debian's Python 3.11, committed
# under the Dockerfiles' FROM name, so no base image is ever pulled (--pull=never).
# torch comes from TORCH_INDEX_URL; by default PyTorch's CPU index (the Dockerfiles' default) when it answers,
# else PyPI, whose Linux torch is the CUDA build (it runs on CPU; the image is then several GB).
# Run from anywhere, as root (buildah's vfs storage and chroot isolation need no daemon, but root):
#   scripts/build_images.sh                  # the base if missing, then both images
#   scripts/build_images.sh base kserve      # the base if missing, then only the KServe image
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
TORCHSERVE_TAG=${TORCHSERVE_TAG:-epee-serve:cpu}
KSERVE_TAG=${KSERVE_TAG:-epee-serve-kserve:cpu}
CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
# This machine's CA bundle, bind-mounted over the base's during the RUN steps only (not kept in the images): pip
# then trusts what the host trusts, e.g. a TLS-inspecting proxy's CA (Debian's pip reads the system bundle).
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

buildah() { command buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
now() { date +%s; }

# A bookworm rootfs with Debian's python3.11 standing in for python:3.11-slim-bookworm: `python`/`python3` on
# PATH in /usr/local/bin as there, the three bookworm suites in apt's sources (the Dockerfiles pin
# bookworm-security versions), security updates applied and apt's lists emptied.
make_base() {
    work=$(mktemp -d /tmp/epee-base.XXXXXX)
    rootfs=$work/rootfs
    debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR"
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
EOF
    chroot "$rootfs" sh -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get -y upgrade \
        && apt-get clean && rm -rf /var/lib/apt/lists/*'
    ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python3"
    ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python"
    container=$(buildah from scratch)
    mountpoint=$(buildah mount "$container")
    tar -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . | tar -C "$mountpoint" -xpf -
    buildah umount "$container"
    buildah config --os linux --arch amd64 --cmd python3 \
        --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 "$container"
    buildah commit --rm --format docker "$container" "$BASE_IMAGE"
    rm -rf "$work"
}

# bud_image TAG DOCKERFILE: one image, timed; the context is the repository root (.dockerignore applies).
bud_image() {
    start=$(now)
    buildah bud --isolation chroot --format docker --pull=never --layers=false $ca_volume \
        --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" -f "$ROOT/$2" -t "$1" "$ROOT"
    echo "built $1 from $2 in $(($(now) - start)) s"
}

ca_volume=
if [ -f "$CA_BUNDLE" ]; then ca_volume="--volume $CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro"; fi

if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "base $BASE_IMAGE: in buildah's storage"
else
    start=$(now)
    make_base
    echo "base $BASE_IMAGE: made with debootstrap in $(($(now) - start)) s"
fi

if [ -z "${TORCH_INDEX_URL:-}" ]; then
    if curl -fsS --max-time 15 -o /dev/null "$CPU_INDEX_URL/torch/"; then
        TORCH_INDEX_URL=$CPU_INDEX_URL
    else
        TORCH_INDEX_URL=https://pypi.org/simple
        echo "PyTorch's CPU index does not answer: torch from PyPI (the CUDA build, run on CPU)"
    fi
fi
echo "torch from $TORCH_INDEX_URL"

for image in ${*:-torchserve kserve}; do
    case $image in
    base) ;;
    torchserve) bud_image "$TORCHSERVE_TAG" docker/Dockerfile ;;
    kserve) bud_image "$KSERVE_TAG" docker/Dockerfile.kserve ;;
    *) echo "unknown image '$image' (base, torchserve, kserve)" >&2 && exit 2 ;;
    esac
done
buildah images
