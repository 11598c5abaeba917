"""The reference BAM NAMM (Cetin et al., ICLR 2025) as pure tensor functions.

One call of `namm_update` is one (layer, update) of `DeepMP.update_layer_cache_impl_` in SakanaAI/evo-memory:
attention spectrogram (STFT magnitudes) -> EMA over frames -> frozen per-bin normalisation -> recency
sinusoids -> backward-attention BAM scorer -> binary selection, as specified in docs/namm-spec.md
(sections 2-8). Nothing here knows about models, adapters or domains:
the memory manager feeds GQA-averaged attention and absolute positions, and gathers its own K/V with `keep`.
Checkpoint I/O (our format, the reference's, the default NAMM) lives in transfer/checkpoint.py.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

_NORM_EPS = 1e-7  # reference: (E - mu) / max(sqrt(var), 1e-7)
_PAD_LOGIT = 1e9  # logit penalty for padded BAM keys; exp underflows to exactly 0 like finfo.min masking
_KEY_CHUNK = 8192  # keys per STFT chunk: bounds the (keys, frames, n_fft) intermediate on long caches
_CPU_CHUNK_ELEMENTS = 1 << 19  # attention samples per STFT chunk on the CPU: intermediates stay in cache
_warned_no_norm = False


@dataclass(frozen=True)
class NAMMConfig:
    """Hyper-parameters of the NAMM forward pass; defaults are the released BAM runs (spec section 2)."""

    n_fft: int = 32
    hop: int = 16
    ema_coeff: float = 0.99
    recency_dim: int = 8
    max_freq: float = 50000.0
    start_recency_from: int = 0
    hidden_dim: int = 32
    threshold: float = 0.0

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def n_features(self) -> int:
        return self.recency_dim + self.n_bins

    @property
    def context_len(self) -> int:
        return self.n_fft - self.hop


def param_size(cfg: NAMMConfig = NAMMConfig()) -> int:
    """Length of the flat parameter vector for `cfg` (4172 for the released BAM)."""
    f, d = cfg.n_features, cfg.hidden_dim
    return f * 3 * d + 3 * d + d * 2 * f + 2 * f + f + 1


# The released BAM's geometry (NAMMConfig() defaults) for callers that carry no config.
N_BINS = NAMMConfig().n_bins  # 17
PARAM_SIZE = param_size(NAMMConfig())  # 4172


@dataclass
class NAMMParams:
    """Views into one flat vector in the reference layout (in-major weights, used as `x @ W`)."""

    w_qkv: Tensor  # (F, 3 * hidden): q cols 0:h, k h:2h, v 2h:3h
    b_qkv: Tensor  # (3 * hidden,)
    w_o: Tensor  # (hidden, 2 * F): residual cols 0:F, multiplicative gate F:2F
    b_o: Tensor  # (2 * F,)
    w_m: Tensor  # (F, 1)
    b_m: Tensor  # (1,)

    @classmethod
    def from_flat(cls, theta: Tensor, cfg: NAMMConfig = NAMMConfig()) -> NAMMParams:
        """theta (param_size,) -> one network; theta (rows, param_size) -> one network per batch row
        (every block then has a leading rows dim; `bam_scores` scores row b with network b)."""
        size = param_size(cfg)
        if theta.dim() not in (1, 2) or theta.shape[-1] != size:
            raise ValueError(f"NAMM parameters must have shape [{size}] or [rows, {size}], got {list(theta.shape)}")
        f, d = cfg.n_features, cfg.hidden_dim
        shapes = [(f, 3 * d), (3 * d,), (d, 2 * f), (2 * f,), (f, 1), (1,)]
        lead = tuple(theta.shape[:-1])
        parts, start = [], 0
        for shape in shapes:
            n = math.prod(shape)
            parts.append(theta[..., start : start + n].reshape(*lead, *shape))
            start += n
        return cls(*parts)

    @property
    def per_row(self) -> bool:
        """True when the blocks carry a leading batch-rows dim (one network per sequence)."""
        return self.b_m.dim() == 2

    def flat(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.blocks()])

    def blocks(self) -> tuple[Tensor, ...]:
        return (self.w_qkv, self.b_qkv, self.w_o, self.b_o, self.w_m, self.b_m)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> NAMMParams:
        return NAMMParams(*(p.to(device=device, dtype=dtype) for p in self.blocks()))


@dataclass
class NormStats:
    """Frozen per-bin population statistics of the un-normalised EMA features (float64, shape (n_bins,))."""

    mean: Tensor
    var: Tensor
    count: int

    @classmethod
    def empty(cls, cfg: NAMMConfig = NAMMConfig()) -> NormStats:
        """No statistics yet (count 0): `normalise` leaves the features unchanged, as the reference does."""
        zeros = torch.zeros(cfg.n_bins, dtype=torch.float64)
        return cls(zeros, zeros.clone(), 0)

    @classmethod
    def identity(cls, cfg: NAMMConfig = NAMMConfig()) -> NormStats:
        """Mean 0, variance 1: normalisation is a no-op without the missing-statistics warning."""
        return cls(torch.zeros(cfg.n_bins, dtype=torch.float64), torch.ones(cfg.n_bins, dtype=torch.float64), 1)

    def merge(self, ema: Tensor, valid: Tensor | None) -> NormStats:
        """Chan parallel mean/var merge of this batch's (batch, heads, tokens) rows, masked by `valid`.

        Mirrors the reference online normalisation (population variance, pooled over layers and calls).
        """
        rows = ema.reshape(-1, ema.shape[-1]) if valid is None else ema[valid.bool()]  # (n, bins)
        rows = rows.to(torch.float64)
        n_b = rows.shape[0]
        if n_b == 0:
            return self
        mean_b = rows.mean(0)
        var_b = rows.var(0, correction=0)
        if self.count == 0:
            return NormStats(mean_b, var_b, n_b)
        mean_a, var_a = self.mean.to(rows.device, torch.float64), self.var.to(rows.device, torch.float64)
        n_a, n = self.count, self.count + n_b
        delta = mean_b - mean_a
        mean = mean_a + delta * (n_b / n)
        m2 = var_a * n_a + var_b * n_b + delta.square() * (n_a * n_b / n)
        return NormStats(mean, m2 / n, n)


@dataclass
class NAMMBuffers:
    """Per-layer state carried between updates; rows aligned with the cached tokens."""

    context: Tensor  # (batch, kv_heads, n_keys, n_fft - hop): last attention samples each key received
    ema: Tensor  # (batch, kv_heads, n_keys, n_bins): un-normalised EMA of |STFT|

    def gather(self, keep: Tensor) -> NAMMBuffers:
        """Rows of the kept tokens: keep (batch, kv_heads, n_keep) cache indices."""
        idx = keep[..., None]
        return NAMMBuffers(context=self.context.gather(-2, idx.expand(-1, -1, -1, self.context.shape[-1])),
                           ema=self.ema.gather(-2, idx.expand(-1, -1, -1, self.ema.shape[-1])))


@dataclass
class NAMMUpdate:
    scores: Tensor  # (batch, kv_heads, n_keys) raw BAM scores, -inf at padding (newest not forced)
    keep: Tensor  # (batch, kv_heads, n_keep) long, ascending (positional order)
    keep_valid: Tensor | None  # (batch, kv_heads, n_keep) False on a sequence's surplus entries; None: all kept
    buffers: NAMMBuffers  # new buffers for the kept tokens only (gathered with `keep`)
    ema: Tensor  # (batch, kv_heads, n_keys, 17) un-normalised EMA before eviction (for NormStats collection)


# ----------------------------------------------------------------------------------------------------------
# Feature pieces


def _dft_basis(n_fft: int, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """Periodic-Hann-windowed real DFT basis (n_fft, 2 * bins): frames @ basis = [Re X | Im X]."""
    j = torch.arange(n_fft, dtype=torch.float64)
    f = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * j[:, None] * f[None, :] / n_fft  # (n_fft, bins)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)[:, None]
    basis = torch.cat([window * torch.cos(angle), -window * torch.sin(angle)], dim=1)
    return basis.to(device=device, dtype=dtype)


def stft_magnitudes(series: Tensor, context: Tensor, cfg: NAMMConfig = NAMMConfig()) -> Tensor:
    """|STFT| of each key's attention series with its left context, equal to torch.stft(center=False).

    series (..., n_new), context (..., n_fft - hop) -> (..., frames = n_new / hop, n_bins).
    Unfold + one real matmul with the windowed DFT basis (equal to rfft of the windowed frames, and
    several times faster than rfft + complex abs on small frames); leading dims stay vectorised.
    """
    full = torch.cat([context.to(series.dtype), series], dim=-1)  # (..., n_fft - hop + n_new)
    frames = full.unfold(-1, cfg.n_fft, cfg.hop)  # (..., frames, n_fft)
    basis = _dft_basis(cfg.n_fft, series.device, series.dtype)
    # one contiguous copy + one GEMM; a batched matmul over the strided view copies frame by frame
    spec = (frames.reshape(-1, cfg.n_fft) @ basis).view(*frames.shape[:-1], basis.shape[1])
    re, im = spec.chunk(2, dim=-1)
    return torch.sqrt(re * re + im * im)


def ema_update(mags: Tensor, ema_prev: Tensor | None, n_new: int, cfg: NAMMConfig = NAMMConfig()) -> Tensor:
    """EMA of spectrogram frames with one step per hop: E = a^T E_prev + sum_t a^(T-1-t) (1-a) mask M_t.

    mags (batch, heads, n_keys, frames, bins); ema_prev (batch, heads, n_old, bins) for the first
    n_keys - n_new keys (new keys start at 0) or None. `mask` drops frames that end before a new key
    existed (a no-op for causal attention, kept for exactness with the reference).
    """
    n_keys, n_frames = mags.shape[-3], mags.shape[-2]
    a = cfg.ema_coeff ** cfg.hop
    t = torch.arange(n_frames, device=mags.device)
    w = (a ** (n_frames - 1 - t).to(torch.float64) * (1.0 - a)).to(mags.dtype)  # (frames,)
    k = torch.arange(n_keys, device=mags.device)
    mask = k[:, None] < (n_keys - n_new + cfg.hop * (t[None, :] + 1))  # (n_keys, frames)
    ema = torch.einsum("...kfb,kf->...kb", mags, mask.to(mags.dtype) * w)
    if ema_prev is not None and ema_prev.shape[-2] > 0:
        n_old = ema_prev.shape[-2]
        decay = cfg.ema_coeff ** (cfg.hop * n_frames)
        ema = torch.cat([ema[..., :n_old, :] + decay * ema_prev.to(ema.dtype), ema[..., n_old:, :]], dim=-2)
    return ema


def recency_features(positions: Tensor, cfg: NAMMConfig = NAMMConfig(), valid: Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoids of token age r = newest - pos + start_recency_from: (..., n_keys) -> (..., n_keys, 8).

    Order [sin r f_0..f_3, cos r f_0..f_3] with f_i = max_freq^(-i / 4); computed in float64 so large
    positions keep their phase. The newest token is the max position over valid tokens.
    """
    pos = positions.to(torch.float64)
    if valid is None:
        newest = pos.amax(-1, keepdim=True)
    else:
        newest = pos.masked_fill(~valid.bool(), -math.inf).amax(-1, keepdim=True)
        newest = torch.where(torch.isfinite(newest), newest, 0.0)  # all-padding rows stay finite
    r = newest - pos + cfg.start_recency_from  # (..., n_keys)
    half = cfg.recency_dim // 2
    freqs = cfg.max_freq ** (-torch.arange(half, device=pos.device, dtype=torch.float64) / half)
    ang = r[..., None] * freqs  # (..., n_keys, half)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).to(dtype)


