"""Independent float64 transcription of the BAM NAMM spec (namm-spec.md sections 1-3), for tests only.

Deliberately shares no code with transfer/namm.py: numpy, explicit loops, a direct DFT, a sequential
EMA recursion, an explicit finfo.min-masked attention and a per-head sorted selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_FFT, HOP, GAMMA, REC_DIM, MAX_FREQ, HIDDEN, N_FEAT = 32, 16, 0.99, 8, 50000.0, 32, 25
N_BINS = N_FFT // 2 + 1


@dataclass
class RefState:
    context: np.ndarray  # (b, h, n_keys, 16)
    ema: np.ndarray  # (b, h, n_keys, 17)


def unflatten(theta: np.ndarray) -> dict[str, np.ndarray]:
    """Slice the flat vector by the spec section 3 table (in-major weights)."""
    theta = np.asarray(theta, dtype=np.float64)
    assert theta.shape == (4172,)
    return {
        "w_qkv": theta[0:2400].reshape(25, 96),
        "b_qkv": theta[2400:2496],
        "w_o": theta[2496:4096].reshape(32, 50),
        "b_o": theta[4096:4146],
        "w_m": theta[4146:4171].reshape(25, 1),
        "b_m": theta[4171:4172],
    }


def stft_mag(x: np.ndarray) -> np.ndarray:
    """Direct DFT with a periodic Hann window, center=False: (L,) -> (frames, 17)."""
    n = np.arange(N_FFT)
    win = 0.5 - 0.5 * np.cos(2 * math.pi * n / N_FFT)
    n_frames = 1 + (len(x) - N_FFT) // HOP
    out = np.zeros((n_frames, N_BINS))
    for t in range(n_frames):
        seg = x[t * HOP : t * HOP + N_FFT] * win
        for f in range(N_BINS):
            re = np.sum(seg * np.cos(2 * math.pi * f * n / N_FFT))
            im = -np.sum(seg * np.sin(2 * math.pi * f * n / N_FFT))
            out[t, f] = math.hypot(re, im)
    return out


def recency(pos: np.ndarray, newest: float) -> np.ndarray:
    out = np.zeros((len(pos), REC_DIM))
    for j, p in enumerate(pos):
        r = newest - p + 0
        for i in range(REC_DIM // 2):
            f = MAX_FREQ ** (-i / (REC_DIM // 2))
            out[j, i] = math.sin(r * f)
            out[j, i + REC_DIM // 2] = math.cos(r * f)
    return out


def bam(x: np.ndarray, p: dict[str, np.ndarray], valid: np.ndarray) -> np.ndarray:
    """One (batch, head): x (n, 25) -> scores (n,), backward mask, padding masked with finfo.min."""
    n = x.shape[0]
    qkv = x @ p["w_qkv"] + p["b_qkv"]
    q, k, v = qkv[:, :HIDDEN], qkv[:, HIDDEN : 2 * HIDDEN], qkv[:, 2 * HIDDEN :]
    logits = q @ k.T / math.sqrt(HIDDEN)
    big = np.finfo(np.float64).min
    for i in range(n):
        for j in range(n):
            if j < i or not valid[j]:
                logits[i, j] = big
    logits = logits - logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w = w / w.sum(axis=1, keepdims=True)
    o = (w @ v) @ p["w_o"] + p["b_o"]
    h = x * (1.0 + o[:, N_FEAT:]) + o[:, :N_FEAT]
    return (h @ p["w_m"])[:, 0] + p["b_m"][0]


def select(scores: np.ndarray, valid: np.ndarray, threshold: float = 0.0,
           max_keep: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """scores (b, h, n) -> (kept indices (b, h, n_keep), mask or None), the reference rule per sequence.

    The reference ran at batch 1: each sequence keeps n - min over ITS heads of the negative count. A
    batch holds the largest count; a sequence's surplus entries (its next-best tokens) are masked False.
    """
    b, h, n = scores.shape
    s = np.where(valid, scores, -np.inf)
    per_seq = []
    for bi in range(b):
        counts = []
        for hi in range(h):
            last = max(j for j in range(n) if valid[bi, hi, j]) if valid[bi, hi].any() else n - 1
            s[bi, hi, last] = np.inf
            counts.append(sum(1 for j in range(n) if s[bi, hi, j] < threshold))
        per_seq.append(n - min(counts) if max_keep is None else min(n, max_keep))
    n_keep = max(per_seq)
    keep = np.zeros((b, h, n_keep), dtype=np.int64)
    mask = np.zeros((b, h, n_keep), dtype=bool)
    for bi in range(b):
        for hi in range(h):
            ranked = sorted(range(n), key=lambda j: (-s[bi, hi, j], j))
            keep[bi, hi] = sorted(ranked[:n_keep])
            mask[bi, hi] = [j in ranked[: per_seq[bi]] for j in keep[bi, hi]]
    return keep, (None if mask.all() else mask)


def update(attn: np.ndarray, state: RefState | None, positions: np.ndarray, theta: np.ndarray,
           norm_mean: np.ndarray | None, norm_var: np.ndarray | None, valid: np.ndarray | None = None,
           max_keep: int | None = None) -> dict[str, np.ndarray]:
    """One NAMM update, float64. attn (b, h, n_new, n_keys); returns features, ema, scores, keep, state."""
    attn = np.asarray(attn, dtype=np.float64)
    b, h, n_new, n_keys = attn.shape
    n_old = n_keys - n_new
    n_frames = n_new // HOP
    valid = np.ones((b, h, n_keys), dtype=bool) if valid is None else np.asarray(valid)
    p = unflatten(theta)
    a = GAMMA**HOP
    ema = np.zeros((b, h, n_keys, N_BINS))
    feats = np.zeros((b, h, n_keys, N_FEAT))
    scores = np.zeros((b, h, n_keys))
    tails = np.zeros((b, h, n_keys, N_FFT - HOP))
    for bi in range(b):
        for hi in range(h):
            for k in range(n_keys):
                ctx = state.context[bi, hi, k] if (state is not None and k < n_old) else np.zeros(N_FFT - HOP)
                series = np.concatenate([ctx, attn[bi, hi, :, k]])
                tails[bi, hi, k] = series[-(N_FFT - HOP) :]
                mags = stft_mag(series)
                e = state.ema[bi, hi, k].copy() if (state is not None and k < n_old) else np.zeros(N_BINS)
                for t in range(n_frames):  # sequential EMA, one step per frame, frames that predate k masked
                    m = 1.0 if k < n_old + HOP * (t + 1) else 0.0
                    e = a * e + (1 - a) * m * mags[t]
                ema[bi, hi, k] = e
            pos = positions[bi, hi].astype(np.float64)
            newest = pos[valid[bi, hi]].max() if valid[bi, hi].any() else 0.0
            spec = ema[bi, hi]
            if norm_mean is not None:
                spec = (spec - norm_mean) / np.maximum(np.sqrt(norm_var), 1e-7)
            feats[bi, hi] = np.concatenate([recency(pos, newest), spec], axis=1)
            scores[bi, hi] = bam(feats[bi, hi], p, valid[bi, hi])
    scores = np.where(valid, scores, -np.inf)
    keep, keep_valid = select(scores, valid, 0.0, max_keep)
    new_state = RefState(
        context=np.take_along_axis(tails, keep[..., None], axis=2),
        ema=np.take_along_axis(ema, keep[..., None], axis=2),
    )
    return {"features": feats, "ema": ema, "scores": scores, "keep": keep, "keep_valid": keep_valid,
            "state": new_state}
