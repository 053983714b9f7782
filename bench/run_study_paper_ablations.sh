#!/usr/bin/env bash
# The paper's ablations (its Table 4) in the paper's regime (issue 21): SmolLM2-135M, FP, seed 0, --preset paper;
# each variant changes one part of ABFT (the variant names no preset in its config.json):
#   noPID          fixed penalty A = 0.5 (no self-adaptive penalty)
#   noPID-noFilter fixed A and induction filter T = 0: every head takes part
#   A0             no wrong-label penalty (A = 0, fixed)
#   B0             no correct-label award (B = 0), PID on
# Plain ABFT on FP seed 0 is a cell of bench/run_study_paper_smollm2.sh (the same prompts); compare the folders
# with bench/study_pairs.py. Resumable: run it again to continue.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m abft_lens study --out bench/results/study-paper-ablations --preset paper \
  --models smollm2-135m --datasets fp --seeds 0 --dont-save-model \
  --methods "vanilla,noPID=ABFT:--penalty-mode None,noPID-noFilter=ABFT:--penalty-mode None --threshold 0,A0=ABFT:--penalty 0 --penalty-mode None,B0=ABFT:--award 0" "$@"