def normalise(ema: Tensor, norm: NormStats | None) -> Tensor:
    """z-score per frequency bin with frozen stats; None/empty stats -> unchanged (reference, warns once)."""
    global _warned_no_norm
    if norm is None or norm.count == 0:
        if not _warned_no_norm:
            warnings.warn("NAMM: no normalisation statistics, using un-normalised EMA features", stacklevel=3)
            _warned_no_norm = True
        return ema
    mean = norm.mean.to(ema.device, ema.dtype)
    std = norm.var.to(ema.device, ema.dtype).sqrt().clamp_min(_NORM_EPS)
    return (ema - mean) / std


def bam_scores(x: Tensor, params: NAMMParams, valid: Tensor | None = None,
               attention_dtype: torch.dtype | None = None) -> Tensor:
    """BAM scorer: one-head backward self-attention (token i sees j >= i), gated residual, linear head.

    x (batch, heads, n_keys, F) in cache order -> scores (batch, heads, n_keys); `params` is one network
    or one per batch row (`NAMMParams.from_flat` of a (batch, param_size) matrix). The backward mask is a
    causal mask on the flipped token axis, so SDPA runs without an O(n_keys^2) mask. Padded keys are
    excluded by an extra q/k dimension that adds -1e9 to their logits (exactly zero weight, like the
    reference's finfo.min); padded queries get finite garbage that callers overwrite.
    `attention_dtype` (e.g. float16) runs only the O(n_keys^2) attention in that precision, on flash
    kernels; projections, gate and head stay in x's dtype. None keeps the reference's fp32 throughout.
    """
    p = params.to(x.device, x.dtype)
    if p.per_row:  # one network per sequence (a stacked CMA-ES population): broadcast over heads and keys
        p = NAMMParams(p.w_qkv[:, None], p.b_qkv[:, None, None], p.w_o[:, None], p.b_o[:, None, None],
                       p.w_m[:, None], p.b_m[:, None])
    d = p.w_o.shape[-2]
    n_feat = x.shape[-1]
    qkv = x @ p.w_qkv + p.b_qkv  # (batch, heads, n_keys, 3 * hidden)
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    if valid is not None and not bool(valid.all()):
        # One extra q/k dimension carries the padding penalty; zero columns keep the head dim a multiple
        # of 8 so that the memory-efficient SDPA kernel (not the O(n^2)-memory math path) serves it.
        pad = (~valid.bool()).to(x.dtype)[..., None]  # (batch, heads, n_keys, 1)
        zeros = pad.new_zeros(*pad.shape[:-1], 7)
        q = torch.cat([q, torch.ones_like(pad), zeros], dim=-1)
        k = torch.cat([k, -_PAD_LOGIT * math.sqrt(d) * pad, zeros], dim=-1)
    if attention_dtype is not None:
        q, k, v = q.to(attention_dtype), k.to(attention_dtype), v.to(attention_dtype)
    # not cuDNN: it plans per sequence length, and the cache's length changes at every update
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(
            q.flip(-2), k.flip(-2), v.flip(-2), is_causal=True, scale=1.0 / math.sqrt(d)
        ).flip(-2).to(x.dtype)  # (batch, heads, n_keys, hidden)
    o = out @ p.w_o + p.b_o  # (batch, heads, n_keys, 2F)
    h = x * (1.0 + o[..., n_feat:]) + o[..., :n_feat]
    return (h @ p.w_m).squeeze(-1) + p.b_m


