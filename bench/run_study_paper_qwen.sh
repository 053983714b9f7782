#!/usr/bin/env bash
# The paper-regime study on Qwen2.5-Coder-0.5B-Instruct (issue 21): --preset paper (512 prompts x 2 epochs,
# pseudo-batch 32, Adam lr 2e-5, PID, no guard, last step, all 1024 test prompts), SST-2 (where our regime's ABFT
# lost 10.9 points) x {vanilla, cc, prior, ABFT, E2E} x seed 0. Resumable: run it again to continue; add
# --seeds 0,1 --extend for seed 1. Trained weights are not kept (--dont-save-model).
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m abft_lens study --out bench/results/study-paper-qwen --preset paper \
  --models qwen2.5-coder-0.5b --datasets sst2 --methods vanilla,cc,prior,ABFT,E2E --seeds 0 \
  --dont-save-model "$@"
