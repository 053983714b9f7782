#!/usr/bin/env bash
# The Qwen2.5-Coder-0.5B-Instruct Table-1 study (README "Table 1"), resumable: run it again to continue.
# Cut to fit a 2-core CPU (a Qwen prompt costs ~2.8x a SmolLM2 prompt): vanilla and ABFT only, seed 0, 128 test
# prompts, validation on 32 prompts every 4 steps. Training settings are the SmolLM2 study's (128 prompts, 8 steps,
# lr 5e-4, restricted gradient, best validation macro-F1 kept). Add CC, E2E or seeds later with --extend.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m abft_lens study --out bench/results/study-qwen --models qwen2.5-coder-0.5b --datasets paper \
  --methods vanilla,ABFT --seeds 0 \
  --train-samples 128 --pseudo-batch-size 16 --epochs 1 --lr 5e-4 --restricted-gradient \
  --validation-examples 128 --validation-prompts 32 --validate-every 4 --keep-best --select-metric macro_f1 \
  --n-test 128 --dont-save-model
