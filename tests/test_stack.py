"""The population fast path: a stack of NAMMs decides exactly as each member alone; the mask-free attention
paths (ordered attention slice, penalised causal SDPA) equal the slot-mask paths they replace."""

from __future__ import annotations

import pytest
import torch
from conftest import random_namm_theta

from train.population import RowGroups, stack_policies
from transfer.memory import _grouped_sdpa, _penalised_causal_sdpa, _slot_mask, attention_slice
from transfer.namm import NAMMParams, NormStats, bam_scores
from transfer.policies.base import LayerView, Selection
from transfer.policies.full import FullCache
from transfer.policies.namm import NAMMPolicy, NAMMStack, stackable

NORM = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)


def _ragged_cache(b: int, h: int, nk: int, n_new: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, valid) of a memory's cache after evictions: ascending slots, left padding on some rows and
    scattered invalid (evicted-surplus) entries among the old keys; the last n_new keys are the new tokens."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(1, 4, (b, h, nk), generator=g)
    slots = gaps.cumsum(-1)
    newest_old = slots[..., : nk - n_new].amax((1, 2))[:, None, None]  # (b, 1, 1): the new tokens follow it
    slots[..., nk - n_new :] = newest_old + torch.arange(1, n_new + 1)  # same slots in every head
    valid = torch.rand(b, h, nk, generator=g) > 0.3
    valid[..., nk - n_new :] = True
    valid[0, :, : nk - n_new] = True  # row 0 all valid
    return slots, valid


