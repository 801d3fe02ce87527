#!/usr/bin/env bash
# The GPU check of viseg (bench/gpu_check.py): run once on a machine with a GPU, then commit the JSON it writes
# (bench/results/gpu_check.json). At most --budget-s seconds (600 by default) of steps that each record their own
# result or failure; `--help` lists them. `--cpu-smoke` runs everything on the CPU with tiny sizes.
#
#   make .venv/.viseg-installed        # once, on a fresh checkout (the GPU machine has no network: before)
#   bash bench/gpu_check.sh            # about 5-7 min on one GPU (an estimate; capped at 10)
#   bash bench/gpu_check.sh --help
#
# A thin wrapper on purpose: it only finds the checkout's venv (VISEG_PYTHON overrides it), so that the check
# runs the viseg installed there, from the repository root, whatever the current folder.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${VISEG_PYTHON:-$repo/.venv/bin/python}"

if [[ ! -x "$python" ]]; then
    for arg in "$@"; do  # usage needs no venv: gpu_check.py imports only the standard library before parsing
        if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
            exec python3 "$here/gpu_check.py" --help
        fi
    done
    echo "gpu_check.sh: no Python at $python: build the venv with 'make .venv/.viseg-installed' in $repo" \
         "(or set VISEG_PYTHON to a Python with viseg installed)" >&2
    exit 2
fi

cd "$repo"
exec "$python" "$here/gpu_check.py" "$@"
