#!/usr/bin/env bash
# The paper-regime study on SmolLM2-135M (issue 21): --preset paper (512 prompts x 2 epochs, pseudo-batch 32,
# Adam lr 2e-5, PID, no guard, last step, all 1024 test prompts), SST-2, FP, SST-5, TREC x {vanilla, cc, prior,
# ABFT, E2E} x seeds 0, 1, and Table 2: every trained cell also evaluated on the other paper datasets (128
# prompts each). Resumable: run it again to continue. Trained weights stay in the run folders (git ignores them).
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m abft_lens study --out bench/results/study-paper-smollm2 --preset paper \
  --models smollm2-135m --datasets sst2,fp,sst5,trec --methods vanilla,cc,prior,ABFT,E2E --seeds 0,1 \
  --generalization-test --generalization-n-test 128 "$@"
