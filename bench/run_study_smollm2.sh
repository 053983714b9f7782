#!/usr/bin/env bash
# The SmolLM2 Table-1 study (docs/results.md "Table 1 on SmolLM2-135M"), resumable: run it again to continue.
# Trained cells keep no weights (--dont-save-model: the folder stays small enough to commit); the HTML table is
# regenerated from the folder by the study itself or `abft-lens table bench/results/study-smollm2 --format html`.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m abft_lens study --out bench/results/study-smollm2 --models smollm2-135m --datasets paper \
  --methods "vanilla,cc,ABFT,E2E-lr1e-4=E2E:--lr 1e-4 --no-restricted-gradient" --seeds 0,1 \
  --train-samples 128 --pseudo-batch-size 16 --epochs 1 --lr 5e-4 --restricted-gradient \
  --validation-examples 256 --validation-prompts 64 --validate-every 2 --keep-best --select-metric macro_f1 \
  --n-test 256 --dont-save-model