def newest_index(valid: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """Index of the newest (last valid) token per (batch, head): (batch, heads)."""
    if valid is None:
        return torch.full(shape[:-1], shape[-1] - 1, dtype=torch.long, device=device)
    idx = torch.arange(shape[-1], device=device)
    return torch.where(valid.bool(), idx, -1).amax(-1).clamp_min(0)


def select_keep(scores: Tensor, valid: Tensor | None, threshold: float = 0.0,
                max_keep: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Reference binary selection per sequence: (kept indices (batch, heads, n_keep) ascending, row mask).

    Padding -> -inf, newest token forced kept; for each sequence b, d_b = min over its heads of
    #(score < threshold) and every head of b keeps its top n_keys - d_b (so all heads of a sequence keep
    its max non-negative count, topped up with their best negative tokens). This is the reference rule,
    which ran at batch 1; taking the minimum per sequence (not over the batch) means a sequence's cache
    never depends on its batch-mates. Sequences that keep fewer than the batch's largest count get a
    mask (batch, heads, n_keep) that is False on their surplus entries (the memory marks those invalid);
    the mask is None when every sequence keeps the same count. Budget mode: with `max_keep` every head
    keeps exactly its top min(max_keep, n_keys) tokens, i.e. the threshold moves at each update to the
    budget-th score: the learned ranking decides which tokens, the budget how many, and it is never
    exceeded. Ties go to the older token (stable sort).
    """
    if max_keep is not None and max_keep < 1:
        raise ValueError(f"max_keep must be >= 1, got {max_keep}")
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores.clone()
    if valid is not None:
        s = s.masked_fill(~valid.bool(), -math.inf)
    newest = newest_index(valid, s.shape, s.device)
    s.scatter_(-1, newest[..., None], math.inf)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # (batch, heads, n_keys)
    if max_keep is not None:
        n_keep = min(max_keep, s.shape[-1])
        return order[..., :n_keep].sort(dim=-1).values, None
    per_seq = s.shape[-1] - (s < threshold).sum(-1).amin(-1)  # (batch,) kept count of each sequence
    lo, hi = per_seq.aminmax()
    lo, hi = (int(v) for v in torch.stack([lo, hi]).tolist())  # the count depends on the scores: one sync
    index, perm = order[..., :hi].sort(dim=-1)
    if lo == hi:
        return index, None
    rank = torch.arange(hi, device=s.device)  # position in score order
    in_budget = (rank < per_seq[:, None, None]).expand_as(index)  # (batch, heads, hi), score order
    return index, in_budget.gather(-1, perm)


# ----------------------------------------------------------------------------------------------------------
# One update


def _check_inputs(attn: Tensor, buffers: NAMMBuffers | None, positions: Tensor, valid: Tensor | None,
                  cfg: NAMMConfig, finite: bool = True) -> None:
    if attn.dim() != 4:
        raise ValueError(f"attn must be (batch, kv_heads, n_new, n_keys), got shape {list(attn.shape)}")
    b, h, n_new, n_keys = attn.shape
    if n_new == 0 or n_new % cfg.hop != 0:
        raise ValueError(f"n_new={n_new} queries must be a positive multiple of hop={cfg.hop}")
    if n_new > n_keys:
        raise ValueError(f"n_new={n_new} exceeds n_keys={n_keys}: the last n_new keys must be the new tokens")
    if finite and not torch.isfinite(attn).all():  # a full pass and a device sync: off in the memory's hot path
        raise ValueError("attention contains NaN or inf values")
    if positions.shape != (b, h, n_keys):
        raise ValueError(f"positions must have shape {[b, h, n_keys]}, got {list(positions.shape)}")
    if valid is not None and valid.shape != (b, h, n_keys):
        raise ValueError(f"valid must have shape {[b, h, n_keys]}, got {list(valid.shape)}")
    n_old = n_keys - n_new
    if buffers is None:
        if n_old != 0:
            raise ValueError(f"buffers=None (new sequence) needs n_keys == n_new, got {n_keys} != {n_new}")
        return
    want_ctx, want_ema = (b, h, n_old, cfg.context_len), (b, h, n_old, cfg.n_bins)
    if buffers.context.shape != want_ctx or buffers.ema.shape != want_ema:
        raise ValueError(
            f"buffers must cover the {n_old} old keys: got context {list(buffers.context.shape)}, "
            f"ema {list(buffers.ema.shape)}; expected {list(want_ctx)}, {list(want_ema)}"
        )


def _dft_conv_weight(cfg: NAMMConfig, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """The windowed DFT as a conv2d kernel over hop-sample blocks: (2 * bins, hop, n_fft / hop, 1).

    weight[c, j, d, 0] = basis[d * hop + j, c]: output channel c of frame t reads sample j of block t + d.
    """
    basis = _dft_basis(cfg.n_fft, device, dtype)  # (n_fft, 2 * bins)
    blocks = cfg.n_fft // cfg.hop
    return basis.T.reshape(-1, blocks, cfg.hop).transpose(1, 2)[..., None].contiguous()


def spectral_ema(attn: Tensor, context: Tensor, ema_prev: Tensor | None, cfg: NAMMConfig = NAMMConfig()) -> Tensor:
    """EMA of |STFT| frames for every key: `ema_update(stft_magnitudes(attn^T, context), ema_prev)`.

    attn (batch, heads, n_new, n_keys), context (batch, heads, n_keys, n_fft - hop), ema_prev
    (batch, heads, n_old, bins) or None -> (batch, heads, n_keys, bins). Keys go in chunks to bound the
    transient memory: on the CPU small enough that the intermediates stay in the processor's cache (3x
    faster than one big chunk on 2 cores). On CUDA one conv2d reads attention in its (queries, keys)
    layout; on the CPU, where that conv is slower, the unfolded frames of each key's series go through one GEMM.
    """
    n_keys = attn.shape[-1]
    step = spectral_chunk_keys(attn.shape, attn.is_cuda, cfg)
    return torch.cat([spectral_ema_chunk(attn[..., start : start + step], context, ema_prev, start, n_keys, cfg)
                      for start in range(0, n_keys, step)], dim=-2)


def spectral_chunk_keys(shape: torch.Size, cuda: bool, cfg: NAMMConfig = NAMMConfig()) -> int:
    """Keys per `spectral_ema` chunk for attention of `shape` (batch, heads, n_new, n_keys)."""
    if cuda and cfg.n_fft % cfg.hop == 0 and cfg.context_len % cfg.hop == 0:
        return _KEY_CHUNK
    return min(_KEY_CHUNK, max(1, _CPU_CHUNK_ELEMENTS // math.prod(shape[:-1])))


def spectral_ema_chunk(attn: Tensor, context: Tensor, ema_prev: Tensor | None, start: int, n_keys: int,
                       cfg: NAMMConfig = NAMMConfig()) -> Tensor:
    """`spectral_ema` of the keys [start, start + chunk) of an n_keys cache: (batch, heads, chunk, bins).

    attn (batch, heads, n_new, chunk) holds only those keys' columns, so a caller that computes the
    attention block by block (transfer/fused.py) never needs the whole matrix; context and ema_prev
    cover the whole cache, as in `spectral_ema`.
    """
    n_new, stop = attn.shape[-2], start + attn.shape[-1]
    n_old = n_keys - n_new
    if attn.is_cuda and cfg.n_fft % cfg.hop == 0 and cfg.context_len % cfg.hop == 0:
        chunk = _conv_spectral_ema(attn, context[..., start:stop, :], n_old - start, cfg)
    else:  # the frame mask depends on the absolute key index: shift n_new to the chunk
        mags = stft_magnitudes(attn.transpose(-1, -2), context[..., start:stop, :], cfg)
        chunk = ema_update(mags, None, n_new - (n_keys - stop), cfg)
    if ema_prev is not None and start < n_old:
        decay = cfg.ema_coeff ** (cfg.hop * (n_new // cfg.hop))
        m = min(stop, n_old) - start
        prev = ema_prev[..., start : start + m, :].to(chunk.dtype)
        chunk = torch.cat([chunk[..., :m, :] + decay * prev, chunk[..., m:, :]], dim=-2)
    return chunk


def _conv_spectral_ema(attn: Tensor, context: Tensor, n_old: int, cfg: NAMMConfig) -> Tensor:
    """EMA of |STFT| with the STFT as one conv2d over hop-sample blocks (no transposed series, no unfold).

    The blocks of the query axis are the input channels and the keys stay the contiguous axis; the
    kernel spans n_fft / hop consecutive blocks. TF32 is off: the DFT must be exact to fp32.
    attn (batch, heads, n_new, keys), context (batch, heads, keys, n_fft - hop) -> (batch, heads, keys, bins);
    the first n_old keys are old (their frames are never masked).
    """
    b, h, n_new, kc = attn.shape
    hop, bins = cfg.hop, cfg.n_bins
    n_ctx, frames = cfg.context_len // hop, n_new // hop
    x = attn.new_empty(b * h, hop, n_ctx + frames, kc)  # (batch*heads, sample in block, block, keys)
    x[:, :, :n_ctx] = context.reshape(b * h, kc, n_ctx, hop).permute(0, 3, 2, 1)
    x[:, :, n_ctx:] = attn.reshape(b * h, frames, hop, kc).transpose(1, 2)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        spec = F.conv2d(x, _dft_conv_weight(cfg, attn.device, attn.dtype))  # (b*h, 2 * bins, frames, keys)
    mags = torch.hypot(spec[:, :bins], spec[:, bins:])  # (batch*heads, bins, frames, keys)
    a = cfg.ema_coeff**hop
    t = torch.arange(frames, device=attn.device)
    w = (a ** (frames - 1 - t).to(torch.float64) * (1.0 - a)).to(attn.dtype)  # (frames,)
    k = torch.arange(kc, device=attn.device)
    # frames that end before a new key existed are dropped (a no-op for causal attention)
    wm = (k[None, :] < (n_old + hop * (t[:, None] + 1))).to(attn.dtype) * w[:, None]  # (frames, keys)
    return mags.mul_(wm).sum(2).transpose(1, 2).reshape(b, h, kc, bins)


def namm_score(
    attn: Tensor,
    buffers: NAMMBuffers | None,
    positions: Tensor,
    params: NAMMParams,
    norm: NormStats | None,
    cfg: NAMMConfig = NAMMConfig(),
    valid: Tensor | None = None,
    attention_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> tuple[Tensor, NAMMBuffers]:
    """The scoring half of one update: (BAM scores (batch, kv_heads, n_keys), buffers of EVERY cached key).

    Arguments as `namm_update`. Padding scores -inf; the newest token is not forced here (selection
    does that). The returned buffers are aligned with the current cache; gather them with the kept
    indices (`NAMMBuffers.gather`).
    """
    _check_inputs(attn, buffers, positions, valid, cfg, check_finite)
    dtype = torch.float64 if attn.dtype == torch.float64 else torch.float32
    attn = attn.to(dtype)  # row q, column k: attention that key k received from new query q
    context, ema_prev = carried_context(buffers, attn.shape, attn.device, dtype, cfg)
    ema = spectral_ema(attn, context, ema_prev, cfg)  # (batch, heads, n_keys, bins)
    # last n_fft - hop samples each key received: (batch, heads, n_keys, n_fft - hop)
    recent = attn[..., -cfg.context_len :, :].transpose(-1, -2)
    tail = torch.cat([context, recent], dim=-1)[..., -cfg.context_len :]
    return score_features(ema, tail, positions, params, norm, cfg, valid, attention_dtype)


def carried_context(buffers: NAMMBuffers | None, shape: tuple[int, int, int, int], device: torch.device,
                    dtype: torch.dtype, cfg: NAMMConfig = NAMMConfig()) -> tuple[Tensor, Tensor | None]:
    """(context of every key (batch, heads, n_keys, n_fft - hop), ema_prev or None) for attention of `shape`
    (batch, heads, n_new, n_keys): the old keys' carried samples, zeros for the new keys."""
    b, h, n_new, _ = shape
    ctx_new = torch.zeros(b, h, n_new, cfg.context_len, device=device, dtype=dtype)
    if buffers is None:
        return ctx_new, None
    return torch.cat([buffers.context.to(device, dtype), ctx_new], dim=-2), buffers.ema.to(device, dtype)


