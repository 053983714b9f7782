#!/usr/bin/env bash
# The Qwen2.5-Coder-0.5B-Instruct Table-1 study (docs/results.md "Table 1"), resumable: run it again to continue.
# Cut to fit a 2-core CPU (a Qwen prompt costs ~2.8x a SmolLM2 prompt): vanilla and ABFT only, seed 0, 128 test
# prompts, validation on 32 prompts every 4 steps. Training: 128 prompts, 8 steps, restricted gradient, best validation
# macro-F1 kept, like the SmolLM2 study, but lr 1e-4: chosen on validation prompts only. At the SmolLM2 lr (5e-4,
# bench/results/study-qwen-lr5e-4/) no trained step beat the untrained model on SST-2, MR or FP validation; at 1e-4
# FP's validation macro-F1 rose 40.5 -> 42.8 (bench/results/selection_qwen.json). Add CC, E2E or seeds with --extend.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m abft_lens study --out bench/results/study-qwen --models qwen2.5-coder-0.5b --datasets paper \
  --methods vanilla,ABFT --seeds 0 \
  --train-samples 128 --pseudo-batch-size 16 --epochs 1 --lr 1e-4 --restricted-gradient \
  --validation-examples 128 --validation-prompts 32 --validate-every 4 --keep-best --select-metric macro_f1 \
  --n-test 128 --dont-save-model
