#!/usr/bin/env bash
# The SmolLM2 Table-1 study (issue 12), resumable: run again to continue.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1
exec .venv/bin/python -m abft_lens study --out bench/results/study-smollm2 --models smollm2-135m --datasets paper \
  --methods "vanilla,cc,ABFT,E2E-lr1e-4=E2E:--lr 1e-4 --no-restricted-gradient" --seeds 0,1 \
  --train-samples 128 --pseudo-batch-size 16 --epochs 1 --lr 5e-4 --restricted-gradient \
  --validation-examples 256 --validation-prompts 64 --validate-every 2 --keep-best --select-metric macro_f1 \
  --n-test 256 --dont-save-model
