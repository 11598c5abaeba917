"""The fused NAMM features (transfer/fused.py) against the unfused path: attention slice, then the STFT.

Tolerances. Both paths compute the same logits (one GEMM per KV head, the same mask) and the same
exp(logit - max); the fused path accumulates the softmax's sum block by block with a running max
instead of in one pass, so a probability may differ from the slice's by a few fp32 roundings. The STFT
and the EMA are linear in the probabilities (then one sqrt), so features agree to a few ulps of the
largest feature: measured 1 ulp (3e-8 at 0.3). `_close` allows rtol 1e-5 plus 4 ulps of the tensor's
largest value (DFT bins that nearly cancel carry an absolute, not a relative, error).
Scores: the normalisation divides the EMA by its std (0.01 here), so one ulp of a feature is 3e-6 at
the BAM's input, and the BAM amplifies it: perturbing the slice path's own features by random 1e-6
relative noise moves its scores by 3e-4 to 1.4e-3 (scores of order 2 to 8). The fused path's scores
moved at most 4.6e-4, hence rtol = atol = 1e-4. Decisions must then be identical, and the test checks
that they are decidable: no reference score lies closer to the threshold than the largest deviation.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Replay, random_namm_theta, tiny_llama

from adapters.causal_lm import CausalLMAdapter
from transfer import fused
from transfer.fused import AttentionInputs, attention_features, fused_namm_score
from transfer.memory import attention_slice
from transfer.namm import NAMMBuffers, NAMMParams, NormStats, namm_score, select_keep
from transfer.policies.namm import NAMMPolicy, NAMMStack, stackable

NORM = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to fp32 rounding: rtol 1e-5 plus 4 ulps of the largest value (see the module docstring)."""
    ulp = torch.finfo(torch.float32).eps * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=4 * ulp)


def _ragged(b: int, h: int, nk: int, n_new: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, valid) of a memory's cache after evictions: ascending slots, invalid old entries on rows >= 1."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(1, 4, (b, h, nk), generator=g).cumsum(-1)
    newest_old = slots[..., : nk - n_new].amax((1, 2))[:, None, None]
    slots[..., nk - n_new :] = newest_old + torch.arange(1, n_new + 1)
    valid = torch.rand(b, h, nk, generator=g) > 0.3
    valid[..., nk - n_new :] = True
    valid[0] = True
    return slots, valid


def _case(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[AttentionInputs, NAMMBuffers | None]:
    """Inputs as the memory holds them at an update: 'causal' (every key valid), 'ragged' (evicted surplus
    entries, a row whose first new tokens are padding), 'window' (a sliding window: the slot comparison),
    'first' (a new sequence, left padding on row 1, no carried buffers). GQA: 8 query over 2 KV heads."""
    g = torch.Generator().manual_seed(seed)
    b, hq, h, nq, d = 3, 8, 2, 64, 16
    nk = nq if kind == "first" else 150
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype) * 2
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64).to(dtype)
    q_valid = torch.ones(b, nq, dtype=torch.bool)
    if kind == "causal":
        slots, valid = torch.arange(nk).expand(b, h, nk), torch.ones(b, h, nk, dtype=torch.bool)
    elif kind == "first":
        slots, valid = torch.arange(nk).expand(b, h, nk), torch.ones(b, h, nk, dtype=torch.bool)
        valid[1, :, :20] = False
        q_valid[1, :20] = False
    else:
        slots, valid = _ragged(b, h, nk, nq, seed + 1)
        valid[2, :, nk - nq : nk - nq + 5] = False  # row 2: its first five new tokens are padding
        q_valid[2, :5] = False
    inp = AttentionInputs(q, k, slots, valid, slots[:, 0, nk - nq :], q_valid, d**-0.5,
                          sliding_window=40 if kind == "window" else None, causal_only=kind == "causal")
    if kind == "first":
        return inp, None
    bufs = NAMMBuffers(context=torch.rand(b, h, nk - nq, 16, generator=g, dtype=torch.float64).to(dtype) * 1e-2,
                       ema=torch.rand(b, h, nk - nq, 17, generator=g, dtype=torch.float64).to(dtype) * 1e-2)
    return inp, bufs


