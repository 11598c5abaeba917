"""One Triton kernel for the fused NAMM features: logits, softmax, GQA mean, STFT magnitudes and EMA per key tile.

`transfer.fused.attention_features` computes each block of probabilities with torch and hands it to the
STFT code, so a block still reaches memory. Here one program owns BLOCK_K keys of one (batch row, KV head)
and walks the buffered queries one hop (16 queries) at a time: the hop's probabilities (all g query
heads' logits against the tile's keys, masked as the slice masks them, exp(logit - shift) * inv from
the normaliser, rounded to the model's dtype like the slice's, GQA mean, padding queries zero) stay in
registers, each STFT frame is two hops times the windowed DFT basis (as matrix products), and its
magnitudes go straight into the EMA accumulator. Only the features (bins) and the tail (last hop) of
each key are written. The normaliser comes from the forward (log-sum-exp) or, without it, from a second
kernel (`normaliser`: per 16 query rows an online max and sum over the keys, as a flash forward keeps).

Supported: the memory's ordered cache (invalid keys and the queries' own block masked; no sliding window)
and the released STFT geometry (n_fft = 2 * hop, hop = 16). Anything else stays on the torch path.
fp32 products run at IEEE precision (no TF32), so the features equal the torch path to fp32 rounding.
On CPU tensors the kernel runs in Triton's interpreter, only when it is on (TRITON_INTERPRET=1, or the
tests' knob); on CUDA compiled. Triton is optional.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU CI has no Triton; fused.py then never calls this module
    triton = None
    tl = None

HOP = 16
BLOCK_K = 32  # keys per program


def available() -> bool:
    return triton is not None


def _features_kernel(
    q_ptr, k_ptr, shift_ptr, inv_ptr, weight_ptr, valid_ptr, ctx_ptr, basis_ptr, frame_w_ptr, ema_ptr, tail_ptr,
    NQ, NK, N_OLD, D,
    H: tl.constexpr, G: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program (key tile, batch row x KV head): ema (batch, h, n_keys, 17) and tail (batch, h, n_keys, 16)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    hq0 = bh * G  # first query head of this KV head: (b * H + h) * G
    keys = tile * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    key_in = keys < NK
    j = tl.arange(0, 16)  # sample within a hop
    dims = tl.arange(0, D_PAD)
    # the key tile, transposed for the products: (D_PAD, BLOCK)
    kt = tl.load(k_ptr + (bh * NK + keys[None, :]) * D + dims[:, None],
                 mask=key_in[None, :] & (dims[:, None] < D), other=0.0)
    ok = tl.load(valid_ptr + bh * NK + keys, mask=key_in, other=0) != 0  # (BLOCK,)
    rows32 = tl.arange(0, 32)
    w_re0 = tl.load(basis_ptr + (0 * 32 + rows32[:, None]) * 16 + j[None, :])  # (32, 16), rows >= 17 zero
    w_re1 = tl.load(basis_ptr + (1 * 32 + rows32[:, None]) * 16 + j[None, :])
    w_im0 = tl.load(basis_ptr + (2 * 32 + rows32[:, None]) * 16 + j[None, :])
    w_im1 = tl.load(basis_ptr + (3 * 32 + rows32[:, None]) * 16 + j[None, :])
    # hop 0: the carried context of each key, (16, BLOCK)
    prev = tl.load(ctx_ptr + (bh * NK + keys[None, :]) * 16 + j[:, None], mask=key_in[None, :], other=0.0)
    acc = tl.zeros((32, BLOCK), dtype=tl.float32)
    n_frames = NQ // 16
    first_new = NK - NQ  # the queries' own keys start here
    for t in range(0, n_frames):
        rows = t * 16 + j  # (16,) query index
        p = tl.zeros((16, BLOCK), dtype=tl.float32)
        for g in range(G):
            qh = hq0 + g
            qt = tl.load(q_ptr + ((qh * NQ + rows[:, None]) * D) + dims[None, :], mask=dims[None, :] < D, other=0.0)
            x = tl.dot(qt, kt, input_precision=PREC)  # (16, BLOCK) fp32 accumulation
            if HALF:
                x = x.to(qt.dtype).to(tl.float32)  # torch's GEMM returns logits in the model's dtype
            allowed = ok[None, :] & key_in[None, :] & ((keys[None, :] - first_new) <= rows[:, None])
            x = tl.where(allowed, x, float("-inf"))
            sh = tl.load(shift_ptr + qh * NQ + rows)
            iv = tl.load(inv_ptr + qh * NQ + rows)
            e = tl.exp(x - sh[:, None]) * iv[:, None]
            if HALF:
                e = e.to(qt.dtype).to(tl.float32)  # the slice's probabilities are in the model's dtype
            p += e
        p = p * tl.load(weight_ptr + b * NQ + rows)[:, None]  # GQA mean, padding queries zero
        re = tl.dot(w_re0, prev, input_precision="ieee") + tl.dot(w_re1, p, input_precision="ieee")
        im = tl.dot(w_im0, prev, input_precision="ieee") + tl.dot(w_im1, p, input_precision="ieee")
        mag = tl.sqrt(re * re + im * im)  # (32, BLOCK), bins >= 17 zero
        fw = tl.load(frame_w_ptr + t)
        existed = keys < N_OLD + 16 * (t + 1)  # frames that end before a new key existed are dropped
        acc += tl.where(existed[None, :], fw * mag, 0.0)
        prev = p
    tl.store(ema_ptr + (bh * NK + keys[None, :]) * 17 + rows32[:, None], acc,
             mask=key_in[None, :] & (rows32[:, None] < 17))
    tl.store(tail_ptr + (bh * NK + keys[None, :]) * 16 + j[:, None], prev, mask=key_in[None, :])


def _normaliser_kernel(
    q_ptr, k_ptr, valid_ptr, shift_ptr, inv_ptr, NQ, NK, D,
    H: tl.constexpr, G: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program (16 queries, batch row x query head): the softmax normaliser of each query row, online over
    BLOCK-key tiles (running max, rescaled sum): shift = max (0 if the row sees no key), inv = 1 / sum (0)."""
    qb = tl.program_id(0)
    bq = tl.program_id(1)  # b * (H * G) + query head
    bh = bq // G  # its KV head's row: b * H + h
    rows = qb * 16 + tl.arange(0, 16)
    dims = tl.arange(0, D_PAD)
    qt = tl.load(q_ptr + (bq * NQ + rows[:, None]) * D + dims[None, :], mask=dims[None, :] < D, other=0.0)
    m = tl.full((16,), float("-inf"), tl.float32)
    s = tl.zeros((16,), dtype=tl.float32)
    first_new = NK - NQ
    for k0 in range(0, NK, BLOCK):
        keys = k0 + tl.arange(0, BLOCK)
        key_in = keys < NK
        kt = tl.load(k_ptr + (bh * NK + keys[None, :]) * D + dims[:, None],
                     mask=key_in[None, :] & (dims[:, None] < D), other=0.0)
        x = tl.dot(qt, kt, input_precision=PREC)  # (16, BLOCK)
        if HALF:
            x = x.to(qt.dtype).to(tl.float32)
        ok = tl.load(valid_ptr + bh * NK + keys, mask=key_in, other=0) != 0
        allowed = ok[None, :] & key_in[None, :] & ((keys[None, :] - first_new) <= rows[:, None])
        x = tl.where(allowed, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - base) + tl.sum(tl.exp(x - base[:, None]), axis=1)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    tl.store(shift_ptr + bq * NQ + rows, shift)
    tl.store(inv_ptr + bq * NQ + rows, tl.where(s > 0, 1.0 / s, 0.0))


