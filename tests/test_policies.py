"""Each policy keeps what its rule says on a hand-made case."""

from __future__ import annotations

import pytest
import torch

from transfer.policies import make_policy
from transfer.policies.base import LayerView, Selection
from transfer.runner import parse_policies


def view(n=10, attn=None, keys=None, valid=None, heads=1, layer=1, n_layers=None):
    slots = torch.arange(n).expand(1, heads, n)
    keys = keys if keys is not None else torch.zeros(1, heads, n, 4)
    valid = valid if valid is not None else torch.ones(1, heads, n, dtype=torch.bool)
    return LayerView(layer=layer, keys=keys, slots=slots, valid=valid, n_new=n, n_seen=torch.tensor([n]), attn=attn,
                     n_layers=n_layers)


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


def test_l2_leaves_layer_0_uncompressed_and_spreads_its_memory():
    keys = torch.zeros(1, 1, 10, 4)
    keys[0, 0, :, 0] = torch.tensor([5.0, 1, 9, 2, 8, 3, 7, 4, 6, 0.5])
    assert kept(make_policy("l2", budget=4), view(keys=keys, layer=0))[0] is None  # skip_layers=(0,)
    # 4 layers at 60 %: layer 0 keeps 10, so the other three keep (4 * 6 - 10) // 3 = 4 each (mean 6 = 60 %)
    assert kept(make_policy("l2", budget=0.6), view(keys=keys, n_layers=4))[0] == [1, 3, 5, 9]
    assert kept(make_policy("l2", budget=0.6, skip_layers=()), view(keys=keys, n_layers=4, layer=0))[0] == [
        0, 1, 3, 5, 7, 9]  # no skipped layer: the plain 60 % budget, the 6 lowest norms


@pytest.mark.parametrize("name", ["recency", "streaming", "h2o", "snapkv", "l2", "random", "namm-random", "namm",
                                  "namm-sink"])
def test_protected_tokens_are_never_evicted(name):
    """The same protected set (newest W, first S valid tokens) holds for every policy, whatever it scores."""
    n = 64
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(1, 2, n, n, generator=gen).tril()  # a first update: every key is new
    attn = attn / attn.sum(-1, keepdim=True)
    keys = torch.randn(1, 2, n, 4, generator=gen)
    keys[..., :3, :] *= 100  # large norms: L2 would drop the first tokens
    keys[..., -5:, :] *= 100  # ... and the newest ones
    valid = torch.ones(1, 2, n, dtype=torch.bool)
    valid[..., :2] = False  # left padding: the sinks are the first VALID tokens
    if name in ("namm", "namm-sink"):  # the reference rule with parameters that evict (negative output bias)
        from conftest import random_namm_theta

        from transfer.namm import NormStats
        from transfer.policies import POLICIES

        norm = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)
        policy = POLICIES[name](random_namm_theta(), norm, protect_recent=8, protect_sink=3)
    else:
        policy = make_policy(name, budget=0.2, protect_recent=8, protect_sink=3)
    v = LayerView(layer=1, keys=keys, slots=torch.arange(n).expand(1, 2, n), valid=valid, n_new=n,
                  n_seen=torch.tensor([n - 2]), attn=attn, n_layers=4)
    keep, _ = policy.update(v, None)
    index, ok = (keep.index, keep.valid) if isinstance(keep, Selection) else (keep, torch.ones_like(keep).bool())
    assert index.shape[-1] < n - 2  # something is evicted
    for head in range(2):
        kept_slots = set(index[0, head][ok[0, head]].tolist())
        assert {2, 3, 4} <= kept_slots and set(range(n - 8, n)) <= kept_slots, (name, sorted(kept_slots))


