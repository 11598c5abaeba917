"""A sequence's memory never depends on its batch-mates: batch 1 and batch 8 keep the same tokens.

The NAMM's kept count is the minimum over the heads of ONE sequence (the reference ran batch 1), and a
prompt's update schedule is counted back from its end, so left padding moves no update. On this tiny
fp32 model the decisions, outputs and kept fractions are identical; on larger fp32 models a batch's
different cache layout can still change the last bit of an attention sum (see README, "Batch size").
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_namm_theta, tiny_llama

from adapters.causal_lm import CausalLMAdapter
from transfer.namm import NormStats
from transfer.policies import make_policy
from transfer.policies.namm import NAMMPolicy

NORM = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)
LENGTHS = [320, 300, 257, 320, 190, 288, 311, 224]  # left padding up to 130 tokens


def _prompts() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 97, (1, n), generator=gen) for n in LENGTHS]


def _run(adapter: CausalLMAdapter, policy_factory, prompts: list[torch.Tensor]):
    width = max(p.shape[1] for p in prompts)
    ids = torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0)) for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (width - p.shape[1], 0)) for p in prompts])
    memory = adapter.new_memory(policy_factory(), update_interval=32, record=True)
    out = adapter.generate(memory, ids, mask, max_new_tokens=6)
    return out, memory


def _kept_sets(memory, row: int) -> list[list[set[int]]]:
    """Per update and head: the slots counted from the row's own first token that the row keeps."""
    first = int(memory.n_fed - memory.n_seen[row])  # slot of the row's first valid token
    return [[{s - first for s in head.tolist() if s >= 0} for head in slots[row]] for _, slots in memory.history]


@pytest.mark.parametrize("name", ["namm", "namm@0.3", "h2o", "l2"])
def test_batch_1_and_batch_8_keep_the_same_tokens(name):
    adapter = CausalLMAdapter(tiny_llama())
    if name.startswith("namm"):
        budget = 0.3 if "@" in name else None
        factory = lambda: NAMMPolicy(random_namm_theta(), NORM, budget=budget, protect_recent=8)  # noqa: E731
    else:
        factory = lambda: make_policy(name, budget=0.3, protect_recent=8)  # noqa: E731
    prompts = _prompts()
    out8, mem8 = _run(adapter, factory, prompts)
    assert len(mem8.history) > 10 and any(s.shape[-1] < mem8.n_fed for _, s in mem8.history)  # it evicts
    for i, prompt in enumerate(prompts):
        out1, mem1 = _run(adapter, factory, [prompt])
        assert torch.equal(out1[0], out8[i]), f"row {i}: generated tokens differ"
        assert _kept_sets(mem1, 0) == _kept_sets(mem8, i)[-len(mem1.history):], f"row {i}: kept tokens differ"
        # the kept sets are identical (above); their float64 mean may differ in the last bit (summation order)
        assert float(mem1.kept_fraction()[0]) == pytest.approx(float(mem8.kept_fraction()[i]), abs=1e-12)


def test_a_batch_mate_that_keeps_everything_changes_nothing():
    """The old rule took the minimum over batch x heads: one all-positive row made every row keep all."""
    adapter = CausalLMAdapter(tiny_llama())
    prompt = _prompts()[0]
    _, alone = _run(adapter, lambda: NAMMPolicy(random_namm_theta(), NORM), [prompt])
    _, mixed = _run(adapter, lambda: NAMMPolicy(random_namm_theta(), NORM), [prompt, prompt.flip(1)])
    assert _kept_sets(alone, 0) == _kept_sets(mixed, 0)