def _unfused(inp: AttentionInputs, bufs, params, valid):
    attn = attention_slice(inp.queries, inp.keys, inp.slots, inp.valid, inp.q_slots, inp.q_valid, inp.scaling,
                           inp.sliding_window, inp.causal_only, ordered=inp.ordered)
    return namm_score(attn, bufs, inp.slots, params, NORM, valid=valid, check_finite=False)


def _small_blocks(monkeypatch, keys: int, inp: AttentionInputs) -> None:
    """Blocks of `keys` keys (tiles of at most that many) for these inputs."""
    hq, nq = inp.queries.shape[1:3]
    monkeypatch.setattr(fused, "TILE", min(keys, fused.TILE))
    monkeypatch.setitem(fused.BLOCK_ELEMENTS, "cpu", hq * nq * keys)


@pytest.mark.parametrize("kind", ["causal", "ragged", "window", "first"])
@pytest.mark.parametrize("block", [None, 7, 64])
def test_fused_features_and_decisions_equal_the_slice_path(monkeypatch, kind, block):
    inp, bufs = _case(kind)
    if block is not None:  # 7-key blocks straddle the old/new boundary and the future mask
        _small_blocks(monkeypatch, block, inp)
    valid = None if kind == "causal" else inp.valid
    params = NAMMParams.from_flat(random_namm_theta())
    ref_scores, ref_bufs = _unfused(inp, bufs, params, valid)
    scores, got = fused_namm_score(inp, bufs, inp.slots, params, NORM, valid=valid)
    _close(got.ema, ref_bufs.ema)
    _close(got.context, ref_bufs.context)
    fin = torch.isfinite(ref_scores)
    assert torch.equal(torch.isfinite(scores), fin)
    torch.testing.assert_close(scores[fin], ref_scores[fin], rtol=1e-4, atol=1e-4)
    for max_keep in (None, 60):  # the reference rule and budget mode: the same kept tokens
        keep, keep_valid = select_keep(scores, valid, 0.0, max_keep)
        ref_keep, ref_valid = select_keep(ref_scores, valid, 0.0, max_keep)
        assert torch.equal(keep, ref_keep)
        assert (keep_valid is None and ref_valid is None) or torch.equal(keep_valid, ref_valid)
    n_keys = inp.keys.shape[2]
    assert 0 < select_keep(ref_scores, valid)[0].shape[-1] < n_keys  # the rule evicts something here
    # no reference score within the deviation of the threshold: the equal decisions are not luck
    assert float((scores - ref_scores)[fin].abs().max()) < float(ref_scores[fin].abs().min())


def test_float64_inputs():
    inp, bufs = _case("ragged", torch.float64)
    ema, tail = attention_features(inp, bufs)
    params = NAMMParams.from_flat(random_namm_theta().double())
    _, ref = _unfused(inp, bufs, params, inp.valid)
    # both paths take the softmax in float64 and return its GQA mean in fp32: equal at fp32 precision
    _close(ema, ref.ema)
    _close(tail, ref.context)


