"""The memory manager: sits inside every attention layer, keeps the KV cache under a memory policy.

One `KVMemory` serves one batch of sequences. The adapter feeds tokens in chunks (`begin_chunk`) and
runs the model's forward under `memory.active()`; transformers then calls `memory_attention` (our
registered attention function) once per layer with the post-positional queries and the full cached
keys/values. There we

1. compute the layer's attention output ourselves with SDPA. While every cached key is valid this is
   plain causal attention aligned to the last key, with no mask tensor (flash kernels on CUDA in half
   precision, and one-token decode anywhere). Otherwise the mask is built from *slot indices* (causal
   by absolute token order, padding masked), because after eviction the cache no longer lines up with
   HF's own mask. The model never needs eager attention;
2. buffer the chunk's queries; every `update_interval` tokens we compute the attention slice the
   policy needs (buffered queries x cached keys, GQA-averaged), ask the policy which tokens to keep,
   and gather K/V/slots in place.

Rotary or learned positions are the adapter's business (it passes absolute position ids); eviction
never re-rotates keys.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from transfer.fused import AttentionInputs
from transfer.fused import allowed_keys as _allowed
from transfer.namm import NAMMConfig
from transfer.policies.base import Keep, LayerView, MemoryPolicy, Selection

ATTN_IMPLEMENTATION = "namm_transfer"
# Not cuDNN: it builds a plan per sequence length, and a cache's length changes at every chunk and update.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Padded or ragged caches on CUDA: flash attention with a per-key penalty instead of a slot mask (False: the
# masked path, which bench/population_speed.py measures side by side)
PENALISED_FLASH = True
_ACTIVE: contextvars.ContextVar[KVMemory | None] = contextvars.ContextVar("namm_memory", default=None)


def check_update_interval(update_interval: int, hop: int = NAMMConfig().hop) -> None:
    """Evaluators call this before writing anything: the NAMM's STFT needs whole hops of queries."""
    if update_interval <= 0 or update_interval % hop:
        raise ValueError(f"update_interval must be a positive multiple of {hop} (the STFT hop), got {update_interval}")


@dataclass
class InputsView(LayerView):
    """A `LayerView` for a policy that reduces the attention itself (`policy.fused_on(device)` True):
    attn is None and `inputs` says what the slice would have been computed from."""

    inputs: AttentionInputs | None = None


@dataclass
class _LayerState:
    slots: torch.Tensor  # (batch, kv_heads, n_keys)
    valid: torch.Tensor  # (batch, kv_heads, n_keys)
    queries: list[torch.Tensor] = field(default_factory=list)  # [(batch, q_heads, n, head_dim)]
    query_slots: list[torch.Tensor] = field(default_factory=list)  # [(batch, n)]
    query_valid: list[torch.Tensor] = field(default_factory=list)  # [(batch, n)]
    n_new: int = 0
    all_valid: bool = True  # no padding and nothing masked out: attention needs no explicit mask
    policy_state: Any = None

    def copy(self) -> _LayerState:
        """Tensors are only ever replaced, never written in place, so sharing them is safe."""
        return replace(self, queries=list(self.queries), query_slots=list(self.query_slots),
                       query_valid=list(self.query_valid))