def score_features(ema: Tensor, tail: Tensor, positions: Tensor, params: NAMMParams, norm: NormStats | None,
                   cfg: NAMMConfig = NAMMConfig(), valid: Tensor | None = None,
                   attention_dtype: torch.dtype | None = None) -> tuple[Tensor, NAMMBuffers]:
    """The half of `namm_score` after the spectrogram: recency, normalisation, BAM, padding -> -inf.

    ema (batch, heads, n_keys, bins) and tail (batch, heads, n_keys, n_fft - hop) of every cached key,
    from `spectral_ema` or from transfer/fused.py, which computes them without the attention matrix.
    """
    rec = recency_features(positions.to(ema.device), cfg, valid, ema.dtype)  # (batch, heads, n_keys, 8)
    x = torch.cat([rec, normalise(ema, norm)], dim=-1)  # (batch, heads, n_keys, 25), recency first
    scores = bam_scores(x, params, valid, attention_dtype)
    if valid is not None:
        scores = scores.masked_fill(~valid.bool(), -math.inf)
    return scores, NAMMBuffers(context=tail, ema=ema)


def namm_update(
    attn: Tensor,
    buffers: NAMMBuffers | None,
    positions: Tensor,
    params: NAMMParams,
    norm: NormStats | None,
    cfg: NAMMConfig = NAMMConfig(),
    valid: Tensor | None = None,
    max_keep: int | None = None,
    attention_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> NAMMUpdate:
    """Score the cached tokens of one layer and pick the ones to keep (reference BAM NAMM, one update).

    attn (batch, kv_heads, n_new, n_keys): GQA-averaged attention probabilities of the n_new newest
    queries over all cached keys, the last n_new keys being the new tokens (causal zeros included).
    buffers: carried state of the n_keys - n_new old keys, None for a new sequence. positions: absolute
    token positions (batch, kv_heads, n_keys). valid: False for padding (scored -inf). max_keep: budget
    cap on the kept count (see `select_keep`); None reproduces the reference rule. Computes in float32
    (float64 if attn is float64) on attn's device; `attention_dtype`: see `bam_scores`. With valid=None,
    budget mode and check_finite=False an update never waits for the device (no host sync).
    """
    scores, every = namm_score(attn, buffers, positions, params, norm, cfg, valid, attention_dtype, check_finite)
    keep, keep_valid = select_keep(scores, valid, cfg.threshold, max_keep)
    return NAMMUpdate(scores=scores, keep=keep, keep_valid=keep_valid, buffers=every.gather(keep), ema=every.ema)

