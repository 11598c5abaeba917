"""The NAMM's attention features straight from the buffered queries and the cached keys, block by block.

The unfused update materialises the attention slice (`transfer.memory.attention_slice`: every buffered
query's softmax over every cached key, GQA-averaged; (batch, kv_heads, n_q, n_keys) fp32) and then reads
it back for the STFT. Here the keys go in blocks: for each block the logits of the buffered queries are
computed (model dtype, queries pre-scaled, masked exactly as `attention_slice` masks them), normalised
with each query row's softmax normaliser, averaged over the query heads of each KV head, and reduced at
once into those keys' STFT-magnitude EMA (`spectral_ema_chunk`, the unfused path's own code) and their
carried tail of attention samples. The transient memory is one block of logits, whatever the cache length.

A row's softmax normaliser depends on every key, so it is known before the blocks only if the forward's
attention kernel returned it (`AttentionInputs.lse`, the log-sum-exp flash kernels compute anyway);
otherwise a first pass over the same blocks computes it (per block a max and a sum of exponentials per
row, then one reduction over the blocks). Numerically the probabilities are exp(logit - max) * (1 / sum)
like torch.softmax's, with the sum accumulated in another order: equal to fp32 rounding, and so are the
features (tests/test_fused.py). Without a forward-provided normaliser the logits GEMM runs twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transfer.namm import (
    NAMMBuffers,
    NAMMConfig,
    NAMMParams,
    NormStats,
    _check_inputs,
    carried_context,
    score_features,
    spectral_ema_chunk,
)

# logits per block and batch row (q_heads x queries x keys): on the CPU small enough for the processor's
# cache, on CUDA a bound on the transient memory (256 MiB of fp32 logits per row)
BLOCK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 19}
# The default of NAMMPolicy(fused=None), per device type: the fused features or the attention slice + STFT.
# On the CPU without a forward-provided log-sum-exp the fused path runs the logits GEMM twice; see
# docs/performance.md for the side-by-side measurement behind this choice.
FUSED = {"cpu": False, "cuda": False}
DEFAULT_CONFIG = NAMMConfig()
# "torch": the blocks above; "triton": transfer/fused_triton.py's one kernel per key tile where it applies
# (CUDA compiled, CPU tensors in Triton's interpreter), else the torch blocks. Off until measured on a GPU.
KERNEL = "torch"
TILE = 32  # blocks are a multiple of this many keys


@dataclass
class AttentionInputs:
    """What the attention the NAMM reads is computed from, as the memory holds it at an update."""

    queries: Tensor  # (batch, q_heads, n_q, head_dim) buffered queries, post-positional, unscaled
    keys: Tensor  # (batch, kv_heads, n_keys, head_dim) the cache, the last n_q keys being the queries' tokens
    slots: Tensor  # (batch, kv_heads, n_keys) absolute token index of each key
    valid: Tensor  # (batch, kv_heads, n_keys) False for padding / masked-out keys
    q_slots: Tensor  # (batch, n_q)
    q_valid: Tensor  # (batch, n_q) False for padding queries (their rows are zero)
    scaling: float
    sliding_window: int | None = None
    causal_only: bool = False  # every key valid, no window: only the queries' own block is masked
    ordered: bool = True  # keys in token order with the queries' tokens last (the memory's cache)
    # (batch, q_heads, n_q) log-sum-exp of each query's scaled, masked logits, when the forward's kernel
    # returned it; None: a first pass over the keys computes the normaliser
    lse: Tensor | None = None

    def rows(self, index: Tensor | slice) -> AttentionInputs:
        """The inputs of some batch rows (a row's features never depend on the others)."""
        return AttentionInputs(
            self.queries[index], self.keys[index], self.slots[index], self.valid[index], self.q_slots[index],
            self.q_valid[index], self.scaling, self.sliding_window, self.causal_only, self.ordered,
            None if self.lse is None else self.lse[index])


def allowed_keys(slots: Tensor, valid: Tensor, q_slots: Tensor, sliding_window: int | None) -> Tensor:
    """(batch, kv_heads, n_q, n_keys) bool: the key is valid, not newer than the query, inside the window."""
    k = slots[:, :, None, :]  # (batch, kv_heads, 1, n_keys)
    q = q_slots[:, None, :, None]  # (batch, 1, n_q, 1)
    allowed = (k <= q) & valid[:, :, None, :]
    if sliding_window is not None:
        allowed &= q - k < sliding_window
    return allowed


def block_keys(inp: AttentionInputs) -> int:
    """Keys per block: about `BLOCK_ELEMENTS` logits per batch row, a multiple of `TILE`.

    Not divided by the batch size: the first pass's sums then fall in the same blocks whatever the
    batch, so a row's result does not depend on its batch-mates (the transient memory grows with the batch).
    """
    hq, nq = inp.queries.shape[1:3]
    return max(1, BLOCK_ELEMENTS["cuda" if inp.queries.is_cuda else "cpu"] // (hq * nq * TILE)) * TILE


def _masked_logits(inp: AttentionInputs, q: Tensor, k0: int, k1: int, future: Tensor | None) -> Tensor:
    """Logits of keys [k0, k1) with `attention_slice`'s mask: (batch, kv_heads, g, n_q, k1 - k0), model dtype.

    q (batch, kv_heads, g, n_q, d) pre-scaled queries. One GEMM per KV head over its g query heads.
    """
    b, h, g, nq, d = q.shape
    nk = inp.keys.shape[2]
    logits = torch.matmul(q.reshape(b, h, g * nq, d), inp.keys[:, :, k0:k1].transpose(-1, -2))
    logits = logits.view(b, h, g, nq, k1 - k0)
    if future is not None:  # ordered: invalid keys, and the future among the queries' own last n_q keys
        if not inp.causal_only:
            logits.masked_fill_(~inp.valid[:, :, None, None, k0:k1], float("-inf"))
        lo = max(k0, nk - nq)
        if lo < k1:
            logits[..., lo - k0 :].masked_fill_(future[:, lo - (nk - nq) : k1 - (nk - nq)], float("-inf"))
    else:
        allowed = allowed_keys(inp.slots[..., k0:k1], inp.valid[..., k0:k1], inp.q_slots, inp.sliding_window)
        logits.masked_fill_(~allowed[:, :, None], float("-inf"))
    return logits


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax's precision: fp32 for half and single precision (as torch.softmax), else float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normaliser(inp: AttentionInputs, q: Tensor, step: int, future: Tensor | None) -> tuple[Tensor, Tensor]:
    """(shift, inverse sum) per query row, (batch, kv_heads, g, n_q, 1) fp32: p = exp(logit - shift) * inv.

    From the forward's log-sum-exp when given (inv 1), else a first pass over the key blocks: each block
    gives a max and a sum of exponentials per row, and one reduction over the blocks gives the row's. The
    block size does not depend on the batch size (`block_keys`), so a row's normaliser, bit for bit, does
    not depend on its batch-mates. Rows that see no key (padding queries) get inv 0, so their
    probabilities are 0 (the slice's nan_to_num).
    """
    b, h, g, nq, _ = q.shape
    acc = _accumulation_dtype(q.dtype)
    if inp.lse is not None:
        lse = inp.lse.to(acc).reshape(b, h, g, nq, 1)
        seen = torch.isfinite(lse)
        return lse.masked_fill(~seen, 0.0), seen.to(acc)
    if KERNEL == "triton":
        from transfer import fused_triton

        if fused_triton.supported(inp, DEFAULT_CONFIG):
            return fused_triton.normaliser(inp)
    nk = inp.keys.shape[2]
    maxima, sums = [], []
    for k0 in range(0, nk, step):
        x = _masked_logits(inp, q, k0, min(k0 + step, nk), future).to(acc)  # (batch, kv_heads, g, n_q, keys)
        m = x.amax(-1, keepdim=True)
        maxima.append(m)
        sums.append(x.sub_(m.masked_fill(m == float("-inf"), 0.0)).exp_().sum(-1, keepdim=True))
    block_max, block_sum = torch.cat(maxima, -1), torch.cat(sums, -1)  # (batch, kv_heads, g, n_q, blocks)
    m = block_max.amax(-1, keepdim=True)
    shift = m.masked_fill(m == float("-inf"), 0.0)
    s = (block_sum * torch.exp(block_max - shift)).sum(-1, keepdim=True)  # blocks that see nothing: 0
    return shift, torch.where(s > 0, 1.0 / s, 0.0)


def attention_lse(inp: AttentionInputs) -> Tensor:
    """(batch, q_heads, n_q) log-sum-exp of each buffered query's scaled, masked logits (-inf: sees no key),
    as a flash kernel returns it; from the first pass over the key blocks."""
    b, hq, nq, d = inp.queries.shape
    h = inp.keys.shape[1]
    q = (inp.queries * inp.scaling).reshape(b, h, hq // h, nq, d)
    shift, inv = _normaliser(inp, q, block_keys(inp), _future(inp))
    lse = torch.where(inv > 0, shift - inv.log(), float("-inf"))
    return lse.reshape(b, hq, nq)


def _future(inp: AttentionInputs) -> Tensor | None:
    """(n_q, n_q) True above the diagonal when the keys are ordered (the mask's causal block), else None."""
    nq = inp.queries.shape[2]
    if inp.causal_only or (inp.ordered and inp.sliding_window is None):
        return torch.ones(nq, nq, dtype=torch.bool, device=inp.queries.device).triu_(1)
    return None


def attention_features(inp: AttentionInputs, buffers: NAMMBuffers | None,
                       cfg: NAMMConfig = DEFAULT_CONFIG) -> tuple[Tensor, Tensor]:
    """(ema (batch, kv_heads, n_keys, bins), tail (batch, kv_heads, n_keys, n_fft - hop)) of every cached key.

    What `namm_score` computes from `attention_slice(...)`, without the slice: per block of keys the
    probabilities (in the model's dtype, as the slice returns them), their GQA mean in fp32 (padding
    queries zero), then the STFT-magnitude EMA and the last n_fft - hop samples of those keys.
    """
    queries, keys = inp.queries, inp.keys
    b, hq, nq, d = queries.shape
    h, nk = keys.shape[1], keys.shape[2]
    g = hq // h
    q = (queries * inp.scaling).reshape(b, h, g, nq, d)  # scaled before the product, as the slice does
    future = _future(inp)
    step = block_keys(inp)
    shift, inv = _normaliser(inp, q, step, future)
    weight = inp.q_valid[:, None, :, None] / g  # (batch, 1, n_q, 1): GQA mean, padding queries zero
    context, ema_prev = carried_context(buffers, (b, h, nq, nk), queries.device, torch.float32, cfg)
    if KERNEL == "triton":
        from transfer import fused_triton

        if fused_triton.supported(inp, cfg):
            return fused_triton.features(inp, shift, inv, context, ema_prev, cfg)
    emas, tails = [], []
    for k0 in range(0, nk, step):
        k1 = min(k0 + step, nk)
        x = _masked_logits(inp, q, k0, k1, future)
        p = x.to(shift.dtype).sub_(shift).exp_().mul_(inv)  # (batch, kv_heads, g, n_q, keys)
        if queries.dtype in (torch.float16, torch.bfloat16):
            p = p.to(queries.dtype)  # HF eager's probabilities are in the model's dtype
        attn = p.sum(2, dtype=torch.float32).mul_(weight)  # (batch, kv_heads, n_q, keys)
        emas.append(spectral_ema_chunk(attn, context, ema_prev, k0, nk, cfg))
        recent = attn[..., -cfg.context_len :, :].transpose(-1, -2)  # (batch, kv_heads, keys, <= context)
        tails.append(torch.cat([context[..., k0:k1, :], recent], dim=-1)[..., -cfg.context_len :])
    return torch.cat(emas, dim=-2), torch.cat(tails, dim=-2)


def fused_namm_score(
    inp: AttentionInputs,
    buffers: NAMMBuffers | None,
    positions: Tensor,
    params: NAMMParams,
    norm: NormStats | None,
    cfg: NAMMConfig = DEFAULT_CONFIG,
    valid: Tensor | None = None,
    attention_dtype: torch.dtype | None = None,
) -> tuple[Tensor, NAMMBuffers]:
    """`namm_score(attention_slice(...), ...)` with the features from `attention_features`: (scores, buffers)."""
    b, hq, nq = inp.queries.shape[:3]
    h, nk = inp.keys.shape[1], inp.keys.shape[2]
    if hq % h:
        raise ValueError(f"{hq} query heads do not group over {h} KV heads")
    shape = torch.empty(b, h, nq, nk, device="meta")  # the slice's shape, for the shared input checks
    _check_inputs(shape, buffers, positions, valid, cfg, finite=False)
    ema, tail = attention_features(inp, buffers, cfg)
    return score_features(ema, tail, positions, params, norm, cfg, valid, attention_dtype)


def fused_default(device: torch.device) -> bool:
    """The module default for a device type (`FUSED`); unknown device types take the slice."""
    return FUSED.get(device.type, False)
