"""Fidelity tests of transfer/namm.py against the float64 spec transcription in tests/namm_reference.py."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from transfer.checkpoint import DEFAULT_NAMM, inspect_namm, load_namm, resolve_namm, save_namm
from transfer.namm import (
    N_BINS,
    PARAM_SIZE,
    NAMMBuffers,
    NAMMConfig,
    NAMMParams,
    NormStats,
    bam_scores,
    ema_update,
    namm_update,
    normalise,
    param_size,
    recency_features,
    select_keep,
    stft_magnitudes,
)

try:
    from tests import namm_reference as ref
except ImportError:  # tests/ collected as a rootdir-less folder
    import namm_reference as ref

B, H, G, N_NEW = 2, 2, 2, 32
RTOL = {1e-4: 1e-5, 1e-9: 1e-12}  # fp32 vs fp64 reference: scores reach |s| ~ 100


def causal_attn(gen: torch.Generator, q_pos: torch.Tensor, k_pos: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """GQA-averaged softmax attention of queries at q_pos over keys at k_pos, causal by absolute position.

    q_pos (b, h, n_new), k_pos (b, h, n_keys) -> (b, h, n_new, n_keys).
    """
    b, h, n_new = q_pos.shape
    n_keys = k_pos.shape[-1]
    logits = 2.0 * torch.randn(b, h, G, n_new, n_keys, generator=gen, dtype=torch.float64)
    allowed = k_pos[:, :, None, None, :] <= q_pos[:, :, None, :, None]  # (b, h, 1, n_new, n_keys)
    if valid is not None:
        allowed = allowed & valid[:, :, None, None, :]
    probs = logits.masked_fill(~allowed, -math.inf).softmax(-1).nan_to_num(0.0)  # padded queries: zeros
    return probs.mean(2).float()  # GQA average over the G query heads of each KV head


def random_theta(gen: torch.Generator, scale: float = 0.3) -> torch.Tensor:
    return scale * torch.randn(PARAM_SIZE, generator=gen, dtype=torch.float64)


def random_norm(gen: torch.Generator) -> NormStats:
    mean = 0.02 * torch.rand(N_BINS, generator=gen, dtype=torch.float64)
    var = 1e-4 + 1e-3 * torch.rand(N_BINS, generator=gen, dtype=torch.float64)
    return NormStats(mean, var, 1000)


def first_positions(gen: torch.Generator, n: int) -> torch.Tensor:
    """Increasing absolute positions with random gaps, shared by the heads of each batch row: (B, H, n)."""
    steps = torch.randint(1, 4, (B, 1, n), generator=gen)
    start = torch.randint(0, 500, (B, 1, 1), generator=gen)
    return (start + steps.cumsum(-1)).expand(B, H, n).contiguous()


def centre_bias(theta: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Shift b_m so that half of the reference scores are negative (a test that evicts something)."""
    theta = theta.clone()
    theta[-1] = 0.0
    s = ref.update(*args, theta=theta.numpy(), **kwargs)["scores"]
    theta[-1] = -float(np.median(s[np.isfinite(s)]))
    return theta


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---------------------------------------------------------------------------------------------------- (1)


def test_stft_equals_torch_stft():
    gen = torch.Generator().manual_seed(0)
    cfg = NAMMConfig()
    series = torch.rand(2, 3, 5, 64, generator=gen)
    context = torch.rand(2, 3, 5, cfg.n_fft - cfg.hop, generator=gen)
    ours = stft_magnitudes(series, context, cfg)  # (2, 3, 5, frames, bins)
    full = torch.cat([context, series], -1).reshape(-1, 64 + 16)
    want = torch.stft(full, n_fft=32, hop_length=16, win_length=32, window=torch.hann_window(32, periodic=True),
                      center=False, normalized=False, onesided=True, return_complex=True).abs()
    want = want.transpose(-1, -2).reshape(2, 3, 5, 4, N_BINS)
    assert ours.shape == (2, 3, 5, 4, N_BINS)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-5)