_COMPILED: dict[tuple[str, bool], Any] = {}


def _kernel(interpret: bool, fn: Any = None) -> Any:
    """The compiled kernel (CUDA) or the interpreted one (CPU tensors), built once each."""
    fn = _features_kernel if fn is None else fn
    key = (fn.__name__, interpret)
    if key not in _COMPILED:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _COMPILED[key] = InterpretedFunction(fn)
        else:
            _COMPILED[key] = triton.jit(fn)
    return _COMPILED[key]


def normaliser(inp: Any) -> tuple[Tensor, Tensor]:
    """(shift, inv) (batch, kv_heads, g, n_q, 1) fp32, as `fused._normaliser`'s first pass gives them, in one
    kernel: each query row's running max and rescaled sum over the keys, tile by tile (a flash forward's
    statistics; a row's result depends only on its own queries and keys)."""
    q = (inp.queries * inp.scaling).contiguous()
    b, hq, nq, d = q.shape
    h, nk = inp.keys.shape[1], inp.keys.shape[2]
    shift = torch.empty(b, hq, nq, device=q.device, dtype=torch.float32)
    inv = torch.empty_like(shift)
    _kernel(not q.is_cuda, _normaliser_kernel)[(nq // HOP, b * hq)](
        q, inp.keys.contiguous(), inp.valid.to(torch.int8).contiguous(), shift, inv, nq, nk, d,
        H=h, G=hq // h, D_PAD=max(16, 1 << math.ceil(math.log2(d))), BLOCK=64,
        HALF=q.dtype in (torch.float16, torch.bfloat16), PREC="ieee" if q.dtype == torch.float32 else None,
    )
    shape = (b, h, hq // h, nq, 1)
    return shift.view(shape), inv.view(shape)


def _basis(device: torch.device) -> Tensor:
    """(4, 32, 16) fp32: the windowed DFT's real and imaginary parts for a frame's first and second hop,
    bins as rows (17 used, zero-padded to 32 for the matrix units)."""
    from transfer.namm import _dft_basis

    basis = _dft_basis(2 * HOP, device, torch.float32)  # (32 samples, 34)
    out = torch.zeros(4, 32, 16, device=device)
    out[0, :17] = basis[:16, :17].T
    out[1, :17] = basis[16:, :17].T
    out[2, :17] = basis[:16, 17:].T
    out[3, :17] = basis[16:, 17:].T
    return out


def supported(inp: Any, cfg: Any) -> bool:
    """The kernel's case: Triton present, ordered keys without a window, the released STFT geometry."""
    # CPU tensors: only in the interpreter (TRITON_INTERPRET=1 when triton is imported, or its knob set)
    interpretable = triton is not None and (inp.queries.is_cuda or triton.knobs.runtime.interpret)
    return (interpretable and cfg.hop == HOP and cfg.n_fft == 2 * HOP
            and inp.sliding_window is None and inp.ordered and inp.queries.shape[2] % HOP == 0
            and inp.queries.dtype in (torch.float32, torch.float16, torch.bfloat16))


def features(inp: Any, shift: Tensor, inv: Tensor, context: Tensor, ema_prev: Tensor | None,
             cfg: Any) -> tuple[Tensor, Tensor]:
    """(ema (batch, h, n_keys, 17), tail (batch, h, n_keys, 16)) fp32, as `fused.attention_features` returns.

    shift, inv (batch, h, g, n_q, 1) from `fused._normaliser`; context (batch, h, n_keys, 16) and ema_prev
    (batch, h, n_old, 17) as `carried_context` gives them.
    """
    q = (inp.queries * inp.scaling).contiguous()  # scaled before the product, as the slice does
    b, hq, nq, d = q.shape
    h, nk = inp.keys.shape[1], inp.keys.shape[2]
    g = hq // h
    dev = q.device
    a = cfg.ema_coeff**cfg.hop
    t = torch.arange(nq // HOP, device=dev)
    frame_w = (a ** (nq // HOP - 1 - t).to(torch.float64) * (1.0 - a)).to(torch.float32)  # as ema_update
    weight = (inp.q_valid / g).to(torch.float32).contiguous()  # (batch, n_q)
    ema = torch.empty(b, h, nk, 17, device=dev, dtype=torch.float32)
    tail = torch.empty(b, h, nk, 16, device=dev, dtype=torch.float32)
    half = q.dtype in (torch.float16, torch.bfloat16)
    grid = (triton.cdiv(nk, BLOCK_K), b * h)
    _kernel(not q.is_cuda)[grid](
        q, inp.keys.contiguous(), shift.reshape(b, hq, nq).contiguous(), inv.reshape(b, hq, nq).contiguous(),
        weight, inp.valid.to(torch.int8).contiguous(), context.to(torch.float32).contiguous(), _basis(dev),
        frame_w, ema, tail, nq, nk, nk - nq, d,
        H=h, G=g, D_PAD=max(16, 1 << math.ceil(math.log2(d))), BLOCK=BLOCK_K, HALF=half,
        PREC="ieee" if q.dtype == torch.float32 else None,
    )
    if ema_prev is not None and ema_prev.shape[-2] > 0:
        n_old = ema_prev.shape[-2]
        decay = cfg.ema_coeff ** (cfg.hop * (nq // cfg.hop))
        ema = torch.cat([ema[..., :n_old, :] + decay * ema_prev.to(ema.dtype), ema[..., n_old:, :]], dim=-2)
    return ema, tail