@pytest.mark.parametrize("blocks", [False, True])
def test_ordered_slice_equals_slot_comparison_exactly(monkeypatch, blocks):
    from transfer import memory as memory_module

    g = torch.Generator().manual_seed(3)
    b, hq, h, nq, nk, d = 3, 8, 4, 32, 90, 16
    q, k = torch.randn(b, hq, nq, d, generator=g), torch.randn(b, h, nk, d, generator=g)
    slots, valid = _ragged_cache(b, h, nk, nq, 4)
    q_slots = slots[:, 0, nk - nq :]
    q_valid = torch.ones(b, nq, dtype=torch.bool)
    valid[2, :, nk - nq : nk - nq + 5] = False  # row 2: its first five new tokens are padding
    q_valid[2, :5] = False
    if blocks:
        monkeypatch.setitem(memory_module._SLICE_ELEMENTS, "cpu", 2 * 2 * 7 * nk)
    general = attention_slice(q, k, slots, valid, q_slots, q_valid, d**-0.5)
    ordered = attention_slice(q, k, slots, valid, q_slots, q_valid, d**-0.5, ordered=True)
    torch.testing.assert_close(ordered, general, rtol=0, atol=0)
    assert bool((general[~valid[:, :, None, :].expand_as(general)] == 0).all())  # invalid keys get nothing
    assert float(general[1].sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalised_causal_sdpa_equals_the_masked_path(dtype):
    """Invalid keys get exactly zero weight through the extra dimension; valid query rows match the mask."""
    g = torch.Generator().manual_seed(5)
    b, hq, h, n, nk, d = 3, 8, 4, 16, 70, 48
    q = torch.randn(b, hq, n, d, generator=g).to(dtype)
    k, v = (torch.randn(b, h, nk, d, generator=g).to(dtype) for _ in range(2))
    slots, valid = _ragged_cache(b, h, nk, n, 6)
    q_slots = slots[:, 0, nk - n :]
    masked = _grouped_sdpa(q, k, v, _slot_mask(slots, valid, q_slots), d**-0.5)  # (b, n, hq, d)
    penalised = _penalised_causal_sdpa(q, k, v, valid, d**-0.5)
    tol = {"atol": 2e-6, "rtol": 2e-6} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(penalised, masked, **tol)
    # an invalid key's value never leaks in: poison it and nothing changes
    poisoned = v.masked_fill(~valid[..., None], 1e4)
    torch.testing.assert_close(_penalised_causal_sdpa(q, k, poisoned, valid, d**-0.5), penalised, rtol=0, atol=0)


def test_per_row_parameters_score_each_row_with_its_own_network():
    """Row i is scored by network i: bit for bit whatever its batch-mates (each row is its own GEMM), and
    equal to the single-network path up to fp32 rounding (a batched GEMM may sum in another order)."""
    g = torch.Generator().manual_seed(7)
    thetas = torch.stack([random_namm_theta(s) for s in range(4)])
    x = torch.randn(4, 2, 40, 25, generator=g)
    valid = torch.rand(4, 2, 40, generator=g) > 0.2
    stacked = bam_scores(x, NAMMParams.from_flat(thetas), valid)
    other_mates = bam_scores(x[[0, 3]], NAMMParams.from_flat(thetas[[0, 3]]), valid[[0, 3]])
    torch.testing.assert_close(other_mates, stacked[[0, 3]], rtol=0, atol=0)
    for i in range(4):
        alone = bam_scores(x[i : i + 1], NAMMParams.from_flat(thetas[i]), valid[i : i + 1])
        torch.testing.assert_close(stacked[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        other = bam_scores(x[i : i + 1], NAMMParams.from_flat(thetas[(i + 1) % 4]), valid[i : i + 1])
        assert not torch.allclose(stacked[i : i + 1], other, rtol=1e-2, atol=1e-2)


def _view(b: int, h: int, nk: int, n_new: int, seed: int, attn_valid: bool) -> LayerView:
    g = torch.Generator().manual_seed(seed)
    if nk == n_new:  # a new sequence: row 1 left-padded
        slots, valid = torch.arange(nk).expand(b, h, nk).clone(), torch.ones(b, h, nk, dtype=torch.bool)
        valid[1, :, :10] = False
    else:
        slots, valid = _ragged_cache(b, h, nk, n_new, seed)
    if attn_valid:
        valid[:] = True
    attn = torch.rand(b, h, n_new, nk, generator=g) * valid[:, :, None, :]
    attn = attn / attn.sum(-1, keepdim=True)
    return LayerView(layer=0, keys=torch.zeros(b, h, nk, 4), slots=slots, valid=valid, n_new=n_new,
                     n_seen=valid[:, 0].sum(-1), attn=attn, all_valid=attn_valid)


@pytest.mark.parametrize("budget", [None, 0.5])
@pytest.mark.parametrize("all_valid", [True, False])
def test_a_stack_decides_as_each_member_alone(budget, all_valid):
    """Scores, kept tokens and carried buffers of each member's rows are those of the member's own policy."""
    sizes = [2, 1, 3]
    members = [NAMMPolicy(random_namm_theta(s), NORM, budget=budget, protect_recent=4) for s in range(3)]
    stack = NAMMStack.from_policies(members, sizes)
    view = _view(sum(sizes), 2, 64, 64, 11, all_valid)
    state = None
    for step in range(2):  # a second update carries the buffers gathered by the first
        keep, new_state = stack.update(view, state)
        merged = RowGroups(members, sizes).update(view, [None] * 3 if state is None else _split(state, sizes))
        index = keep.index if isinstance(keep, Selection) else keep
        kept, ema = _scattered(keep, new_state.ema, view.valid)
        alone, alone_ema = _scattered(merged[0], torch.cat([st.ema for st in merged[1]]), view.valid)
        assert torch.equal(kept, alone)  # the same tokens kept in every row and head
        assert torch.equal(ema[kept], alone_ema[alone])  # with the same carried features
        assert int(kept.sum()) < int(view.valid.sum())  # it evicts
        state = new_state
        n = index.shape[-1]
        slots = view.slots.gather(-1, index)
        valid = view.valid.gather(-1, index) & (keep.valid if isinstance(keep, Selection) else True)
        nxt = _view(sum(sizes), 2, n + 32, 32, 20 + step, all_valid)
        nxt.slots[..., :n], nxt.valid[..., :n] = slots, valid
        nxt.attn = nxt.attn * nxt.valid[:, :, None, :]
        nxt.all_valid = all_valid and bool(valid.all())
        view = nxt


def _scattered(keep, ema: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept mask (b, h, n), carried EMA scattered back to cache positions (b, h, n, bins)) of a `Keep`."""
    index, ok = (keep.index, keep.valid) if isinstance(keep, Selection) else (keep, torch.ones_like(keep, dtype=bool))
    kept = torch.zeros_like(valid).scatter_(-1, index, ok) & valid
    out = torch.zeros(*valid.shape, ema.shape[-1]).scatter_(2, index[..., None].expand(-1, -1, -1, ema.shape[-1]), ema)
    return kept, out


def _split(state, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(type(state)(context=state.context[start : start + size], ema=state.ema[start : start + size]))
        start += size
    return out


def test_only_policies_that_differ_in_parameters_stack():
    a, b = NAMMPolicy(random_namm_theta(0), NORM), NAMMPolicy(random_namm_theta(1), NORM)
    assert stackable([a, b])
    assert not stackable([a, NAMMPolicy(random_namm_theta(1), NORM, budget=0.5)])
    assert not stackable([a, NAMMPolicy(random_namm_theta(1), NormStats.identity())])
    assert not stackable([a, NAMMPolicy(random_namm_theta(1), NORM, precision="fast")])
    full = FullCache()
    parts, sizes = stack_policies([full, a, b, full, b], [4, 2, 2, 4, 2])
    assert [type(p) for p in parts] == [FullCache, NAMMStack, FullCache, NAMMPolicy] and sizes == [4, 4, 4, 2]
    with pytest.raises(ValueError):
        NAMMStack.from_policies([a, full], [1, 1])