def test_pieces_against_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(80, generator=gen, dtype=torch.float64)
    ours = stft_magnitudes(x[16:], x[:16])
    np.testing.assert_allclose(ours.numpy(), ref.stft_mag(x.numpy()), atol=1e-12)
    pos = torch.tensor([3, 10, 500, 30000, 30001], dtype=torch.long)
    rec = recency_features(pos, dtype=torch.float64)
    np.testing.assert_allclose(rec.numpy(), ref.recency(pos.numpy(), 30001.0), atol=1e-12)
    assert rec[-1, :4].abs().max() == 0 and (rec[-1, 4:] == 1).all()  # newest token: age 0


def test_ema_matches_sequential_recursion():
    gen = torch.Generator().manual_seed(2)
    cfg = NAMMConfig()
    mags = torch.rand(1, 1, 6, 2, N_BINS, generator=gen, dtype=torch.float64)  # 6 keys, 2 frames, n_new=32
    prev = torch.rand(1, 1, 3, N_BINS, generator=gen, dtype=torch.float64)
    got = ema_update(mags, prev, n_new=3, cfg=cfg)
    a = 0.99**16
    for k in range(6):
        e = prev[0, 0, k] if k < 3 else torch.zeros(N_BINS, dtype=torch.float64)
        for t in range(2):
            e = a * e + (1 - a) * (k < 3 + 16 * (t + 1)) * mags[0, 0, k, t]
        torch.testing.assert_close(got[0, 0, k], e, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------- (2)


def _two_updates(dtype: torch.dtype, atol: float, valid_first: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(3)
    theta = random_theta(gen)
    norm = random_norm(gen)
    nm, nv = norm.mean.numpy(), norm.var.numpy()
    pos1 = first_positions(gen, N_NEW)
    attn1 = causal_attn(gen, pos1, pos1, valid_first)
    theta = centre_bias(theta, as_np(attn1), None, pos1.numpy(), norm_mean=nm, norm_var=nv,
                        valid=None if valid_first is None else valid_first.numpy())
    theta = theta.float().double()  # both sides use the same (fp32-representable) parameters
    params = NAMMParams.from_flat(theta.to(dtype))
    r1 = ref.update(as_np(attn1), None, pos1.numpy(), theta.numpy(), nm, nv,
                    valid=None if valid_first is None else valid_first.numpy())
    u1 = namm_update(attn1.to(dtype), None, pos1, params, norm, valid=valid_first)
    for key in ("ema", "scores"):
        got = getattr(u1, key)
        fin = np.isfinite(r1[key])
        np.testing.assert_allclose(as_np(got)[fin], r1[key][fin], atol=atol, rtol=RTOL[atol], err_msg=key)
        assert np.array_equal(np.isfinite(as_np(got)), fin)
    np.testing.assert_array_equal(u1.keep.numpy(), r1["keep"])
    _assert_same_mask(u1.keep_valid, r1["keep_valid"])
    assert 0 < u1.keep.shape[-1] < N_NEW  # the case evicts something and keeps something
    np.testing.assert_allclose(as_np(u1.buffers.ema), r1["state"].ema, atol=atol, rtol=RTOL[atol])
    np.testing.assert_allclose(as_np(u1.buffers.context), r1["state"].context, atol=1e-6, rtol=0)

    # second update: kept old keys (carried context/EMA) + N_NEW new keys
    old_pos = pos1.gather(-1, u1.keep)
    steps = torch.randint(1, 3, (B, 1, N_NEW), generator=gen)
    new_pos = (pos1.amax(-1, keepdim=True)[:, :1] + steps.cumsum(-1)).expand(B, H, N_NEW)
    pos2 = torch.cat([old_pos, new_pos], -1)
    valid2 = None
    if valid_first is not None or u1.keep_valid is not None:
        old_valid = torch.ones(B, H, N_NEW, dtype=torch.bool) if valid_first is None else valid_first
        old_valid = old_valid.gather(-1, u1.keep)
        if u1.keep_valid is not None:  # a sequence's surplus entries are evicted by masking
            old_valid = old_valid & u1.keep_valid
        valid2 = torch.cat([old_valid, torch.ones(B, H, N_NEW, dtype=torch.bool)], -1)
    attn2 = causal_attn(gen, new_pos, pos2, valid2)
    r2 = ref.update(as_np(attn2), r1["state"], pos2.numpy(), theta.numpy(), nm, nv,
                    valid=None if valid2 is None else valid2.numpy())
    u2 = namm_update(attn2.to(dtype), u1.buffers, pos2, params, norm, valid=valid2)
    fin = np.isfinite(r2["scores"])
    np.testing.assert_allclose(as_np(u2.ema), r2["ema"], atol=atol, rtol=RTOL[atol])
    np.testing.assert_allclose(as_np(u2.scores)[fin], r2["scores"][fin], atol=atol, rtol=RTOL[atol])
    np.testing.assert_array_equal(u2.keep.numpy(), r2["keep"])
    _assert_same_mask(u2.keep_valid, r2["keep_valid"])
    assert u2.keep.shape[-1] < pos2.shape[-1]
    np.testing.assert_allclose(as_np(u2.buffers.ema), r2["state"].ema, atol=atol, rtol=RTOL[atol])
    np.testing.assert_allclose(as_np(u2.buffers.context), r2["state"].context, atol=1e-6, rtol=0)
    return u1, r1


def _assert_same_mask(ours: torch.Tensor | None, reference: np.ndarray | None) -> None:
    assert (ours is None) == (reference is None)
    if ours is not None:
        np.testing.assert_array_equal(ours.numpy(), reference)


def test_update_matches_reference_fp32():
    u1, r1 = _two_updates(torch.float32, atol=1e-4)
    # features are visible through the scorer; check the normalised inputs separately too
    assert r1["features"].shape == (B, H, N_NEW, 25)


def test_update_matches_reference_fp64_tight():
    _two_updates(torch.float64, atol=1e-9)


def test_update_matches_reference_with_left_padding():
    valid = torch.ones(B, H, N_NEW, dtype=torch.bool)
    valid[1, :, :5] = False  # batch row 1 is left-padded
    valid[0, 1, :2] = False
    _two_updates(torch.float32, atol=1e-4, valid_first=valid)


def test_bf16_attention_is_computed_in_fp32():
    gen = torch.Generator().manual_seed(4)
    pos = first_positions(gen, N_NEW)
    attn = causal_attn(gen, pos, pos).bfloat16()
    theta = random_theta(gen)
    norm = random_norm(gen)
    u = namm_update(attn, None, pos, NAMMParams.from_flat(theta.float()), norm)
    assert u.scores.dtype == torch.float32 and u.ema.dtype == torch.float32
    r = ref.update(as_np(attn.float()), None, pos.numpy(), theta.numpy(), norm.mean.numpy(), norm.var.numpy())
    np.testing.assert_allclose(as_np(u.scores), r["scores"], atol=1e-4, rtol=0)


def test_bam_padding_does_not_leak():
    """Changing a padded token's features must not change any valid token's score."""
    gen = torch.Generator().manual_seed(5)
    params = NAMMParams.from_flat(random_theta(gen).float())
    x = torch.randn(1, 1, 10, 25, generator=gen)
    valid = torch.ones(1, 1, 10, dtype=torch.bool)
    valid[..., 7] = False
    s1 = bam_scores(x, params, valid)
    x2 = x.clone()
    x2[..., 7, :] = 100.0 * torch.randn(25, generator=gen)
    s2 = bam_scores(x2, params, valid)
    torch.testing.assert_close(s1[valid], s2[valid], atol=1e-6, rtol=0)
    assert not torch.allclose(bam_scores(x, params), bam_scores(x2, params))  # without the mask it leaks


# ---------------------------------------------------------------------------------------------------- (3)-(6)


def test_zero_params_keep_everything():
    gen = torch.Generator().manual_seed(6)
    pos = first_positions(gen, N_NEW)
    u = namm_update(causal_attn(gen, pos, pos), None, pos, NAMMParams.from_flat(torch.zeros(PARAM_SIZE)),
                    random_norm(gen))
    assert (u.scores == 0).all()
    assert torch.equal(u.keep, torch.arange(N_NEW).expand(B, H, N_NEW))
    torch.testing.assert_close(u.buffers.ema, u.ema)


def test_newest_always_kept():
    gen = torch.Generator().manual_seed(7)
    pos = first_positions(gen, N_NEW)
    theta = torch.zeros(PARAM_SIZE)
    theta[-1] = -5.0  # every score negative -> only the forced newest token survives
    params = NAMMParams.from_flat(theta)
    u = namm_update(causal_attn(gen, pos, pos), None, pos, params, random_norm(gen))
    assert torch.equal(u.keep, torch.full((B, H, 1), N_NEW - 1))
    valid = torch.ones(B, H, N_NEW, dtype=torch.bool)
    valid[1, :, -3:] = False  # right padding: the newest valid token is index N_NEW - 4
    u = namm_update(causal_attn(gen, pos, pos, valid), None, pos, params, random_norm(gen), valid=valid)
    assert u.keep[0].flatten().tolist() == [N_NEW - 1] * H and u.keep[1].flatten().tolist() == [N_NEW - 4] * H


def test_keep_count_rule_hand_made():
    scores = torch.tensor([[[1.0, -1.0, 2.0, -3.0, 0.5],       # 2 negative
                            [-1.0, -2.0, -3.0, 4.0, -5.0]]])   # 3 negative + forced newest
    keep, mask = select_keep(scores, None, 0.0)
    # d = min(2, 3) = 2 -> both heads keep 3 = max non-negative count
    assert keep.tolist() == [[[0, 2, 4], [0, 3, 4]]] and mask is None
    assert select_keep(scores, None, 1.5)[0].tolist() == [[[2, 4], [3, 4]]]  # threshold shifts the count
    valid = torch.tensor([[[False, True, True, True, True], [True, True, True, True, True]]])
    # padding turns head 0 index 0 (score 1) into -inf, counted as negative: d = 3
    assert select_keep(scores, valid, 0.0)[0].tolist() == [[[2, 4], [3, 4]]]


def test_keep_count_is_per_sequence():
    """d is the minimum over the heads of ONE sequence: a batch-mate that keeps everything changes nothing."""
    scores = torch.tensor([[[1.0, -1.0, 2.0, -3.0, 0.5],
                            [-1.0, -2.0, -3.0, 4.0, -5.0]]])
    alone, _ = select_keep(scores, None, 0.0)
    keep, mask = select_keep(torch.cat([scores, torch.ones(1, 2, 5)], 0), None, 0.0)
    assert keep.shape == (2, 2, 5)  # the batch holds the larger count ...
    assert mask[1].all()  # ... the all-positive sequence keeps everything ...
    assert torch.equal(keep[0][mask[0]].view(2, -1), alone[0])  # ... and the first keeps exactly its own 3
    assert mask[0].sum(-1).tolist() == [3, 3]


def test_budget_cap():
    gen = torch.Generator().manual_seed(8)
    scores = torch.randn(B, H, 40, generator=gen)
    full, mask = select_keep(scores, None)
    ref_keep, ref_mask = ref.select(scores.double().numpy(), np.ones((B, H, 40), bool))
    np.testing.assert_array_equal(full.numpy(), ref_keep)
    _assert_same_mask(mask, ref_mask)
    for cap in (1, 5, 17, 40, 100):
        keep, mask = select_keep(scores, None, max_keep=cap)
        assert mask is None
        assert keep.shape[-1] == min(cap, 40)  # exactly the budget: the threshold moves up or down
        assert (keep[..., -1] == 39).all()  # newest survives any budget
        forced = scores.clone()
        forced[..., -1] = math.inf
        top = forced.topk(keep.shape[-1], dim=-1).indices.sort(-1).values
        assert torch.equal(keep, top)
    assert select_keep(scores, None, max_keep=10**6)[0].shape[-1] == 40
    with pytest.raises(ValueError, match="max_keep"):
        select_keep(scores, None, max_keep=0)


def test_budget_in_update_matches_reference():
    gen = torch.Generator().manual_seed(9)
    theta = random_theta(gen)
    norm = random_norm(gen)
    pos = first_positions(gen, N_NEW)
    attn = causal_attn(gen, pos, pos)
    u = namm_update(attn, None, pos, NAMMParams.from_flat(theta.float()), norm, max_keep=7)
    r = ref.update(as_np(attn), None, pos.numpy(), theta.numpy(), norm.mean.numpy(), norm.var.numpy(), max_keep=7)
    assert u.keep.shape[-1] <= 7
    np.testing.assert_array_equal(u.keep.numpy(), r["keep"])


# ---------------------------------------------------------------------------------------------------- (7)


def test_params_layout_round_trip():
    theta = torch.arange(PARAM_SIZE, dtype=torch.float32)
    p = NAMMParams.from_flat(theta)
    assert param_size() == PARAM_SIZE
    assert p.w_qkv.shape == (25, 96) and p.w_o.shape == (32, 50) and p.w_m.shape == (25, 1)
    assert p.w_qkv[3, 7] == 3 * 96 + 7 and p.b_qkv[0] == 2400 and p.w_o[1, 2] == 2496 + 52
    assert p.b_o[0] == 4096 and p.w_m[24, 0] == 4170 and p.b_m[0] == 4171
    assert torch.equal(p.flat(), theta)
    with pytest.raises(ValueError, match="4172"):
        NAMMParams.from_flat(torch.zeros(4171))


def test_checkpoint_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(10)
    theta = random_theta(gen).float()
    norm = random_norm(gen)
    cfg = NAMMConfig()
    out = save_namm(tmp_path / "namm", theta, norm, cfg, {"seed": 1, "cmd": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["namm.json", "namm.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    for path in (out, out / "namm.safetensors"):
        theta2, norm2, cfg2 = load_namm(path)
        assert torch.equal(theta2, theta) and cfg2 == cfg and norm2.count == 1000
        torch.testing.assert_close(norm2.mean, norm.mean, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(norm2.var, norm.var, atol=1e-9, rtol=1e-6)
    info = inspect_namm(out)
    assert info["param_count"] == PARAM_SIZE and info["provenance"]["seed"] == 1 and info["norm"]["count"] == 1000
    # overwrite in place stays atomic and readable
    save_namm(out, torch.zeros(PARAM_SIZE), None, cfg, {})
    theta3, norm3, _ = load_namm(out)
    assert (theta3 == 0).all() and norm3.count == 0
    with pytest.raises(ValueError, match="4172"):
        save_namm(tmp_path / "bad", torch.zeros(10), None, cfg, {})
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="JSON"):
        save_namm(tmp_path / "bad", theta, None, cfg, {"x": object()})
    assert not (tmp_path / "bad").exists()


def _reference_ckpt(theta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, prefix: str = "") -> dict:
    state = {"mean": theta, "best_member": theta + 1, "sigma": torch.tensor(0.065), "g": 12}
    for which in ("stored_buffers_to_save", "best_stored_buffers_to_save"):
        base = f"{which}.token_embedding_0_"
        for kind in ("output_", "online_new_output_"):
            state[base + kind + "mean"] = mean.float().reshape(1, 1, 1, N_BINS)
            state[base + kind + "var"] = var.float().reshape(1, 1, 1, N_BINS)
            state[base + kind + "num"] = torch.full((1, 1, 1, 1), 777, dtype=torch.int64)
    state = {prefix + k: v for k, v in state.items()}
    return {"evolution_state": state, "iter_num": 40, "best_val_loss": 0.5}


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_reference_checkpoint_import(tmp_path, prefix):
    gen = torch.Generator().manual_seed(11)
    theta = random_theta(gen).float()
    norm = random_norm(gen)
    path = tmp_path / "iter_40.pt"
    torch.save(_reference_ckpt(theta, norm.mean, norm.var, prefix), path)
    theta2, norm2, cfg = load_namm(path)
    assert torch.equal(theta2, theta) and cfg == NAMMConfig() and norm2.count == 777
    torch.testing.assert_close(norm2.mean, norm.mean, atol=1e-7, rtol=1e-6)
    info = inspect_namm(path)
    assert info["format"] == "evo-memory-torch" and info["provenance"]["iter_num"] == 40


def test_checkpoint_errors(tmp_path):
    gen = torch.Generator().manual_seed(12)
    norm = random_norm(gen)
    bad_size = _reference_ckpt(torch.zeros(4000), norm.mean, norm.var)
    torch.save(bad_size, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="4172"):
        load_namm(tmp_path / "a.pt")
    missing = _reference_ckpt(torch.zeros(PARAM_SIZE), norm.mean, norm.var)
    del missing["evolution_state"]["stored_buffers_to_save.token_embedding_0_output_var"]
    torch.save(missing, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="output_var"):
        load_namm(tmp_path / "b.pt")
    torch.save({"model": 1}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="evolution_state"):
        load_namm(tmp_path / "c.pt")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown NAMM checkpoint format"):
        load_namm(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError):
        load_namm(tmp_path / "nope")
    out = save_namm(tmp_path / "ok", torch.zeros(PARAM_SIZE), norm, NAMMConfig(), {})
    meta = json.loads((out / "namm.json").read_text())
    meta["config"]["bogus"] = 1
    (out / "namm.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="bogus"):
        load_namm(out)


# ---------------------------------------------------------------------------------------------------- (8)-(9)


def test_norm_stats_merge_equals_concatenated():
    gen = torch.Generator().manual_seed(13)
    chunks = [torch.rand(2, 3, n, N_BINS, generator=gen) * (i + 1) for i, n in enumerate((5, 9, 4))]
    valids = [torch.rand(2, 3, c.shape[2], generator=gen) > 0.3 for c in chunks]
    stats = NormStats.empty()
    for c, v in zip(chunks, valids):
        stats = stats.merge(c, v)
    rows = torch.cat([c[v] for c, v in zip(chunks, valids)]).double()
    assert stats.count == rows.shape[0]
    torch.testing.assert_close(stats.mean, rows.mean(0), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(stats.var, rows.var(0, correction=0), atol=1e-12, rtol=1e-10)
    unmasked = NormStats.empty().merge(chunks[0], None)
    assert unmasked.count == 2 * 3 * 5
    assert stats.merge(chunks[0], torch.zeros(2, 3, 5, dtype=torch.bool)) is stats  # nothing valid: unchanged


def test_bad_inputs_raise():
    gen = torch.Generator().manual_seed(14)
    params = NAMMParams.from_flat(torch.zeros(PARAM_SIZE))
    pos = first_positions(gen, 24)
    with pytest.raises(ValueError, match="multiple of hop"):
        namm_update(torch.rand(B, H, 24, 24), None, pos, params, None)
    attn = torch.rand(B, H, 16, 16)
    attn[0, 0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="attention contains NaN"):
        namm_update(attn, None, pos[..., :16], params, None)
    with pytest.raises(ValueError, match="n_keys == n_new"):
        namm_update(torch.rand(B, H, 16, 32), None, first_positions(gen, 32), params, None)
    bufs = NAMMBuffers(torch.zeros(B, H, 3, 16), torch.zeros(B, H, 3, N_BINS))
    with pytest.raises(ValueError, match="old keys"):
        namm_update(torch.rand(B, H, 16, 32), bufs, first_positions(gen, 32), params, None)


def test_key_chunking_matches_single_pass(monkeypatch):
    """Long caches run the STFT/EMA in key chunks; the result must not depend on the chunk size."""
    import transfer.namm as namm

    gen = torch.Generator().manual_seed(15)
    pos1 = first_positions(gen, 48)
    params = NAMMParams.from_flat(random_theta(gen).float())
    norm = random_norm(gen)
    u1 = namm_update(causal_attn(gen, pos1, pos1), None, pos1, params, norm, max_keep=40)
    new_pos = (pos1.amax(-1, keepdim=True) + torch.arange(1, 33)).expand(B, H, 32)
    pos2 = torch.cat([pos1.gather(-1, u1.keep), new_pos], -1)  # 40 old + 32 new keys
    attn2 = causal_attn(gen, new_pos, pos2)
    whole = namm_update(attn2, u1.buffers, pos2, params, norm)
    monkeypatch.setattr(namm, "_KEY_CHUNK", 7)  # chunks straddle the old/new boundary
    chunked = namm_update(attn2, u1.buffers, pos2, params, norm)
    torch.testing.assert_close(chunked.ema, whole.ema, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.scores, whole.scores, atol=1e-5, rtol=1e-6)
    assert torch.equal(chunked.keep, whole.keep)


def test_missing_norm_warns_once(monkeypatch):
    import transfer.namm as namm

    monkeypatch.setattr(namm, "_warned_no_norm", False)
    gen = torch.Generator().manual_seed(16)
    pos = first_positions(gen, 16)
    attn = causal_attn(gen, pos, pos)
    params = NAMMParams.from_flat(torch.zeros(PARAM_SIZE))
    with pytest.warns(UserWarning, match="no normalisation statistics"):
        u_none = namm_update(attn, None, pos, params, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u_empty = namm_update(attn, None, pos, params, NormStats.empty())  # second time: silent
    torch.testing.assert_close(u_none.ema, u_empty.ema)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    from fp16_error import decidable

    gen = torch.Generator().manual_seed(17)
    pos = first_positions(gen, 64)
    attn = causal_attn(gen, pos, pos)
    theta = random_theta(gen).float()
    norm = random_norm(gen)
    theta[-1] = 0.0  # centre the output bias: about half the scores negative, so eviction is decided
    theta[-1] = -float(namm_update(attn, None, pos, NAMMParams.from_flat(theta), norm).scores.median())
    params = NAMMParams.from_flat(theta)
    gpu = namm_update(attn.cuda().bfloat16(), None, pos.cuda(), params, norm)
    cpu_bf = namm_update(attn.bfloat16(), None, pos, params, norm)
    assert gpu.keep.device.type == "cuda" and gpu.scores.dtype == torch.float32
    atol, rtol = 1e-3, 1e-4
    torch.testing.assert_close(gpu.scores.cpu(), cpu_bf.scores, atol=atol, rtol=rtol)
    # scores equal within that tolerance must give the same decision wherever the tolerance cannot flip it
    surely_kept, surely_dropped = decidable(cpu_bf.scores, atol + rtol * cpu_bf.scores.abs())
    kept = kept_mask(gpu).cpu()
    assert 0 < int(kept_mask(cpu_bf).sum()) < kept.numel()  # the case evicts something
    assert kept[surely_kept].all() and not kept[surely_dropped].any()
    assert bool((surely_kept | surely_dropped).all())  # this case has no decision within the tolerance


@pytest.mark.parametrize("key_chunk", [5, 8192])
def test_spectral_ema_equals_stft_then_ema(monkeypatch, key_chunk):
    """spectral_ema (chunked) and its conv2d form equal |STFT| of each key's series followed by the EMA."""
    from transfer import namm

    monkeypatch.setattr(namm, "_KEY_CHUNK", key_chunk)
    gen = torch.Generator().manual_seed(11)
    b, h, n_new, n_old = 2, 3, 48, 13
    attn = torch.rand(b, h, n_new, n_old + n_new, generator=gen, dtype=torch.float64)  # not causal: mask matters
    context = torch.rand(b, h, n_old + n_new, 16, generator=gen, dtype=torch.float64)
    prev = torch.rand(b, h, n_old, 17, generator=gen, dtype=torch.float64)
    want = ema_update(stft_magnitudes(attn.transpose(-1, -2), context), prev, n_new)
    torch.testing.assert_close(namm.spectral_ema(attn, context, prev), want, rtol=1e-12, atol=1e-12)
    # the CUDA path (one conv2d over hop blocks), run here on the CPU
    conv = namm._conv_spectral_ema(attn, context, n_old, NAMMConfig())
    torch.testing.assert_close(conv, ema_update(stft_magnitudes(attn.transpose(-1, -2), context), None, n_new),
                               rtol=1e-12, atol=1e-12)


def kept_mask(u) -> torch.Tensor:
    """(batch, heads, n_keys) True where an update keeps the token (a sequence's surplus entries excluded)."""
    src = torch.ones_like(u.keep, dtype=torch.bool) if u.keep_valid is None else u.keep_valid
    return torch.zeros(u.scores.shape, dtype=torch.bool, device=u.keep.device).scatter_(-1, u.keep, src)


def test_fp16_error_bound_holds_for_emulated_half_attention():
    """The bound the CUDA fp16 test uses (tests/fp16_error.py), checked against exact fp16 emulation.

    It must hold for fp16 roundings and must fail for bf16 ones (8x coarser): a bound that cannot fail
    would prove nothing on the GPU.
    """
    from fp16_error import LAMBDA, decidable, emulate_half_bam, fp16_sigma

    gen = torch.Generator().manual_seed(21)
    n = 384
    logits = 3 * torch.randn(1, 2, n, n, generator=gen)
    attn = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    pos = torch.arange(n).expand(1, 2, n)
    theta = 0.3 * torch.randn(PARAM_SIZE, generator=gen)
    theta[-1] = -0.2
    params = NAMMParams.from_flat(theta)
    norm = NormStats(torch.full((N_BINS,), 0.01), torch.full((N_BINS,), 1e-4), 100)
    u = namm_update(attn, None, pos, params, norm)
    x = torch.cat([recency_features(pos, NAMMConfig()), normalise(u.ema, norm)], -1)
    bound = LAMBDA * fp16_sigma(x, params)
    half = emulate_half_bam(x, params)
    torch.testing.assert_close(emulate_half_bam(x, params, torch.float32), u.scores, atol=1e-4, rtol=1e-5)
    assert bool(((half - u.scores).abs() <= bound).all())
    assert float((half - u.scores).abs().max()) > 1e-3  # the roundings do move the scores
    assert not bool(((emulate_half_bam(x, params, torch.bfloat16) - u.scores).abs() <= bound).all())
    surely_kept, surely_dropped = decidable(u.scores, bound)
    kept, kept_half = kept_mask(u), kept_mask(select_keep_update(half, u))
    assert kept[surely_kept].all() and not kept[surely_dropped].any()
    assert not (kept != kept_half)[surely_kept | surely_dropped].any()
    assert 0 < int(kept.sum()) < kept.numel() and float((surely_kept | surely_dropped).float().mean()) > 0.9


def select_keep_update(scores: torch.Tensor, like):
    """A stand-in update holding the reference selection on other scores (for kept_mask)."""
    from types import SimpleNamespace

    keep, keep_valid = select_keep(scores, None)
    return SimpleNamespace(scores=like.scores, keep=keep, keep_valid=keep_valid)


def test_checkpoint_refuses_non_finite_values(tmp_path):
    cfg = NAMMConfig()
    theta = torch.zeros(PARAM_SIZE)
    theta[5] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        save_namm(tmp_path / "a", theta, None, cfg, {})
    from safetensors.torch import save_file

    out = save_namm(tmp_path / "b", torch.zeros(PARAM_SIZE), None, cfg, {})
    save_file({"theta": theta, "norm_mean": torch.zeros(N_BINS), "norm_var": torch.ones(N_BINS)},
              str(out / "namm.safetensors"))
    with pytest.raises(ValueError, match="1 NaN or inf"):
        load_namm(out)
    norm = NormStats(torch.zeros(N_BINS), torch.full((N_BINS,), math.inf), 5)
    save_namm(tmp_path / "c", torch.zeros(PARAM_SIZE), norm, cfg, {})
    with pytest.raises(ValueError, match="finite"):
        load_namm(tmp_path / "c")


def test_default_checkpoint_is_resolved_in_one_place():
    assert resolve_namm(None) == DEFAULT_NAMM == resolve_namm("")
    assert resolve_namm("x/y") == Path("x/y")
    if (DEFAULT_NAMM / "namm.safetensors").is_file():
        assert torch.equal(load_namm()[0], load_namm(DEFAULT_NAMM)[0])
    assert NormStats.empty().mean.shape == (NAMMConfig().n_bins,) and NormStats.empty().count == 0
    wide = NAMMConfig(n_fft=64, hop=32)
    assert NormStats.identity(wide).var.tolist() == [1.0] * 33 and param_size(wide) != PARAM_SIZE
