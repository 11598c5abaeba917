"""The memory manager reproduces what the model computes: eviction == masking, positions stay right."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Replay, random_namm_theta, tiny_llama

from adapters.causal_lm import CausalLMAdapter
from transfer.namm import NormStats
from transfer.policies import make_policy
from transfer.policies.namm import NAMMPolicy


def _ids(batch=2, n=150, seed=1):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def _policies():
    norm = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)
    return {
        "namm": lambda: NAMMPolicy(random_namm_theta(), norm),
        "h2o": lambda: make_policy("h2o", budget=0.5),
        "l2": lambda: make_policy("l2", budget=40),
        "random": lambda: make_policy("random", budget=0.4),
        "streaming": lambda: make_policy("streaming", budget=0.3),
    }


def test_full_cache_matches_plain_forward_and_generate(llama):
    ids = _ids()
    with torch.no_grad():
        ref_logits = llama(ids).logits[:, -1]
        ref_gen = llama.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    adapter = CausalLMAdapter(llama)
    memory = adapter.new_memory(make_policy("full"), update_interval=32)
    logits = adapter.prefill(memory, ids, chunk_size=20)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    memory = adapter.new_memory(make_policy("full"), update_interval=32)
    assert torch.equal(adapter.generate(memory, ids, max_new_tokens=40), ref_gen)


def test_uniform_eviction_equals_hf_masked_attention():
    """Recency evicts the same tokens in every layer: an independent check with HF eager + a 4D mask."""
    model = tiny_llama()
    ids = _ids(n=130)
    adapter = CausalLMAdapter(model)
    memory = adapter.new_memory(make_policy("recency", budget=40), update_interval=32)
    logits = adapter.prefill(memory, ids, chunk_size=32)
    n = ids.shape[1]
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
    pad = (-n) % 32  # a prompt is left-padded to whole intervals: updates fall 32k tokens before its end
    for boundary in range(32 - pad, n, 32):  # after each update only the newest 40 tokens remain
        allowed[boundary:, : max(boundary - 40, 0)] = False
    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, float("-inf")).expand(2, 1, n, n)
    ref_model = copy.deepcopy(model)
    ref_model.config = copy.deepcopy(model.config)
    ref_model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask).logits[:, -1]
        full = ref_model(ids).logits[:, -1]
    assert torch.allclose(logits, ref, atol=1e-5)
    assert not torch.allclose(logits, full, atol=1e-3)  # eviction really changed the result


@pytest.mark.parametrize("name", list(_policies()))
def test_eviction_equals_masking(name):
    """Per-head/per-layer eviction (gather) gives the same logits as keeping the tokens and masking them."""
    model = tiny_llama()
    adapter = CausalLMAdapter(model)
    ids = _ids(n=150)
    gather = adapter.new_memory(_policies()[name](), update_interval=32, record=True)
    out_gather = adapter.generate(gather, ids, max_new_tokens=20)
    logits_gather = adapter.prefill(gather, out_gather[:, -1:])
    evicted = sum(int(m) for m in gather.cache_tokens()) < len(gather.cache_tokens()) * gather.n_fed
    assert evicted, "the policy should have evicted something in this test"
    masked = adapter.new_memory(Replay(gather.history), update_interval=32, evict="mask")
    out_masked = adapter.generate(masked, ids, max_new_tokens=20)
    logits_masked = adapter.prefill(masked, out_masked[:, -1:])
    assert torch.equal(out_gather, out_masked)
    assert torch.allclose(logits_gather, logits_masked, atol=1e-5)
    # What the memory reports equals what the cache holds: after each layer's last update the cache holds
    # exactly the recorded slots plus the tokens fed since, and the reported kept fraction counts the
    # valid ones over the tokens seen at that update (the prompt's left padding is not seen).
    n_layers = len(gather.cache_tokens())
    fed_since = gather.n_fed % 32
    last = dict(gather.history[-n_layers:])
    for i, (layer, slots) in enumerate(sorted(last.items())):
        assert gather.cache_tokens()[layer] == slots.shape[-1] + fed_since
        expected = (slots >= 0).sum(-1).double().mean(1) / (gather.n_seen - fed_since).double()
        torch.testing.assert_close(gather.kept_log[-n_layers + i], expected)


def test_left_padding_rows_equal_unpadded_runs(llama):
    adapter = CausalLMAdapter(llama)
    a, b = _ids(1, 90, seed=3), _ids(1, 60, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 30, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :30] = 0
    memory = adapter.new_memory(make_policy("full"), update_interval=32)
    out = adapter.generate(memory, batch, mask, max_new_tokens=12)
    for row, ids in ((0, a), (1, b)):
        alone = adapter.generate(adapter.new_memory(make_policy("full"), update_interval=32), ids, max_new_tokens=12)
        assert torch.equal(out[row : row + 1], alone)


def test_kept_fraction_matches_cache_and_cache_shrinks(llama):
    adapter = CausalLMAdapter(llama)
    memory = adapter.new_memory(make_policy("recency", budget=48), update_interval=64)
    adapter.prefill(memory, _ids(1, 256), chunk_size=64)
    assert memory.cache_tokens() == [48, 48]
    assert memory.cache.layers[0].keys.shape[2] == 48
    # time-averaged cache over time-averaged full cache: sum of kept over sum of seen across updates
    assert memory.kept_fraction().item() == pytest.approx((48 + 48 + 48 + 48) / (64 + 128 + 192 + 256))
    memory = adapter.new_memory(make_policy("recency", budget=0.25), update_interval=64)
    adapter.prefill(memory, _ids(1, 256), chunk_size=64)
    assert memory.cache_tokens() == [64, 64]  # ceil(0.25 * 256) at the last update
    assert memory.kept_fraction().item() == pytest.approx(0.25)


def test_snapshot_restore_answers_like_fresh(llama):
    adapter = CausalLMAdapter(llama)
    context, q1, q2 = _ids(1, 100, 5), _ids(1, 7, 6), _ids(1, 9, 7)
    memory = adapter.new_memory(make_policy("h2o", budget=0.5), update_interval=32)
    adapter.prefill(memory, context)
    snap = memory.snapshot()
    first = adapter.generate(memory, q1, max_new_tokens=10)
    memory.restore(snap)
    second = adapter.generate(memory, q2, max_new_tokens=10)
    for q, got in ((q1, first), (q2, second)):
        fresh = adapter.new_memory(make_policy("h2o", budget=0.5), update_interval=32)
        adapter.prefill(fresh, context)
        assert torch.equal(adapter.generate(fresh, q, max_new_tokens=10), got)


def test_bad_inputs():
    adapter = CausalLMAdapter(tiny_llama())
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.new_memory(make_policy("full"), update_interval=100)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru")
    with pytest.raises(ValueError, match="needs a budget"):
        make_policy("h2o")
    memory = adapter.new_memory(make_policy("full"), update_interval=32)
    with pytest.raises(ValueError, match="crosses an update boundary"):
        memory.begin_chunk(40)
    assert memory.chunk_sizes(100, 24) == [24, 8, 24, 8, 24, 8, 4]


def test_sliding_window_model_matches_hf():
    """Mistral-style sliding-window layers: the memory applies the window in its slot mask."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=48)
    model = MistralForCausalLM(cfg).eval()
    ids = _ids(1, 130)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)[:, 130:]
    adapter = CausalLMAdapter(model)
    memory = adapter.new_memory(make_policy("full"), update_interval=32)
    assert torch.equal(adapter.generate(memory, ids, None, 20), ref)


