"""NAMM budget mode: the threshold moves per update so the kept set hits the budget, never above it."""

from __future__ import annotations

import math

import torch
from conftest import random_namm_theta, tiny_llama

from adapters.causal_lm import CausalLMAdapter
from transfer.namm import NormStats
from transfer.policies.base import Selection
from transfer.policies.namm import NAMMPolicy

NORM = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)


def run(budget, n=480, interval=32):
    adapter = CausalLMAdapter(tiny_llama())
    memory = adapter.new_memory(NAMMPolicy(random_namm_theta(), NORM, budget=budget), update_interval=interval,
                                record=True)
    ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(0))
    adapter.prefill(memory, ids, chunk_size=interval)
    return memory


def test_fraction_target_is_met_at_every_update():
    memory = run(0.3)
    for i, (_, kept) in enumerate(memory.history):
        seen = 32 * (i // 2 + 1)  # two layers per update
        assert kept.shape[-1] == math.ceil(0.3 * seen)
    assert abs(memory.kept_fraction().mean().item() - 0.3) < 0.02


def test_token_cap_is_never_exceeded():
    memory = run(100)
    assert all(kept.shape[-1] <= 100 for _, kept in memory.history)
    assert max(memory.cache_tokens()) == 100


def test_no_budget_is_the_reference_rule():
    """Without a budget every update keeps what `namm_update` (the reference rule per sequence) keeps."""
    from transfer.namm import namm_update

    adapter = CausalLMAdapter(tiny_llama())
    inner = NAMMPolicy(random_namm_theta(), NORM)
    checked = []

    class Check:
        needs_attention, name = True, "check"

        def update(self, view, state):
            valid = None if view.all_valid else view.valid
            ref = namm_update(view.attn, state, view.slots, inner.params, NORM, valid=valid)
            keep, new_state = inner.update(view, state)
            ours, ours_valid = (keep.index, keep.valid) if isinstance(keep, Selection) else (keep, None)
            if ours is None:  # everything kept
                assert ref.keep.shape[-1] == view.keys.shape[2] and ref.keep_valid is None
            else:
                assert torch.equal(ours, ref.keep)
                assert (ours_valid is None) == (ref.keep_valid is None)
                if ours_valid is not None:
                    assert torch.equal(ours_valid, ref.keep_valid)
            checked.append(ref.keep.shape[-1])
            return keep, new_state

    memory = adapter.new_memory(Check(), update_interval=32)
    ids = torch.randint(0, 97, (2, 480), generator=torch.Generator().manual_seed(0))
    adapter.prefill(memory, ids, chunk_size=32)
    assert len(checked) == 30 and len(set(checked)) > 1  # 15 updates x 2 layers; the count is emergent
