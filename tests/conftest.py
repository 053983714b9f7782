"""Shared fixtures. Everything runs offline: the hub is switched off for the whole session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

import pytest
import torch

from abft_lens.models import tiny_model


@pytest.fixture
def tiny_gqa():
    """2 layers, 4 query heads sharing 2 key/value heads, float32."""
    return tiny_model(n_layers=2, n_heads=4, n_kv_heads=2, seed=0)


@pytest.fixture
def tiny_mha():
    """2 layers, 4 heads, plain multi-head attention, float32."""
    return tiny_model(n_layers=2, n_heads=4, n_kv_heads=None, seed=1)


@pytest.fixture
def tiny_gqa64():
    """The GQA tiny model in float64, for gradient checks against plain torch."""
    return tiny_model(n_layers=2, n_heads=4, n_kv_heads=2, seed=0, dtype=torch.float64)
