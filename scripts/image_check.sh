#!/bin/sh
# Serves a tiny model from each image of scripts/build_images.sh and checks the image's health check, one real
# prediction (equal to the in-process engine's), the non-root user (uid 1000) of every server process, and prints
# the image sizes (scripts/image_check.py; docs/images.md). Needs the project's Python environment (a tiny model is
# built and packaged on the host) and root for buildah. Servers and working containers are removed at the end.
#   scripts/image_check.sh                  # both images
#   scripts/image_check.sh kserve           # one
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} exec "$PYTHON" "$ROOT/scripts/image_check.py" "$@"
