"""Shared fixtures: tiny random-weight models built here (no hub), a random NAMM."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def tiny_llama(seed: int = 0, kv_heads: int = 2, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=4096,
    )
    return LlamaForCausalLM(cfg).eval()


def random_namm_theta(seed: int = 0, scale: float = 0.3) -> torch.Tensor:
    """Random BAM parameters with a negative output bias, so that some tokens score below zero."""
    from transfer.namm import PARAM_SIZE

    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(PARAM_SIZE, generator=g) * scale
    theta[-1] = -0.2
    return theta


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def namm_theta():
    return random_namm_theta()
