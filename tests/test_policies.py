"""Each policy keeps what its rule says on a hand-made case."""

from __future__ import annotations

import pytest
import torch

from transfer.memory import LayerView
from transfer.policies import make_policy
from transfer.runner import parse_policies


def view(n=10, attn=None, keys=None, valid=None, heads=1):
    slots = torch.arange(n).expand(1, heads, n)
    keys = keys if keys is not None else torch.zeros(1, heads, n, 4)
    valid = valid if valid is not None else torch.ones(1, heads, n, dtype=torch.bool)
    return LayerView(layer=0, keys=keys, slots=slots, valid=valid, n_new=n, n_seen=torch.tensor([n]), attn=attn)


def kept(policy, v, state=None):
    keep, state = policy.update(v, state)
    return (keep[0, 0].tolist() if keep is not None else None), state


def test_full_keeps_all():
    assert kept(make_policy("full"), view())[0] is None


def test_recency_and_fraction_budget():
    assert kept(make_policy("recency", budget=3), view())[0] == [7, 8, 9]
    assert kept(make_policy("recency", budget=0.5), view())[0] == [5, 6, 7, 8, 9]


def test_streaming_keeps_sinks_and_window():
    assert kept(make_policy("streaming", budget=6, n_sink=2), view())[0] == [0, 1, 6, 7, 8, 9]
    valid = torch.ones(1, 1, 10, dtype=torch.bool)
    valid[..., :3] = False  # left padding: the sinks are the first valid tokens
    assert kept(make_policy("streaming", budget=6, n_sink=2), view(valid=valid))[0] == [3, 4, 6, 7, 8, 9]


def test_l2_keeps_lowest_norms():
    keys = torch.zeros(1, 1, 10, 4)
    keys[0, 0, :, 0] = torch.tensor([5.0, 1, 9, 2, 8, 3, 7, 4, 6, 0.5])
    assert kept(make_policy("l2", budget=4), view(keys=keys))[0] == [1, 3, 5, 9]


def test_h2o_heavy_hitters_plus_recent_and_accumulates():
    attn = torch.zeros(1, 1, 2, 10)
    attn[0, 0, :, 2] = 0.5
    attn[0, 0, :, 4] = 0.3
    attn[0, 0, 0, 0] = 0.1
    policy = make_policy("h2o", budget=4)  # 2 recent + 2 heavy
    keep, state = kept(policy, view(attn=attn))
    assert keep == [2, 4, 8, 9]
    assert state[0, 0].tolist() == pytest.approx([1.0, 0.6, 0.0, 0.0])  # accumulated sums of kept tokens
    # Next update: 3 new tokens; old token 2 has the largest carried sum, 4 is overtaken by new token 10.
    attn2 = torch.zeros(1, 1, 3, 7)
    attn2[0, 0, :, 4] = 0.4  # token at cache index 4 = slot 10
    v2 = LayerView(layer=0, keys=torch.zeros(1, 1, 7, 4), slots=torch.tensor([[[2, 4, 8, 9, 10, 11, 12]]]),
                   valid=torch.ones(1, 1, 7, dtype=torch.bool), n_new=3, n_seen=torch.tensor([13]), attn=attn2)
    keep2, _ = policy.update(v2, state)
    assert keep2.shape == (1, 1, 4)
    assert v2.slots[0, 0, keep2[0, 0]].tolist() == [2, 10, 11, 12]


def test_random_is_seeded_and_sized():
    a = kept(make_policy("random", budget=4, seed=3), view())[0]
    b = kept(make_policy("random", budget=4, seed=3), view())[0]
    assert a == b and len(a) == 4 and a == sorted(a)


def test_padding_evicted_first():
    valid = torch.ones(1, 1, 10, dtype=torch.bool)
    valid[..., :2] = False
    keys = torch.zeros(1, 1, 10, 4)  # padding has the lowest norm but must still go first
    keys[0, 0, 2:, 0] = 1.0
    assert kept(make_policy("l2", budget=8), view(keys=keys, valid=valid))[0] == list(range(2, 10))


def test_parse_policies_orders_namm_first_and_expands_budgets():
    specs = parse_policies("full,h2o,namm,l2", "0.25,match")
    assert [s.label for s in specs] == ["namm", "full", "h2o@0.25", "h2o@match", "l2@0.25", "l2@match"]
    with pytest.raises(ValueError, match="budget"):
        parse_policies("h2o", "-1")


def test_namm_precision_option():
    with pytest.raises(ValueError, match="precision"):
        make_policy("namm", precision="half")
    assert make_policy("namm", precision="fast").precision == "fast"  # fp32 on the CPU, fp16 BAM on CUDA
