#!/usr/bin/env bash
# GPU check of EPEE Serve (docs/operations.md, "GPU workers"). On a host with CUDA:
#   1. `epee bench` of a tiny model on cuda (float16), next to float32;
#   2. a TorchServe round trip: package the tiny model (dtype float16), start TorchServe on 127.0.0.1 free ports
#      with number_of_gpu=1, send one plain and one Open Inference Protocol request, check the answers against
#      the in-process engine on the same device and dtype, and check the worker's log line says it placed the
#      model on cuda.
# On a host without CUDA it says so and exits 0. Usage: scripts/gpu_check.sh [--force-cpu]
# (--force-cpu runs the same steps on the CPU, to check the script itself; PYTHON=... picks the interpreter.)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
if [[ "${1:-}" != "--force-cpu" ]] &&
    ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device on this host (torch.cuda.is_available() is False): skipped"
    exit 0
fi
export TQDM_DISABLE=1  # no progress bars between the check lines
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
