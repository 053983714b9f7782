#!/usr/bin/env bash
# The whole test suite (set-up included, idempotent), with the model hub switched off.
#   scripts/test.sh                 -> in .venv      (transformer-lens 3.9)
#   ABFT_LENS_TL=4 scripts/test.sh  -> in .venv-tl4  (transformer-lens 4.3)
# Both environments are set up either way: the cross-version tests of each suite run code in the other one.
set -euo pipefail
cd "$(dirname "$0")/.."
ABFT_LENS_TL=3 scripts/setup.sh
ABFT_LENS_TL=4 scripts/setup.sh
case "${ABFT_LENS_TL:-3}" in
  4|4.3) VENV=.venv-tl4 ;;
  *) VENV=.venv ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
# two workers on two cores: one intra-op thread each (notebook kernels included)
export OMP_NUM_THREADS=1
exec "$VENV/bin/python" -m pytest -n 2 --nbmake tests notebooks "$@"
