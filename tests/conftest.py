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


def tiny_lm_dir(root):
    """A tiny random Llama + the synthetic tasks' word tokenizer saved as an HF model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.synthetic import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


class Replay:
    """Test-only policy for evict="mask": keep exactly the slots a gather-mode run kept, update by update.

    In mask mode the cache is never gathered, so cache index == slot index and the recorded kept slots
    are the indices to keep. Evicting (gather) must then give the same outputs as masking.
    """

    needs_attention = False
    name = "replay"

    def __init__(self, history):
        self.history = list(history)

    def update(self, view, state):
        from transfer.policies.base import Selection

        layer, kept_slots = self.history.pop(0)  # (batch, kv_heads, n_kept) slots, -1 where not valid
        assert layer == view.layer, "the mask run must see the updates in the gather run's order"
        b, h, n = view.slots.shape
        device = view.slots.device
        kept = torch.zeros(b, h, n + 1, dtype=torch.bool, device=device).scatter_(2, kept_slots + 1, True)[..., 1:]
        return Selection(torch.arange(n, device=device).expand(b, h, n), kept), None


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def namm_theta():
    return random_namm_theta()
