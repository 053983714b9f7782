"""Evaluation: label-word probabilities, StaICC metrics, robustness, out-of-domain datasets."""
