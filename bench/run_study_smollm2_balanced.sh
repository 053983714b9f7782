#!/usr/bin/env bash
# ABFT with balanced training queries (--balance-query-labels, ours) on SmolLM2, the two paper datasets whose
# training pools are most skewed (FP 61 % "neutral", TEE 40 % "anger"), with the Table-1 study's settings and test
# prompts, so bench/study_pairs.py can set it against that study's ABFT cells:
#   .venv/bin/python bench/study_pairs.py bench/results/study-smollm2 bench/results/study-smollm2-balanced
# Resumable: run it again to continue; vanilla is re-run here (it must equal the Table-1 study's).
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m abft_lens study --out bench/results/study-smollm2-balanced --models smollm2-135m \
  --datasets fp,tee --methods "vanilla,ABFT-balanced=ABFT:--balance-query-labels" --seeds 0,1 \
  --train-samples 128 --pseudo-batch-size 16 --epochs 1 --lr 5e-4 --restricted-gradient \
  --validation-examples 256 --validation-prompts 64 --validate-every 2 --keep-best --select-metric macro_f1 \
  --n-test 256 --dont-save-model "$@"