def test_padding_respected_outside_a_memory(llama):
    """Installing the memory attention must not change the model's own padded forward."""
    ids = _ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with torch.no_grad():
        before = llama(ids, attention_mask=mask).logits
    CausalLMAdapter(llama)
    with torch.no_grad():
        after = llama(ids, attention_mask=mask).logits
    assert torch.allclose(before[:, 10:], after[:, 10:], atol=1e-5)


def test_causal_only_slice_equals_general_slice_on_cpu():
    from transfer.memory import attention_slice

    g = torch.Generator().manual_seed(0)
    b, hq, h, nq, nk, d = 2, 8, 2, 32, 100, 16
    q, k = torch.randn(b, hq, nq, d, generator=g), torch.randn(b, h, nk, d, generator=g)
    slots = torch.arange(nk).expand(b, h, nk)
    valid = torch.ones(b, h, nk, dtype=torch.bool)
    q_slots = torch.arange(nk - nq, nk).expand(b, nq)
    q_valid = torch.ones(b, nq, dtype=torch.bool)
    general = attention_slice(q, k, slots, valid, q_slots, q_valid, d**-0.5)
    fast = attention_slice(q, k, slots, valid, q_slots, q_valid, d**-0.5, causal_only=True)
    torch.testing.assert_close(fast, general)
    ref = torch.softmax((q @ k.repeat_interleave(4, 1).transpose(-1, -2)) * d**-0.5
                        + torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq).logical_not() * -1e9, -1)
    torch.testing.assert_close(general, ref.view(b, h, 4, nq, nk).mean(2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal_only", [False, True])
def test_attention_slice_blocks_equal_one_block(monkeypatch, causal_only):
    """Head groups and query blocks (sized for the CPU's cache) change nothing, padding included."""
    from transfer import memory as memory_module
    from transfer.memory import attention_slice

    g = torch.Generator().manual_seed(1)
    b, hq, h, nq, nk, d = 2, 8, 4, 32, 90, 16
    q, k = torch.randn(b, hq, nq, d, generator=g), torch.randn(b, h, nk, d, generator=g)
    slots = torch.arange(nk).expand(b, h, nk)
    valid = torch.ones(b, h, nk, dtype=torch.bool)
    q_valid = torch.ones(b, nq, dtype=torch.bool)
    if not causal_only:
        valid[1, :, :10] = False  # left padding of row 1: keys and queries
        q_valid[1, :3] = False
    q_slots = torch.arange(nk - nq, nk).expand(b, nq)
    whole = attention_slice(q, k, slots, valid, q_slots, q_valid, d**-0.5, causal_only=causal_only)
    monkeypatch.setitem(memory_module._SLICE_ELEMENTS, "cpu", 2 * 2 * 7 * nk)  # 1 head, 7-query blocks
    blocked = attention_slice(q, k, slots, valid, q_slots, q_valid, d**-0.5, causal_only=causal_only)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=0)