def test_namm_sink_keeps_the_first_valid_tokens_on_top_of_the_protected_set():
    from conftest import random_namm_theta

    from transfer.namm import NormStats
    from transfer.policies.namm import NAMMPolicy, NAMMSink

    n = 64
    attn = torch.rand(1, 1, n, n, generator=torch.Generator().manual_seed(3)).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    valid = torch.ones(1, 1, n, dtype=torch.bool)
    valid[..., :2] = False
    v = LayerView(layer=0, keys=torch.zeros(1, 1, n, 4), slots=torch.arange(n).expand(1, 1, n), valid=valid,
                  n_new=n, n_seen=torch.tensor([n - 2]), attn=attn)
    norm = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)
    plain, _ = NAMMPolicy(random_namm_theta(), norm).update(v, None)
    sink, _ = NAMMSink(random_namm_theta(), norm).update(v, None)
    assert not {2, 3, 4, 5} <= set(plain[0, 0].tolist())  # the plain NAMM evicts some of them here ...
    assert {2, 3, 4, 5} <= set(sink[0, 0].tolist())  # ... the sink variant keeps the first 4 valid tokens


def test_protection_is_a_floor_on_the_budget():
    keep, _ = make_policy("recency", budget=2, protect_sink=3).update(view(), None)
    assert keep[0, 0].tolist() == [0, 1, 2]  # the 3 protected sinks stay although the budget says 2
    keep, _ = make_policy("recency", budget=5, protect_sink=3).update(view(), None)
    assert keep[0, 0].tolist() == [0, 1, 2, 8, 9]  # above the floor the budget counts the protected tokens


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


def test_namm_random_controls_are_seeded_at_the_evolved_scale():
    from transfer.checkpoint import load_namm

    theta, norm, _ = load_namm(None)
    a, b, c = (make_policy("namm-random", budget=0.5, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.theta, b.theta) and not torch.equal(a.theta, c.theta)
    assert abs(float(a.theta.std()) / float(theta.std()) - 1) < 0.05  # 4172 draws: std within a few %
    assert torch.equal(a.norm.mean, norm.mean)  # the evolved NAMM's statistics, not new ones
    with pytest.raises(ValueError, match="budget"):
        make_policy("namm-random")


def test_registry_comes_from_class_attributes():
    from transfer.policies import POLICIES

    assert all(name == cls.name for name, cls in POLICIES.items())
    assert {n for n, c in POLICIES.items() if c.budget_rule == "required"} == {
        "recency", "streaming", "h2o", "snapkv", "l2", "random", "namm-random"}
    with pytest.raises(ValueError, match="no budget"):
        make_policy("full", budget=0.5)


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


def test_fraction_budgets_out_of_range_are_errors():
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        kept(make_policy("recency", budget=1.5), view())
    with pytest.raises(ValueError, match=">= 1"):
        kept(make_policy("recency", budget=0), view())


def test_parse_policies_orders_namm_first_and_expands_budgets():
    specs = parse_policies("full,h2o,namm,l2,namm-random", "0.25,match,64t", controls=2)
    assert [s.label for s in specs] == [
        "namm", "full", "h2o@0.25", "h2o@match", "h2o@64t", "l2@0.25", "l2@match", "l2@64t",
        "namm-random:s0@0.25", "namm-random:s1@0.25", "namm-random:s0@match", "namm-random:s1@match",
        "namm-random:s0@64t", "namm-random:s1@64t"]
    assert [s.group for s in specs[-2:]] == ["namm-random@64t"] * 2
    assert parse_policies("namm@0.5")[0].budget == 0.5


@pytest.mark.parametrize("bad", ["-1", "0", "1.5", "2", "512", "0t", "half"])
def test_budgets_are_fractions_or_explicit_token_counts(bad):
    """--budget 1.5 once meant 1 token and 2 meant 2 tokens; now only (0, 1], '512t' or 'match' parse."""
    with pytest.raises(ValueError, match="budget"):
        parse_policies("h2o", bad)


def test_namm_precision_option():
    with pytest.raises(ValueError, match="precision"):
        make_policy("namm", precision="half")
    assert make_policy("namm", precision="fast").precision == "fast"  # fp32 on the CPU, fp16 BAM on CUDA
