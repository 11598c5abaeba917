"""How far fp16 BAM attention may move the NAMM's scores and keep decisions (a test helper).

`bam_scores(..., attention_dtype=float16)` rounds exactly five things to fp16 (unit roundoff u = 2^-11):
q, k and v before the kernel, the probabilities before they multiply v (flash kernels cast them, after
exp and before P @ V) and the attention output. Logits, softmax statistics, projections, gate and head
stay fp32 (relative error ~6e-8, negligible here). Each rounding multiplies a value by (1 + delta) with
|delta| <= u, so to first order a score moves by

    ds_i = sum over roundings r of c_ir * delta_r,

with coefficients c_ir computed below from the fp32 forward pass (softmax linearised:
dp_ij = p_ij (dl_ij - sum_k p_ik dl_ik)). Rounding errors are modelled as independent, zero-mean and
bounded by u (the probabilistic rounding-error model of Higham & Mary, SIAM J. Sci. Comput. 2019), so
Hoeffding's inequality gives P(|ds_i| >= lam * sigma_i) <= 2 exp(-lam^2 / 2) with
sigma_i^2 = u^2 * sum_r c_ir^2. With lam = 6 that is 3e-8 per score: over the 8192 scores of the GPU test
a false failure has probability below 3e-4. On that test's inputs an exact fp16 emulation moves the
scores by at most 1.5 sigma (max 0.30; the H200 measured max 0.14-0.29), so the bound has a 4x margin
and still catches an 8x precision loss (bf16 rounding reaches ~12 sigma).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transfer.namm import NAMMParams

U_FP16 = 2.0**-11
LAMBDA = 6.0


def _split(x: Tensor, params: NAMMParams) -> tuple[NAMMParams, Tensor, Tensor, Tensor]:
    p = NAMMParams(*(t.to(x.device, x.dtype) for t in params.blocks()))
    d = p.w_o.shape[0]
    qkv = x @ p.w_qkv + p.b_qkv
    return p, qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]


def _backward_probs(q: Tensor, k: Tensor) -> Tensor:
    """BAM attention probabilities: token i attends to j >= i. (..., n, n)."""
    n, d = q.shape[-2], q.shape[-1]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    older = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
    return logits.masked_fill(older, -math.inf).softmax(-1)


def fp16_sigma(x: Tensor, params: NAMMParams) -> Tensor:
    """sigma_i of the module docstring for features x (batch, heads, n, F) -> (batch, heads, n), float64."""
    x = x.double()
    p, q, k, v = _split(x, params)
    d, n_feat = q.shape[-1], x.shape[-1]
    probs = _backward_probs(q, k)  # (b, h, n, n)
    out = probs @ v  # (b, h, n, hidden)
    # score gain of each output unit: s = (x * (1 + o_gate) + o_res) @ w_m, o = out @ w_o + b_o
    g = ((p.w_o[:, n_feat:] * x[..., None, :] + p.w_o[:, :n_feat]) @ p.w_m).squeeze(-1)  # (b, h, n, hidden)
    z = g @ v.transpose(-1, -2)  # z_ij = g_i . v_j: what key j's value adds to score i
    zbar = (out * g).sum(-1, keepdim=True)
    c = probs * (z - zbar) / math.sqrt(d)  # d score_i / d logit_ij
    terms = (
        ((q * (c @ k)) ** 2).sum(-1)  # q rounding: one delta per (i, m), shared by all keys
        + (q**2 * ((c**2) @ (k**2))).sum(-1)  # k rounding: one delta per (j, m)
        + (g**2 * ((probs**2) @ (v**2))).sum(-1)  # v rounding
        + (probs**2 * z**2).sum(-1)  # probabilities rounded before P @ V
        + (g**2 * out**2).sum(-1)  # output rounding
    )
    return U_FP16 * terms.sqrt()


def emulate_half_bam(x: Tensor, params: NAMMParams, dtype: torch.dtype = torch.float16) -> Tensor:
    """The BAM scores with the five roundings of the fp16 kernel done explicitly (CPU, float32)."""
    x = x.float()
    p, q, k, v = _split(x, params)
    n_feat = x.shape[-1]
    q, k, v = (t.to(dtype).float() for t in (q, k, v))
    out = (_backward_probs(q, k).to(dtype).float() @ v).to(dtype).float()
    o = out @ p.w_o + p.b_o
    h = x * (1.0 + o[..., n_feat:]) + o[..., :n_feat]
    return (h @ p.w_m).squeeze(-1) + p.b_m


def decidable(scores: Tensor, bound: Tensor) -> tuple[Tensor, Tensor]:
    """(surely kept, surely dropped) under the reference rule when every score may move by `bound`.

    The rule of `select_keep`: the newest token is forced, each sequence keeps n - d with d the minimum
    over its heads of #(score < 0), each head its top tokens. Errors within the bound allow
    a kept count in [n_lo, n_hi]; token i is surely kept when fewer than n_lo tokens can outrank it, surely
    dropped when at least n_hi tokens outrank it whatever the errors. (batch, heads, n) -> two bool masks.
    """
    s, b = scores.double().clone(), bound.double().clone()
    s[..., -1], b[..., -1] = math.inf, 0.0  # the newest token (no padding in these tests)
    n = s.shape[-1]
    n_lo = (n - (s - b < 0).sum(-1).amin(-1))[:, None, None]
    n_hi = (n - (s + b < 0).sum(-1).amin(-1))[:, None, None]
    lo, hi = s - b, s + b
    possibly_above = (hi[..., None, :] >= lo[..., :, None]).sum(-1) - 1  # minus the token itself
    certainly_above = (lo[..., None, :] > hi[..., :, None]).sum(-1)
    return possibly_above < n_lo, certainly_above >= n_hi
