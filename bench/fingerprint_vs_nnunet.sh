#!/usr/bin/env bash
# `make bench-fingerprint`: make sure bench/.venv-nnunet exists (a no-op once it does), then time
# fingerprint extraction, nnU-Net v2 vs viseg. Arguments go to the Python script (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup_nnunet_env.sh
exec .venv/bin/python bench/fingerprint_vs_nnunet.py "$@"
