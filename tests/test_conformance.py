"""Every registered adapter x every memory policy: the checks an adapter must pass to be trusted.

Cases live in tests/adapter_cases.py (one line per model layout). For each case and each policy in
`transfer.policies.POLICIES` (budgets that really evict):

(a) eviction == masking: a gather run (K/V physically removed) and a mask run replaying the same kept
    slots (K/V kept, masked out of attention) give the same outputs, on a padded batch, across several
    updates and a decode;
(b) positions: with the full policy the chunked feed + decode equals the plain HF forward;
(c) layouts: GQA (kv_heads < heads) and multi-head cases are both present and land in the cache as such;
(d) padding: with the full policy each row of a padded batch equals its own unpadded run;
(e) the kept fraction the memory reports equals the tokens physically in the cache after every update;
(f) eviction really frees memory: the layer K/V tensors and their storage shrink.
"""

from __future__ import annotations

import functools

import pytest
import torch
from adapter_cases import CASES, AdapterCase
from conftest import Replay, random_namm_theta

from adapters import ADAPTERS, adapter_for
from transfer.namm import NormStats
from transfer.policies import POLICIES, make_policy

UPDATE = 32
BUDGETS: dict[str, float | int] = {"recency": 40, "streaming": 0.3, "h2o": 0.5, "l2": 40, "random": 0.4,
                                   "namm-random": 0.5}
CASE_BY_NAME = {c.name: c for c in CASES}


def make_test_policy(name: str):
    """Each registered policy at a setting that evicts on ~150-token inputs (new budgeted ones: 40%)."""
    if name in ("namm", "namm-sink"):  # parameters that evict on these inputs
        norm = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)
        return POLICIES[name](random_namm_theta(), norm)
    if name == "namm-random":
        return make_policy(name, budget=BUDGETS[name], seed=1)
    if name == "l2":  # every layer compressed, so (f) can check each layer shrinks; skip_layers is policy logic
        return make_policy(name, budget=BUDGETS[name], skip_layers=())
    if POLICIES[name].budget_rule == "required":
        return make_policy(name, budget=BUDGETS.get(name, 0.4))
    return make_policy(name)


class Probe:
    """Wraps a policy; at every update reads the physical cache of the layer and the memory's report."""

    def __init__(self, inner):
        self.inner = inner
        self.needs_attention = getattr(inner, "needs_attention", False)
        self.name = getattr(inner, "name", "probe")
        self.memory = None
        self.calls: list[tuple[int, int, torch.Tensor]] = []  # (layer, physical keys before update, n_seen)

    def update(self, view, state):
        physical = self.memory.cache.layers[view.layer].keys
        assert view.keys.data_ptr() == physical.data_ptr(), "the policy must see the cache's own K tensor"
        self.calls.append((view.layer, physical.shape[2] - view.n_new, view.n_seen.clone()))
        return self.inner.update(view, state)


# ---------------------------------------------------------------- shared runs (each computed once)
@functools.cache
def adapter_of(case_name: str):
    case = CASE_BY_NAME[case_name]
    return case.adapter(case.build())


@functools.cache
def batch(case_name: str, padded: bool):
    case = CASE_BY_NAME[case_name]
    long, short = case.lengths
    rows = [case.make_row(long, 1), case.make_row(short if padded else long, 2)]
    return rows, case.collate(rows)


@functools.cache
def gather_run(case_name: str, policy: str, padded: bool):
    adapter = adapter_of(case_name)
    probe = Probe(make_test_policy(policy))
    memory = adapter.new_memory(probe, update_interval=UPDATE, record=True)
    probe.memory = memory
    out = CASE_BY_NAME[case_name].run(adapter, memory, batch(case_name, padded)[1])
    return out, memory, probe


def assert_same_outputs(case: AdapterCase, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    assert got.shape == want.shape
    if case.greedy:
        assert torch.equal(got.argmax(-1), want.argmax(-1)), "greedy tokens differ"
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)


case_params = pytest.mark.parametrize("case", [c.name for c in CASES])
policy_params = pytest.mark.parametrize("policy", list(POLICIES))


# ---------------------------------------------------------------- registry
def test_every_registered_adapter_has_a_case():
    missing = [cls.__name__ for cls in ADAPTERS if not any(c.adapter is cls for c in CASES)]
    assert not missing, f"add a case to tests/adapter_cases.py for {missing}"


def test_model_types_are_served_by_exactly_one_adapter():
    types = [t for cls in ADAPTERS for t in cls.model_types]
    assert len(types) == len(set(types)), f"model types claimed twice: {sorted(types)}"
    for case in CASES:
        model_type = adapter_of(case.name).model.config.model_type
        assert adapter_for(model_type) is case.adapter


# ---------------------------------------------------------------- (a) eviction == masking
@case_params
@policy_params
def test_eviction_equals_masking(case, policy):
    spec = CASE_BY_NAME[case]
    out_gather, gather, _ = gather_run(case, policy, padded=True)
    adapter = adapter_of(case)
    if policy != "full":
        assert sum(gather.cache_tokens()) < len(gather.cache_tokens()) * gather.n_fed, "nothing was evicted"
        full_out = gather_run(case, "full", padded=True)[0]
        assert not torch.allclose(out_gather, full_out, atol=1e-3), "eviction should change the outputs"
    masked = adapter.new_memory(Replay(gather.history), update_interval=UPDATE, evict="mask")
    out_masked = spec.run(adapter, masked, batch(case, True)[1])
    assert masked.cache_tokens() == [masked.n_fed] * len(masked.cache_tokens())  # mask mode never gathers
    assert_same_outputs(spec, out_gather, out_masked)