class KVMemory:
    """KV cache + policy + schedule for one batch of sequences.

    evict="gather" physically removes evicted entries (the real thing); evict="mask" keeps them and
    masks them out of attention, which the tests use as the exactness reference.
    """

    def __init__(
        self,
        policy: MemoryPolicy,
        cache: Any,
        update_interval: int = 512,
        evict: str = "gather",
        record: bool = False,
    ) -> None:
        check_update_interval(update_interval)
        if evict not in ("gather", "mask"):
            raise ValueError(f"evict must be 'gather' or 'mask', got {evict!r}")
        self.policy = policy
        self.cache = cache
        self.update_interval = update_interval
        self.evict = evict
        self.layers: dict[int, _LayerState] = {}
        layers = getattr(cache, "layers", None)
        self.n_layers = len(layers) if layers else None  # for policies that spread a budget over layers
        self.n_fed = 0  # slots fed per row, padding included
        self.n_seen: torch.Tensor | None = None  # (batch,) valid tokens fed
        self.kept_log: list[torch.Tensor] = []  # (batch,) kept/seen after each layer update (NaN: none seen)
        self.seen_log: list[torch.Tensor] = []  # (batch,) tokens seen at each layer update
        self.record = record
        self.history: list[tuple[int, torch.Tensor]] = []  # (layer, kept slots (batch, kv_heads, n_keep))
        self._chunk_slots: torch.Tensor | None = None
        self._chunk_valid: torch.Tensor | None = None
        self._chunk_all_valid = True
        self._max_seen = 0  # host copy of n_seen.max()
        self._padded = False  # some row was fed padding: rows may have seen different token counts
        self._update_due = False

    # ---------------------------------------------------------------- feeding
    def chunk_sizes(self, n_tokens: int, max_chunk: int) -> list[int]:
        """Split n_tokens into chunks <= max_chunk that end exactly on update boundaries."""
        sizes, fed = [], self.n_fed
        while n_tokens > 0:
            to_boundary = self.update_interval - fed % self.update_interval
            size = min(max_chunk, n_tokens, to_boundary)
            sizes.append(size)
            fed += size
            n_tokens -= size
        return sizes

    def begin_chunk(self, n_new: int, valid: torch.Tensor | None = None, device: Any = None) -> None:
        """Announce the next forward: n_new tokens per row, valid (batch, n_new) False for padding."""
        to_boundary = self.update_interval - self.n_fed % self.update_interval
        if n_new > to_boundary:
            raise ValueError(
                f"chunk of {n_new} tokens crosses an update boundary ({to_boundary} left); split with chunk_sizes()"
            )
        if valid is None:
            batch = 1 if self.n_seen is None else self.n_seen.shape[0]
            valid = torch.ones(batch, n_new, dtype=torch.bool, device=device)
        valid = valid.bool()
        self._chunk_all_valid = bool(valid.all())  # one host sync per chunk, none per layer
        self._padded = self._padded or not self._chunk_all_valid
        self._chunk_slots = (self.n_fed + torch.arange(n_new, device=valid.device)).expand(valid.shape[0], -1)
        self._chunk_valid = valid
        self.n_seen = valid.sum(1) if self.n_seen is None else self.n_seen + valid.sum(1)
        self._max_seen = self._max_seen + n_new if self._chunk_all_valid else int(self.n_seen.max())
        self.n_fed += n_new
        self._update_due = self.n_fed % self.update_interval == 0

    @contextlib.contextmanager
    def active(self) -> Iterator[KVMemory]:
        """Route the model's attention through this memory for the duration of a forward."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    # ---------------------------------------------------------------- attention
    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Attention output of one layer for the current chunk; runs the policy when an update is due.

        query (batch, q_heads, n, d); key/value (batch, kv_heads, n_keys, d) already hold this chunk.
        Returns (batch, n, q_heads, d) like transformers' attention functions.
        """
        if self._chunk_slots is None:
            raise RuntimeError("KVMemory.begin_chunk() must be called before each forward")
        b, hq, n, d = query.shape
        h = key.shape[1]
        q_slots, q_valid = self._chunk_slots, self._chunk_valid  # (batch, n)
        new_slots = q_slots[:, None, :].expand(b, h, n)
        new_valid = q_valid[:, None, :].expand(b, h, n)
        st = self.layers.get(layer)
        if st is None:
            st = self.layers[layer] = _LayerState(slots=new_slots, valid=new_valid)
        else:
            st.slots = torch.cat([st.slots, new_slots], dim=-1)
            st.valid = torch.cat([st.valid, new_valid], dim=-1)
        st.all_valid = st.all_valid and self._chunk_all_valid
        if st.slots.shape[-1] != key.shape[2]:
            raise RuntimeError(
                f"layer {layer}: cache holds {key.shape[2]} keys but the memory tracks {st.slots.shape[-1]}; "
                "was the cache modified outside the memory?"
            )
        out = self._attention(st, query, key, value, scaling, sliding_window)
        st.queries.append(query)
        st.query_slots.append(q_slots)
        st.query_valid.append(q_valid)
        st.n_new += n
        if self._update_due:
            self._update_layer(layer, st, key, value, scaling, sliding_window)
        return out

    def _causal_only(self, st: _LayerState, sliding_window: int | None) -> bool:
        """Every cached key valid and inside the window: plain causal attention, no mask tensor needed."""
        return st.all_valid and (sliding_window is None or self.n_fed <= sliding_window)

    def _attention(
        self,
        st: _LayerState,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """The layer's attention output for this chunk: (batch, n, q_heads, d)."""
        n = query.shape[2]
        flash = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
        if self._causal_only(st, sliding_window) and (n == 1 or flash):
            return _causal_sdpa(query, key, value, scaling)
        if flash and PENALISED_FLASH and sliding_window is None:  # invalid entries: flash with a key penalty
            return _penalised_causal_sdpa(query, key, value, st.valid, scaling)
        mask = _slot_mask(st.slots, st.valid, self._chunk_slots, sliding_window)  # (batch, kv_heads, n, n_keys)
        return _grouped_sdpa(query, key, value, mask, scaling)

    # ---------------------------------------------------------------- update
    def _policy_attention(
        self, st: _LayerState, key: torch.Tensor, scaling: float, sliding_window: int | None
    ) -> torch.Tensor:
        """What the policy reads: the buffered queries' attention over the cache (batch, kv_heads, n_new, n_keys)."""
        queries = torch.cat(st.queries, dim=2)  # (batch, q_heads, n_new, d)
        q_slots = torch.cat(st.query_slots, dim=1)  # (batch, n_new)
        q_valid = torch.cat(st.query_valid, dim=1)
        return attention_slice(queries, key, st.slots, st.valid, q_slots, q_valid, scaling, sliding_window,
                               self._causal_only(st, sliding_window), ordered=True)

    def _attention_inputs(
        self, st: _LayerState, key: torch.Tensor, scaling: float, sliding_window: int | None
    ) -> AttentionInputs:
        """What `_policy_attention` computes the slice from, for policies that reduce it block by block."""
        return AttentionInputs(
            queries=torch.cat(st.queries, dim=2), keys=key, slots=st.slots, valid=st.valid,
            q_slots=torch.cat(st.query_slots, dim=1), q_valid=torch.cat(st.query_valid, dim=1), scaling=scaling,
            sliding_window=sliding_window, causal_only=self._causal_only(st, sliding_window), ordered=True,
        )

    def _update_layer(
        self,
        layer: int,
        st: _LayerState,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        sliding_window: int | None,
    ) -> None:
        attn = inputs = None
        if getattr(self.policy, "needs_attention", False):
            fused = getattr(self.policy, "fused_on", None)  # the policy reduces the attention block by block
            if fused is not None and fused(key.device):
                inputs = self._attention_inputs(st, key, scaling, sliding_window)
            else:
                attn = self._policy_attention(st, key, scaling, sliding_window)
        fields = dict(
            layer=layer, keys=key, slots=st.slots, valid=st.valid, n_new=st.n_new, n_seen=self.n_seen, attn=attn,
            all_valid=st.all_valid, max_seen=self._max_seen, n_layers=self.n_layers, equal_seen=not self._padded,
        )
        view = LayerView(**fields) if inputs is None else InputsView(**fields, inputs=inputs)
        keep, st.policy_state = self.policy.update(view, st.policy_state)
        st.queries, st.query_slots, st.query_valid, st.n_new = [], [], [], 0
        self._evict(layer, st, keep, key, value)
        if self.record:  # kept slots per update, -1 where a slot is not (or no longer) valid
            self.history.append((layer, st.slots.masked_fill(~st.valid, -1)))
        n_valid = st.valid.sum(-1).double().mean(1)  # (batch,) mean over heads; float64 so that a row's
        self.kept_log.append(n_valid / self.n_seen.double())  # figure does not depend on the batch's width
        self.seen_log.append(self.n_seen.double())

    def _evict(self, layer: int, st: _LayerState, keep: Keep, key: torch.Tensor, value: torch.Tensor) -> None:
        """Apply a policy's decision: gather (or, in mask mode, mask) the kept entries of one layer.

        A `Selection` keeps its index like a tensor and marks the entries a sequence evicts as padding,
        so sequences of one batch can keep different counts.
        """
        index, kept_valid = (keep.index, keep.valid) if isinstance(keep, Selection) else (keep, None)
        if index is None or (kept_valid is None and index.shape[-1] >= key.shape[2]):
            return
        if self.evict == "gather":
            cache_layer = self.cache.layers[layer]
            idx = index[..., None].expand(-1, -1, -1, key.shape[-1])
            cache_layer.keys = key.gather(2, idx)
            cache_layer.values = value.gather(2, idx)
            st.slots = st.slots.gather(2, index)
            st.valid = st.valid.gather(2, index)
            if kept_valid is not None:
                st.valid = st.valid & kept_valid
        else:
            kept = torch.zeros_like(st.valid).scatter_(2, index, True if kept_valid is None else kept_valid)
            st.valid = st.valid & kept
        st.all_valid = st.all_valid and self.evict == "gather" and kept_valid is None

    # ---------------------------------------------------------------- bookkeeping
    def kept_fraction(self) -> torch.Tensor:
        """(batch,) kept/seen valid tokens over all layer updates, weighted by the tokens seen at each:
        the time-averaged cache over the time-averaged full cache. A short early update (a prompt's first
        partial interval) weighs as little as the memory it holds; 1.0 where no update ran."""
        if not self.kept_log:
            return torch.ones(1 if self.n_seen is None else self.n_seen.shape[0], dtype=torch.float64)
        ratio, seen = torch.stack(self.kept_log), torch.stack(self.seen_log)  # (updates, batch)
        total = seen.sum(0)
        kept = (ratio.nan_to_num(0.0) * seen).sum(0) / total.clamp(min=1)
        return torch.where(total > 0, kept, 1.0).cpu()

    def cache_tokens(self) -> list[int]:
        """Physical cache length per layer."""
        return [int(layer.keys.shape[-2]) for layer in self.cache.layers if layer.keys is not None]

    def snapshot(self) -> dict:
        """Cheap restorable state (tensors are never modified in place, only replaced)."""
        return {
            "kv": [(layer.keys, layer.values) for layer in self.cache.layers],
            "layers": {i: state.copy() for i, state in self.layers.items()},
            "n_fed": self.n_fed,
            "n_seen": self.n_seen,
            "max_seen": self._max_seen,
            "padded": self._padded,
            "kept_log": list(self.kept_log),
            "seen_log": list(self.seen_log),
        }

    def restore(self, snap: dict) -> None:
        """Return to a snapshot, e.g. to answer the next question from the same compressed context."""
        for layer, (k, v) in zip(self.cache.layers, snap["kv"]):
            layer.keys, layer.values = k, v
        self.layers = {i: state.copy() for i, state in snap["layers"].items()}
        self.n_fed, self.n_seen, self.kept_log = snap["n_fed"], snap["n_seen"], list(snap["kept_log"])
        self.seen_log = list(snap["seen_log"])
        self._max_seen, self._padded = snap["max_seen"], snap["padded"]


def _slot_mask(
    slots: torch.Tensor, valid: torch.Tensor, q_slots: torch.Tensor, sliding_window: int | None = None
) -> torch.Tensor:
    """The attention mask of a forward; a key may always see itself, so padding queries never get NaN rows."""
    return _allowed(slots, valid, q_slots, sliding_window) | (slots[:, :, None, :] == q_slots[:, None, :, None])


def _grouped_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """SDPA with a per-KV-head mask: fold KV heads into the batch so the mask broadcasts over the group."""
    b, hq, n, d = query.shape
    h, nk = key.shape[1], key.shape[2]
    g = hq // h
    q = query.reshape(b * h, g, n, d)
    k = key.reshape(b * h, 1, nk, d)
    v = value.reshape(b * h, 1, nk, value.shape[-1])
    m = mask.reshape(b * h, 1, n, nk)
    if g > 1:
        k, v = k.expand(-1, g, -1, -1), v.expand(-1, g, -1, -1)
    with sdpa_kernel(SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling)  # (b*h, g, n, d)
    return out.reshape(b, hq, n, -1).transpose(1, 2).contiguous()


def _causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention when every cached key is valid and older than the chunk: causal aligned to the last key.

    No mask tensor is built, so SDPA takes its flash kernel (lower-right causal; none for one query).
    query (batch, q_heads, n, d), key/value (batch, kv_heads, n_keys, d) -> (batch, n, q_heads, d).
    """
    n, nk = query.shape[2], key.shape[2]
    mask = causal_lower_right(n, nk) if n > 1 else None
    with sdpa_kernel(SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def _penalised_causal_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`_causal_sdpa` for a cache with invalid entries (padding, a sequence's evicted surplus): no mask tensor.

    The cache is in token order with the chunk's own tokens last, so causality is lower-right aligned
    whatever was evicted; only validity varies per key. One extra q/k dimension (q: 1, k: 0 or -P with
    P = finfo.max / 2) adds -P to the logit of every invalid key, whose weight then underflows to
    exactly 0, and valid keys' logits gain an exact +0. So flash kernels serve padded and ragged
    batches too, where a (batch, kv_heads, n, n_keys) boolean mask, its float copy and the masked
    kernel used to cost several passes over n x n_keys per layer and chunk. The head dim is padded to
    a multiple of 8 (zeros). Padding queries get finite garbage, as with the mask.
    query (batch, q_heads, n, d), key/value (batch, kv_heads, n_keys, d), valid (batch, kv_heads, n_keys)
    -> (batch, n, q_heads, d).
    """
    d = query.shape[-1]
    width = (d + 1 + 7) // 8 * 8
    penalty = -torch.finfo(key.dtype).max / 2
    q = F.pad(query, (0, width - d))
    q[..., d] = 1.0
    k = F.pad(key, (0, width - d))
    k[..., d] = (~valid).to(key.dtype) * penalty
    v = F.pad(value, (0, width - d))
    return _causal_sdpa(q, k, v, scaling)[..., :d].contiguous()


# logits per block in attention_slice: bounds the transient memory on CUDA; on the CPU small enough for
# the processor's cache (the softmax and the GQA sum then run several times faster)
_SLICE_ELEMENTS = {"cuda": 1 << 27, "cpu": 1 << 19}


def attention_slice(
    queries: torch.Tensor,
    keys: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    q_slots: torch.Tensor,
    q_valid: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    causal_only: bool = False,
    ordered: bool = False,
) -> torch.Tensor:
    """Row-softmax attention of the buffered queries over the cached keys, averaged over each KV group.

    The probabilities the model used, computed in the precision of HF's eager attention (which feeds the
    reference NAMM): logits in the model's dtype (queries pre-scaled), softmax accumulated in fp32 and
    returned in the model's dtype, then the GQA mean in fp32. Causal by slot, padding masked; padding
    query rows are zero. KV heads go in groups so the transient logits stay bounded however long the
    cache. `causal_only` (every key valid, no window, the last n_q keys being the queries' own tokens)
    masks only that last block. `ordered` (keys in token order, the last n_q being the queries' own tokens,
    as in the memory; some keys may be invalid) masks invalid keys and that last block's future, the
    same entries as the general slot comparison, without building the comparison.
    queries (batch, q_heads, n_q, d), keys (batch, kv_heads, n_keys, d) -> (batch, kv_heads, n_q, n_keys) fp32
    """
    b, hq, nq, d = queries.shape
    h, nk = keys.shape[1], keys.shape[2]
    g = hq // h
    q = (queries * scaling).reshape(b, h, g, nq, d)  # scaled before the product: one pass less over the logits
    out = torch.empty(b, h, nq, nk, dtype=torch.float32, device=queries.device)
    elements = _SLICE_ELEMENTS["cuda" if queries.is_cuda else "cpu"]
    step_h = max(1, elements // (b * g * nq * nk))
    step_q = nq if step_h > 1 else max(1, min(nq, elements // (b * g * nk)))
    # Without a window the cache is in token order with the queries' own tokens last: a key is allowed iff
    # valid, and, among those last n_q, not after the query. That masks the same entries as the slot
    # comparison of `_allowed` (so the result is identical) without building it per block.
    ordered = causal_only or (ordered and sliding_window is None)
    future = torch.ones(nq, nq, dtype=torch.bool, device=queries.device).triu_(1) if ordered else None
    invalid = None if causal_only else ~valid[:, :, None, None, :]  # (batch, kv_heads, 1, 1, n_keys)
    for h0 in range(0, h, step_h):
        for q0 in range(0, nq, step_q):
            hs, qs = slice(h0, h0 + step_h), slice(q0, q0 + step_q)
            qb = q[:, hs, :, qs]  # (batch, heads, g, block, d)
            # one GEMM per KV head over its g query heads: (batch, heads, g * block, n_keys), model dtype
            logits = torch.matmul(qb.reshape(b, qb.shape[1], -1, d), keys[:, hs].transpose(-1, -2))
            logits = logits.view(*qb.shape[:-1], nk)  # (batch, heads, g, block, n_keys)
            if ordered:
                if invalid is not None:
                    logits.masked_fill_(invalid[:, hs], float("-inf"))
                logits[..., nk - nq :].masked_fill_(future[qs], float("-inf"))
            else:
                allowed = _allowed(slots[:, hs], valid[:, hs], q_slots[:, qs], sliding_window)
                logits.masked_fill_(~allowed[:, :, None], float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if not causal_only:
                probs = probs.nan_to_num_(0.0)  # padding queries see no key
            out[:, hs, qs] = probs.sum(2, dtype=torch.float32)
    out.mul_(q_valid[:, None, :, None] / g)
    return out


def memory_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: the active memory's attention, else plain SDPA."""
    memory = _ACTIVE.get()
    if memory is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if scaling is None:  # families with their own scaling rule pass `scaling` (adapters/gpt2.py)
        scaling = query.shape[-1] ** -0.5
    out = memory.attend(module.layer_idx, query, key, value, scaling, kwargs.get("sliding_window"))
    return out, None


def _memory_mask(*args: Any, **kwargs: Any) -> Any:
    """Inside a memory the mask is built from slot indices (HF's would be wrong after eviction); outside, SDPA's."""
    if _ACTIVE.get() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Make `ATTN_IMPLEMENTATION` selectable by `model.set_attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, memory_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _memory_mask)
