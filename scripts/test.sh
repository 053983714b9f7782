#!/usr/bin/env bash
# The whole test suite (set-up included, idempotent), with the model hub switched off.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
# two workers on two cores: one intra-op thread each (notebook kernels included)
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -n 2 --nbmake tests notebooks "$@"