# ---------------------------------------------------------------- (b) positions
@case_params
def test_full_policy_equals_plain_hf_forward(case):
    spec = CASE_BY_NAME[case]
    out = gather_run(case, "full", padded=False)[0]
    want = spec.reference(spec.build(), batch(case, False)[1])  # fresh model: HF's own attention
    assert_same_outputs(spec, out, want)


# ---------------------------------------------------------------- (c) layouts
def test_cases_cover_gqa_and_multi_head():
    assert any(c.kv_heads < c.heads for c in CASES) and any(c.kv_heads == c.heads for c in CASES)


@case_params
def test_cache_has_the_declared_layout(case):
    spec = CASE_BY_NAME[case]
    _, memory, _ = gather_run(case, "full", padded=False)
    for layer in memory.cache.layers:
        assert layer.keys.shape[:3] == (2, spec.kv_heads, memory.n_fed)
    cfg = adapter_of(case).text_config
    assert cfg.num_attention_heads == spec.heads


# ---------------------------------------------------------------- (d) padding
@case_params
def test_padded_rows_equal_unpadded_runs(case):
    spec = CASE_BY_NAME[case]
    out = gather_run(case, "full", padded=True)[0]
    rows = batch(case, True)[0]
    adapter = adapter_of(case)
    for i, (row, length) in enumerate(zip(rows, spec.lengths)):
        alone = spec.run(adapter, adapter.new_memory(make_test_policy("full"), update_interval=UPDATE),
                         spec.collate([row]))
        assert_same_outputs(spec, spec.row_outputs(out[i], length), spec.row_outputs(alone[0], length))


# ---------------------------------------------------------------- (e) kept fraction == cache contents
@case_params
@policy_params
def test_reported_kept_fraction_matches_cache(case, policy):
    _, memory, probe = gather_run(case, policy, padded=False)
    assert len(probe.calls) == len(memory.kept_log) > 0
    # physical length after update i = the next update's length before its new tokens, or the final cache
    after: list[int] = []
    for i, (layer, _, _) in enumerate(probe.calls):
        later = [before for lay, before, _ in probe.calls[i + 1 :] if lay == layer]
        after.append(later[0] if later else memory.cache_tokens()[layer] - memory.layers[layer].n_new)
    assert len(memory.history) == len(memory.kept_log)
    for (_, _, n_seen), kept, physical, (_, slots) in zip(probe.calls, memory.kept_log, after, memory.history):
        # The cache holds exactly the recorded entries; the reported fraction counts the valid ones (not the
        # left padding a prompt gets up to whole intervals, nor the surplus entries a sequence masks when
        # the NAMM's per-sequence counts differ within a batch) over the tokens each row has seen.
        assert slots.shape[-1] == physical
        valid = (slots >= 0).sum(-1).double().mean(1)  # (batch,) mean over heads
        torch.testing.assert_close(kept * n_seen.double(), valid)
    if policy == "full":
        assert all(float(k.min()) == 1.0 for k in memory.kept_log)


# ---------------------------------------------------------------- (f) memory really shrinks
@case_params
@policy_params
def test_cache_shrinks_in_memory(case, policy):
    _, memory, _ = gather_run(case, policy, padded=False)
    _, full, _ = gather_run(case, "full", padded=False)
    for layer, ref in zip(memory.cache.layers, full.cache.layers):
        for t, t_full in ((layer.keys, ref.keys), (layer.values, ref.values)):
            nbytes = t.untyped_storage().nbytes()
            assert nbytes == t.numel() * t.element_size(), "evicted K/V must not be views of the old buffer"
            if policy == "full":
                assert t.shape == t_full.shape
            else:
                assert t.shape[2] < t_full.shape[2] and nbytes < t_full.untyped_storage().nbytes()


# ---------------------------------------------------------------- family specifics
def test_gpt2_refuses_to_run_past_its_position_table():
    adapter = adapter_of("gpt2")
    memory = adapter.new_memory(make_test_policy("recency"), update_interval=UPDATE)
    ids = torch.zeros(1, 200, dtype=torch.long)
    adapter.prefill(memory, ids)
    fed = memory.n_fed
    with pytest.raises(ValueError, match="256 learned positions"):
        adapter.prefill(memory, ids[:, :60])
    assert memory.n_fed == fed  # nothing was fed half-way


def test_qwen2_sliding_window_layers_match_hf():
    """Sliding-window layers: the memory applies the window in its mask, as HF's own cache and mask do."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from adapters.qwen2 import Qwen2Adapter

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=40, max_window_layers=1,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 120:]
    adapter = Qwen2Adapter(model)
    memory = adapter.new_memory(make_test_policy("full"), update_interval=UPDATE)
    assert torch.equal(adapter.generate(memory, ids, None, 12), ref)


@pytest.mark.parametrize("case", ["gpt2", "qwen2-gqa"])
def test_from_pretrained_loads_a_checkpoint_folder(case, tmp_path):
    spec = CASE_BY_NAME[case]
    spec.build().save_pretrained(tmp_path)
    loaded = spec.adapter.from_pretrained(str(tmp_path))
    inputs = batch(case, False)[1]
    out = spec.run(loaded, loaded.new_memory(make_test_policy("full"), update_interval=UPDATE), inputs)
    assert_same_outputs(spec, out, gather_run(case, "full", padded=False)[0])
    other = "qwen2-gqa" if case == "gpt2" else "gpt2"
    with pytest.raises(ValueError, match="model, not"):
        CASE_BY_NAME[other].adapter.from_pretrained(str(tmp_path))
