"""Shared test utilities."""

from __future__ import annotations

import os

import torch
from torch import nn

# The device the path-users-run parity tests (Session.respond, the CLI, batching) run on:
# ``OMNISTREAM_TEST_DEVICE=cuda pytest tests/test_talker.py tests/test_batch.py`` repeats them on
# a GPU, the reference beside our engine on the same device (conftest turns TF32 off there).
DEVICE = os.environ.get("OMNISTREAM_TEST_DEVICE", "cpu")


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Give every floating parameter and buffer-free weight a random value so that biases and norm
    weights are exercised by parity tests (default inits leave many of them at 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        if "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1.0 + noise)
        else:
            p.copy_(noise)
    return module


def tiny_hf_config(**overrides):
    """The transformers ``Qwen2_5OmniConfig`` for the tiny config (dotted-path overrides)."""
    from transformers import Qwen2_5OmniConfig

    from omnistream.tiny import tiny_config

    return Qwen2_5OmniConfig(**tiny_config(**overrides))
