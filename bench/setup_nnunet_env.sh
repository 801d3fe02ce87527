#!/usr/bin/env bash
# Creates bench/.venv-nnunet: nnU-Net v2, used ONLY as a benchmark / parity reference for viseg.
# It lives in its own venv so that nnunetv2 (and its heavy dependency tree) never becomes a viseg
# dependency, and so that its pins cannot disturb viseg's .venv.
#
# Idempotent: a stamp file inside the venv records what was installed (this script's own content plus
# the constraints file); when it matches, nothing is done. Edit the versions below and it reinstalls.
#
# Order matters:
#   1. torch==$TORCH_VERSION first. On this machine pip resolves it to the local CPU wheel
#      (find-links); an unpinned torch would pull gigabytes of CUDA packages from PyPI.
#   2. nnunetv2 with -c constraints.txt, which pins the same torch, so no dependency of nnunetv2 can make
#      pip replace (upgrade or "CUDA-ify") the torch installed in step 1.
#
# Known issue, deliberately left alone (checked with nnunetv2 2.8.1, torch 2.13.0+cpu):
#   nnunetv2 -> dynamic-network-architectures -> timm -> torchvision. PyPI only has CUDA builds of
#   torchvision 0.28.0 (its _C.so links libtorch_cuda.so, absent from the CPU torch), so `import
#   torchvision` raises "RuntimeError: operator torchvision::nms does not exist". Only the timm-based
#   networks (Primus / Eva / DINOv2 in dynamic_network_architectures) import it. Fingerprint extraction,
#   planning, preprocessing and the default (ResEnc/PlainConv) U-Net training and inference do not, so
#   the minimal fix is no fix: the smoke test below imports exactly what the benchmarks use and fails
#   loudly if torchvision ever lands on that path. (Removing torchvision does not help: timm imports it
#   unconditionally. A CPU torchvision wheel is not on PyPI.)
set -euo pipefail

TORCH_VERSION="2.13.0"
NNUNET_VERSION="2.8.1"
PYTHON="${PYTHON:-python3}"

BENCH_DIR="$(cd "$(dirname "$0")" && pwd)"
VENV="$BENCH_DIR/.venv-nnunet"
CONSTRAINTS="$(dirname "$0")/../constraints.txt"
STAMP="$VENV/.nnunet-installed"

# What the stamp must match: this script (versions, steps) and the constraints file.
want_stamp="$(cat "$0" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" && -x "$VENV/bin/nnUNetv2_extract_fingerprint" ]]; then
    echo "bench/.venv-nnunet is up to date (nnunetv2==$NNUNET_VERSION, torch==$TORCH_VERSION)"
    exit 0
fi

echo "setting up bench/.venv-nnunet (nnunetv2==$NNUNET_VERSION, torch==$TORCH_VERSION); takes a few minutes"
rm -f "$STAMP"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

# pip -q, minus one harmless warning this machine's pip config repeats for every package (an
# extra-index-url folder that does not exist). pipefail keeps pip's exit status.
pip_install() {
    "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

pip_install --upgrade pip
# 1. torch first, pinned (local CPU wheel here; see the header).
pip_install "torch==$TORCH_VERSION"
# 2. nnU-Net, never allowed to replace that torch.
pip_install -c "$CONSTRAINTS" "nnunetv2==$NNUNET_VERSION"

# Smoke test: the CLI and the modules the benchmarks run must import, torch must still be the pinned one,
# and torchvision (broken on CPU torch, see the header) must not be on that path.
"$VENV/bin/nnUNetv2_extract_fingerprint" -h > /dev/null
"$PY" - "$TORCH_VERSION" <<'PYEOF'
import sys

import torch

import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor  # noqa: F401
import nnunetv2.experiment_planning.plan_and_preprocess_entrypoints  # noqa: F401

assert torch.__version__.split("+")[0] == sys.argv[1], f"torch was replaced: {torch.__version__}"
assert "torchvision" not in sys.modules, "torchvision is now imported by fingerprinting; see setup_nnunet_env.sh"
PYEOF

echo "$want_stamp" > "$STAMP"
echo "bench/.venv-nnunet ready: $("$PY" -c 'import importlib.metadata as m; print("nnunetv2", m.version("nnunetv2"), "torch", m.version("torch"))')"