@pytest.mark.parametrize("kind", ["causal", "ragged", "first"])
def test_forward_lse_gives_the_first_pass_features(monkeypatch, kind):
    """A log-sum-exp from the forward (here: the masked logits' logsumexp) replaces the first pass."""
    inp, bufs = _case(kind)
    _small_blocks(monkeypatch, 16, inp)
    b, hq, nq, d = inp.queries.shape
    h, nk = inp.keys.shape[1:3]
    mask = fused.allowed_keys(inp.slots, inp.valid, inp.q_slots, None)  # (b, h, nq, nk)
    logits = (inp.queries * inp.scaling) @ inp.keys.repeat_interleave(hq // h, 1).transpose(-1, -2)
    logits = logits.masked_fill(~mask.repeat_interleave(hq // h, 1), float("-inf"))
    inp.lse = torch.logsumexp(logits, -1)  # (b, hq, nq); -inf on rows that see nothing
    lse = fused.attention_lse(inp)  # the first pass's normaliser, as a log-sum-exp
    assert torch.equal(torch.isinf(lse), torch.isinf(inp.lse)) and bool(torch.isinf(lse).any()) == (kind == "first")
    torch.testing.assert_close(lse[torch.isfinite(lse)], inp.lse[torch.isfinite(lse)], rtol=1e-6, atol=1e-6)
    ema, tail = attention_features(inp, bufs)
    inp.lse = None
    ref_ema, ref_tail = attention_features(inp, bufs)
    _close(ema, ref_ema)
    _close(tail, ref_tail)


def test_a_row_does_not_depend_on_its_batch_mates(monkeypatch):
    inp, bufs = _case("ragged")
    _small_blocks(monkeypatch, 32, inp)
    params = NAMMParams.from_flat(random_namm_theta())
    scores, got = fused_namm_score(inp, bufs, inp.slots, params, NORM, valid=inp.valid)
    for rows in ([1], [2, 0]):
        sub = NAMMBuffers(bufs.context[rows], bufs.ema[rows])
        part = inp.rows(rows)
        s, st = fused_namm_score(part, sub, part.slots, params, NORM, valid=part.valid)
        torch.testing.assert_close(st.ema, got.ema[rows], rtol=0, atol=0)
        torch.testing.assert_close(s, scores[rows], rtol=0, atol=0)


def test_padding_query_rows_are_zero_and_keys_get_nothing_invalid():
    """A padding query contributes nothing; an invalid key receives nothing (its EMA only decays)."""
    inp, bufs = _case("first")
    ema, tail = attention_features(inp, None)
    assert bool((ema[1, :, :20] == 0).all()) and bool((tail[1, :, :20] == 0).all())  # left padding of row 1
    assert float(ema[1, :, 20:].sum()) > 0 and float(ema[0].sum()) > 0


# ------------------------------------------------------------------------------------------ in the memory


def _ids(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def _run(model, policy, ids, mask=None, interval=32):
    adapter = CausalLMAdapter(model)
    memory = adapter.new_memory(policy, update_interval=interval, record=True)
    out = adapter.generate(memory, ids, mask, max_new_tokens=8)
    return out, memory


@pytest.mark.parametrize("budget", [None, 0.4])
def test_memory_keeps_the_same_tokens_fused_or_not(monkeypatch, budget):
    """End to end on a tiny Llama (GQA 4 over 2), left-padded batch, several blocks: same history, same output."""
    monkeypatch.setattr(fused, "TILE", 8)
    monkeypatch.setitem(fused.BLOCK_ELEMENTS, "cpu", 4 * 32 * 24)  # 24-key blocks
    model = tiny_llama()
    ids = _ids(3, 150)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    calls = []
    features = fused.attention_features
    monkeypatch.setattr(fused, "attention_features", lambda *a, **k: calls.append(1) or features(*a, **k))
    runs = {}
    for flag in (False, True):
        policy = NAMMPolicy(random_namm_theta(), NORM, budget=budget, protect_recent=4, fused=flag)
        runs[flag] = _run(model, policy, ids, mask)
        assert bool(calls) == flag  # the switch picks the path
    (out0, mem0), (out1, mem1) = runs[False], runs[True]
    assert len(mem0.history) == len(mem1.history) > 6
    assert all(torch.equal(a[1], b[1]) for a, b in zip(mem0.history, mem1.history))
    assert any(s.shape[-1] < mem0.n_fed for _, s in mem0.history)  # it evicts
    assert torch.equal(out0, out1)


def test_memory_sliding_window_fused_or_not():
    """Mistral-style sliding-window layers: the fused path applies the window's slot mask, as the slice does."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=48)
    model = MistralForCausalLM(cfg).eval()
    ids = _ids(1, 130)
    hist = []
    for flag in (False, True):
        out, mem = _run(model, NAMMPolicy(random_namm_theta(), NORM, fused=flag), ids)
        hist.append((out, mem.history))
    assert torch.equal(hist[0][0], hist[1][0])
    assert all(torch.equal(a[1], b[1]) for a, b in zip(hist[0][1], hist[1][1]))


@pytest.mark.parametrize("budget", [None, 0.5])
def test_stack_fused_equals_each_member_unfused(budget):
    """A NAMMStack on the fused path keeps, row by row, what its members keep alone on the slice path; the
    replay of its decisions in mask mode gives the same output (the kept tokens are the cache)."""
    model = tiny_llama()
    sizes = [2, 1]
    ids = _ids(3, 140, seed=4)
    members = [NAMMPolicy(random_namm_theta(s), NORM, budget=budget, fused=True) for s in range(2)]
    out, mem = _run(model, NAMMStack.from_policies(members, sizes), ids)
    start = 0
    for member, size in zip(members, sizes):
        alone = NAMMPolicy(member.theta, NORM, budget=budget, fused=False)
        out_alone, mem_alone = _run(model, alone, ids[start : start + size])
        assert torch.equal(out[start : start + size], out_alone)
        for (_, a), (_, b) in zip(mem.history, mem_alone.history):
            kept = [[set(hd.tolist()) - {-1} for hd in row] for row in a[start : start + size]]
            assert kept == [[set(hd.tolist()) - {-1} for hd in row] for row in b]
        start += size
    masked = CausalLMAdapter(model).new_memory(Replay(mem.history), update_interval=32, evict="mask")
    assert torch.equal(CausalLMAdapter(model).generate(masked, ids, None, 8), out)


def test_policy_switch_and_stacking():
    a = NAMMPolicy(random_namm_theta(0), NORM, fused=True)
    assert a.fused_on(torch.device("cpu")) and not NAMMPolicy(random_namm_theta(0), NORM, fused=False).fused_on(
        torch.device("cpu"))
    default = NAMMPolicy(random_namm_theta(0), NORM)
    assert default.fused_on(torch.device("cpu")) == fused.FUSED["cpu"]
    assert not stackable([a, NAMMPolicy(random_namm_theta(1), NORM, fused=False)])
    assert NAMMStack.from_policies([a, NAMMPolicy(random_namm_theta(1), NORM, fused=True)], [1, 1]).fused


def test_statistics_pass_collects_the_same_norm_fused_or_not(monkeypatch):
    """collect_norm (the reference's statistics pass) merges the fused path's EMA like the slice path's; and
    fused=None follows `fused.FUSED` for the device."""
    model = tiny_llama()
    ids = _ids(2, 96, seed=6)
    norms = []
    for flag in (False, None):
        monkeypatch.setitem(fused.FUSED, "cpu", flag is None)  # None: the module default, switched on here
        policy = NAMMPolicy(random_namm_theta(), collect_norm=True, fused=flag)
        assert policy.fused_on(torch.device("cpu")) == (flag is None)
        _run(model, policy, ids)
        norms.append(policy.norm)
    assert norms[0].count == norms[1].count > 0
    # the merged EMA rows differ by a few fp32 ulps (module docstring): relative 1e-5 on the mean, and the
    # variance, a difference of such sums, 1e-4
    torch.testing.assert_close(norms[1].mean, norms[0].mean, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(norms[1].var, norms[0].var, rtol=1e-4, atol=1e-14)


@pytest.mark.parametrize("kind", ["causal", "ragged", "window", "first"])
def test_bf16_probabilities_round_like_the_slice(kind):
    """In bf16 both paths round logits and probabilities to bf16 (HF eager's precision, which feeds the
    reference). A probability whose fp32 value differs in the last bits may round to the neighbouring bf16
    value (one bf16 ulp, 2^-8 relative), so a feature may move by at most about eps_bf16 x its scale; measured
    here: 0 (window, first) or 7.6e-6 against features up to 0.3. The decisions must be equal."""
    inp, bufs = _case(kind, torch.bfloat16)
    bufs = None if bufs is None else NAMMBuffers(bufs.context.float(), bufs.ema.float())
    valid = None if kind == "causal" else inp.valid
    params = NAMMParams.from_flat(random_namm_theta())
    ref_scores, ref = _unfused(inp, bufs, params, valid)
    scores, got = fused_namm_score(inp, bufs, inp.slots, params, NORM, valid=valid)
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(got.ema, ref.ema, rtol=0, atol=eps * float(ref.ema.abs().max()))
    torch.testing.assert_close(got.context, ref.context, rtol=0, atol=eps * float(ref.context.abs().max()))
    for max_keep in (None, 60):
        kept, ref_kept = (select_keep(s, valid, 0.0, max_keep)[0] for s in (scores, ref_scores))
        assert torch.equal(kept, ref_kept)
