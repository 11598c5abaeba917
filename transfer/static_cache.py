"""A compacting static KV cache for decode: fixed shapes between updates, so the step runs under torch.compile.

`KVMemory` grows and shrinks its cache at every token, so every decode step has new shapes and runs
eagerly (HF's Python loop and one kernel per op: about 25 ms a step on the H200, issue 22). Here each
layer owns fixed buffers of `capacity` entries (budget + update interval):

    keys/values (batch, kv_heads, capacity, width), slots and valid (batch, kv_heads, capacity)

and a write pointer per layer. A decode step writes its token's K/V at the pointer (`index_copy_` with a
device index: no host sync, no new shapes) and attends to every entry, so it compiles once and, on CUDA,
replays as a CUDA graph. Free and invalid entries carry a key penalty instead of a mask: `width` is the
head dim plus one column (padded to a multiple of 8) that holds 0 for valid entries and -P for the rest,
and the query gets a 1 there (the memory's penalised flash, `transfer.memory._penalised_causal_sdpa`), so
mask-free kernels with native GQA run the step and read each KV head's cache once.

When an update is due the step is followed, eagerly and outside the compiled code, by the memory's own
update (`KVMemory._update_layer`: same attention slice, same `LayerView`, same policy code as the dynamic
path). Its kept entries are then copied to the front of the buffers (ascending, so still in token order)
and the rest marked free.
Positions stay absolute: keys keep the rotation they were written with, `slots` keep each entry's fed
index, and the next token's position is the row's count of valid tokens seen, as in `Adapter.feed`.

The prefill runs through `KVMemory` as always; `StaticDecoder.load(memory)` takes over its cache, policy
state and buffered queries, and `sync()` hands everything back, so after a static decode the memory holds
what the dynamic decode would have left (same slots and validity, K/V equal to float rounding).

Exactness against the dynamic path: the step's attention runs over `capacity` keys with invalid ones
penalised (weight exactly 0) instead of over the live ones, so logits agree to float rounding (the sums run
in another order), not bit for bit; the policy update is the same code on the same live entries.
`tests/test_static_cache.py` checks tokens and logits against the dynamic path.

Decode steps feed one valid token per row (padding only ever comes from the prefill), which is what every
greedy decode here does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from transfer.memory import KVMemory

STATIC_ATTN_IMPLEMENTATION = "namm_transfer_static"
_ALIGN = 16  # capacity rounded up to this: aligned masks for the memory-efficient CUDA kernel (windowed layers)
_ACTIVE: StaticKV | None = None  # a plain global, not a ContextVar: dynamo traces reads of globals, not ContextVar.get


class CapacityError(RuntimeError):
    """The static cache has no free entry left for the next token."""


@dataclass
class StaticKV:
    """Fixed-size per-layer buffers and device counters; `update` is what transformers' layers call.

    Every tensor here keeps its address for the decoder's lifetime (CUDA graphs replay on them).
    """

    keys: list[torch.Tensor]  # [(batch, kv_heads, capacity, width)] per layer: key, penalty column, zeros
    values: list[torch.Tensor]  # [(batch, kv_heads, capacity, width)]: value, zeros
    slots: list[torch.Tensor]  # [(batch, kv_heads, capacity)] long: fed index of each entry
    valid: list[torch.Tensor]  # [(batch, kv_heads, capacity)] bool: False for free entries and padding
    queries: list[torch.Tensor] | None  # [(batch, q_heads, update_interval, head_dim)] when the policy reads attention
    fill: torch.Tensor  # (layers,) long: next free entry of each layer
    n_query: torch.Tensor  # (1,) long: queries buffered since the last update
    slot: torch.Tensor  # (1,) long: fed index of the token being decoded
    positions: torch.Tensor  # (batch, 1) long: its position (valid tokens seen by each row)
    head_dim: int = 0  # d: the keys' own width; column d of `keys` holds 0 (valid) or -P (not)
    head_dim_v: int = 0
    layer_args: dict[int, tuple[float, int | None]] = field(default_factory=dict)  # layer -> (scaling, window)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def mark(self, layer: int) -> None:
        """Write the layer's penalty column from `valid`: 0 on valid entries, -P on the rest (eager, at loads
        and compactions; a step writes 0 with its valid token)."""
        keys = self.keys[layer]
        keys[..., self.head_dim] = (~self.valid[layer]).to(keys.dtype) * penalty(keys.dtype)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's K/V (batch, kv_heads, 1, d) at the layer's pointer, zero-padded to the buffers' width
        (so its penalty column says valid); return the whole buffers."""
        at = self.fill[layer_idx : layer_idx + 1]  # (1,) device index: no host sync
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        width = keys.shape[-1]
        keys.index_copy_(2, at, F.pad(key.to(keys.dtype), (0, width - key.shape[-1])))
        values.index_copy_(2, at, F.pad(value.to(values.dtype), (0, width - value.shape[-1])))
        self.valid[layer_idx].index_fill_(2, at, True)
        b, h = key.shape[:2]
        self.slots[layer_idx].index_copy_(2, at, self.slot.view(1, 1, 1).expand(b, h, 1))
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self) -> None:
        """After a step: every pointer and counter moves on by one token (in place, inside the compiled step)."""
        self.fill.add_(1)
        self.n_query.add_(1)
        self.slot.add_(1)
        self.positions.add_(1)


def static_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function of the static step: one query per row over every buffer entry.

    query (batch, q_heads, 1, d), key/value (batch, kv_heads, capacity, width) -> (batch, 1, q_heads, d_v).
    Invalid entries (free, padding, a row's evicted surplus) get the key penalty (see `penalised_sdpa`),
    so no mask is built and flash kernels (split over the keys for decode) serve the step. Sliding-window
    layers also mask by slot, as the memory's slot mask does.
    """
    state = _ACTIVE
    if state is None:
        raise RuntimeError("static attention outside StaticDecoder.step()")
    layer = module.layer_idx
    if scaling is None:  # families with their own rule pass `scaling` (as in memory_attention)
        scaling = query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    if not torch.compiler.is_compiling():  # recorded on the eager first step: the update's attention slice needs them
        state.layer_args[layer] = (scaling, window)
    if state.queries is not None:
        state.queries[layer].index_copy_(2, state.n_query, query.to(state.queries[layer].dtype))
    d, width = query.shape[-1], key.shape[-1]
    one = torch.ones_like(query[..., :1])
    q = torch.cat([query, one, torch.zeros_like(one).expand(*one.shape[:-1], width - d - 1)], dim=-1)
    if window is None:
        out = penalised_sdpa(q, key, value, scaling)
    else:  # the window depends on the query's slot: a mask (valid & inside), the penalty column changes nothing
        mask = state.valid[layer] & (state.slot - state.slots[layer] < window)  # (batch, kv_heads, capacity)
        out = _grouped_sdpa(q, key, value, mask, scaling)
    return out[..., : state.head_dim_v], None


def penalty(dtype: torch.dtype) -> float:
    """-P: added to an invalid key's logit, its weight underflows to exactly 0 (as the memory's penalised flash)."""
    return -torch.finfo(dtype).max / 2


def penalised_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Decode attention without a mask tensor: the query's column d is 1 and the key's is 0 or -P.

    A valid key's logit gains an exact +0 (the padding columns are zeros), an invalid key's -P * scaling,
    whose weight is exactly 0 after the softmax; every row sees at least its own (valid) token. So this is
    masked attention over the valid entries, computed by the mask-free kernels with native GQA (no copy of
    the cache per step). query (batch, q_heads, 1, width), key/value (batch, kv_heads, capacity, width)
    -> (batch, 1, q_heads, width).
    """
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


def _grouped_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Decode attention with a per-KV-head key mask (sliding windows), K/V read once per KV head.

    With one query per row, a KV head's g query heads are g query rows of one attention over its keys, all
    with the same mask: KV heads fold into the batch and the group into the query length, so no copy of
    the cache is made (an expand to g heads would be materialised by the kernels, every step).
    query (batch, q_heads, 1, d), key/value (batch, kv_heads, n_keys, d), mask (batch, kv_heads, n_keys)
    -> (batch, 1, q_heads, d_v).
    """
    b, hq, n, d = query.shape
    h, nk = key.shape[1], key.shape[2]
    if n != 1:
        raise ValueError(f"the static step decodes one token per row, got {n}")
    q = query.reshape(b * h, 1, hq // h, d)  # heads of a group are consecutive (transformers' repeat_kv)
    k = key.reshape(b * h, 1, nk, d)
    v = value.reshape(b * h, 1, nk, value.shape[-1])
    m = mask.reshape(b * h, 1, 1, nk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling)  # (b*h, 1, g, d_v)
    return out.reshape(b, 1, hq, -1)


def register_static_attention() -> None:
    """Make `STATIC_ATTN_IMPLEMENTATION` a transformers attention function. No mask function is registered
    under it, so transformers builds no mask in the static step (the attention reads `valid` instead)."""
    from transformers import AttentionInterface

    AttentionInterface.register(STATIC_ATTN_IMPLEMENTATION, static_attention)


def model_configs(model: torch.nn.Module) -> list[Any]:
    """The distinct configs the model's modules read their attention implementation from."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "_attn_implementation_internal")}
    return list(configs.values())


@contextlib.contextmanager
def attn_implementation(model: torch.nn.Module | list[Any], name: str) -> Iterator[None]:
    """Every config of the model (or the `model_configs` list given) runs attention `name` inside the block,
    then gets its own back."""
    configs = model_configs(model) if isinstance(model, torch.nn.Module) else model
    before = [c._attn_implementation_internal for c in configs]
    try:
        for c in configs:
            c._attn_implementation_internal = name
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation_internal = b


def default_capacity(memory: KVMemory, max_new_tokens: int) -> int:
    """Entries per layer a decode of `max_new_tokens` needs: the policy's budget plus one update interval.

    A policy with a token budget (every `ScoredPolicy`, budget mode of the NAMM) keeps at most
    max(budget at the last token seen, protected tokens) entries at an update, and the next update_interval
    tokens come on top. Anything else (full cache, the NAMM's reference rule, layers a policy skips) may keep
    every token: the bound is then today's cache plus every new token. Never more than that bound, rounded
    up to a multiple of 16.
    """
    policy = memory.policy
    current = max(memory.cache_tokens())
    full = current + max_new_tokens
    budget = getattr(policy, "budget", None)
    if budget is None or getattr(policy, "skip_layers", ()) or getattr(policy, "collect_norm", False):
        need = full
    else:
        seen = memory._max_seen + max_new_tokens
        kept = budget if isinstance(budget, int) else math.ceil(budget * seen)
        kept = max(kept, getattr(policy, "protect_recent", 0) + getattr(policy, "protect_sink", 0), 1)
        to_update = memory.update_interval - memory.n_fed % memory.update_interval
        need = min(full, max(current + to_update, kept + memory.update_interval))
    return -(-need // _ALIGN) * _ALIGN


StepForward = Callable[[StaticKV, torch.Tensor, torch.Tensor], torch.Tensor]


class StaticDecoder:
    """Greedy-decode steps on a `StaticKV`, compiled or eager, with the memory's updates run eagerly.

    forward(cache, tokens (batch, 1), positions (batch, 1)) -> next-token logits (batch, vocab) is the
    adapter's one-token forward with `cache` as past_key_values. `compile`: False (eager), True (default
    inductor) or a torch.compile mode ("reduce-overhead": CUDA graphs on CUDA). Buffers are allocated by
    the first `load` and reused by later loads of the same shapes, so a decoder compiles once.
    """

    def __init__(self, model: torch.nn.Module, forward: StepForward, capacity: int, compile: bool | str = False):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.model = model
        self.forward = forward
        self.capacity = capacity
        self.compile = compile
        self.state: StaticKV | None = None
        self.memory: KVMemory | None = None
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._fill: list[int] = []  # host copy of state.fill
        self._kept: list[int] = []  # entries each layer kept at its last update (for the capacity error)
        # slots/validity of the buffered queries as the memory keeps them: [(batch, n)] handed over by `load`,
        # then the decoded tokens' (all valid, consecutive slots from _decode_start), built only when needed
        self._q_slots: list[torch.Tensor] = []
        self._q_valid: list[torch.Tensor] = []
        self._decode_start = 0
        self._n_decoded = 0
        self._configs = model_configs(model)
        self._n_query = 0
        register_static_attention()

    # ---------------------------------------------------------------- hand-over with the memory
    def load(self, memory: KVMemory) -> StaticDecoder:
        """Take over a memory after its prefill: cache, slots, validity, buffered queries, counters."""
        if memory.evict != "gather":
            raise ValueError("the static cache compacts like evict='gather'; mask-mode memories decode dynamically")
        if memory.n_seen is None or not memory.layers:
            raise ValueError("prefill the memory before decoding from it")
        layers = memory.cache.layers
        n_layers = len(layers)
        first = layers[0]
        b, h, _, d = first.keys.shape
        needs_queries = bool(getattr(memory.policy, "needs_attention", False))
        st0 = memory.layers[0]
        shapes = (n_layers, b, h, d, first.values.shape[-1], first.keys.dtype, first.keys.device, needs_queries)
        if self.state is None or getattr(self, "_shapes", None) != shapes:
            self.state = self._allocate(memory, shapes)
            self._shapes = shapes
            self._compiled = None
        s = self.state
        self._fill, self._kept = [], []
        for i, layer in enumerate(layers):
            st = memory.layers[i]
            n = layer.keys.shape[2]
            if n >= self.capacity:
                raise CapacityError(f"layer {i} already holds {n} entries; the static cache has {self.capacity} "
                                    "(a capacity covers the kept entries plus one update interval of new tokens)")
            s.keys[i][:, :, :n, :d].copy_(layer.keys)
            s.values[i][:, :, :n, : s.head_dim_v].copy_(layer.values)
            s.slots[i][:, :, :n].copy_(st.slots)
            s.valid[i][:, :, :n].copy_(st.valid)
            s.valid[i][:, :, n:].fill_(False)
            s.mark(i)
            self._fill.append(n)
            self._kept.append(n - st.n_new)
            if s.queries is not None and st.queries:
                q = torch.cat(st.queries, dim=2)  # (batch, q_heads, n_new, d)
                s.queries[i][:, :, : q.shape[2]].copy_(q)
        self._n_query = st0.n_new
        self._q_slots, self._q_valid = list(st0.query_slots), list(st0.query_valid)
        self._decode_start, self._n_decoded = memory.n_fed, 0
        s.fill.copy_(torch.tensor(self._fill))
        s.n_query.fill_(self._n_query)
        s.slot.fill_(memory.n_fed)
        s.positions.copy_(memory.n_seen.view(b, 1))
        self.memory = memory
        return self

    def _allocate(self, memory: KVMemory, shapes: tuple) -> StaticKV:
        n_layers, b, h, d, dv, dtype, device, needs_queries = shapes
        c = self.capacity
        width = -(-(max(d, dv) + 1) // 8) * 8  # the penalty column, padded to a multiple of 8 (flash kernels)
        queries = None
        if needs_queries:
            hq = self._query_heads()
            shape = (b, hq, memory.update_interval, d)
            queries = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        s = StaticKV(
            keys=[torch.zeros(b, h, c, width, dtype=dtype, device=device) for _ in range(n_layers)],
            values=[torch.zeros(b, h, c, width, dtype=dtype, device=device) for _ in range(n_layers)],
            slots=[torch.full((b, h, c), -1, dtype=torch.long, device=device) for _ in range(n_layers)],
            valid=[torch.zeros(b, h, c, dtype=torch.bool, device=device) for _ in range(n_layers)],
            queries=queries,
            fill=torch.zeros(n_layers, dtype=torch.long, device=device),
            n_query=torch.zeros(1, dtype=torch.long, device=device),
            slot=torch.zeros(1, dtype=torch.long, device=device),
            positions=torch.zeros(b, 1, dtype=torch.long, device=device),
            head_dim=d,
            head_dim_v=dv,
        )
        for t in [*s.keys, *s.values, *s.slots, *s.valid, *(queries or []), s.fill, s.n_query, s.slot, s.positions]:
            torch._dynamo.mark_static_address(t)  # CUDA graphs replay on these addresses; no guard, no recompile
        return s

    def _query_heads(self) -> int:
        cfg = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        if heads is None:
            raise ValueError("cannot tell the model's query heads (num_attention_heads / n_head)")
        return int(heads)

    def sync(self) -> KVMemory:
        """Hand the state back to the memory: contiguous K/V copies (no views of the static buffers)."""
        memory, s = self._need_loaded(), self.state
        for i, layer in enumerate(memory.cache.layers):
            n = self._fill[i]
            layer.keys = s.keys[i][:, :, :n, : s.head_dim].clone()
            layer.values = s.values[i][:, :, :n, : s.head_dim_v].clone()
            st = memory.layers[i]
            st.slots, st.valid = s.slots[i][:, :, :n].clone(), s.valid[i][:, :, :n].clone()
            st.n_new = self._n_query
            buffered = s.queries is not None and self._n_query > 0
            st.queries = [s.queries[i][:, :, : self._n_query].clone()] if buffered else []
            st.query_slots, st.query_valid = self._query_slots()
        memory.n_seen = s.positions[:, 0].clone()
        self.memory = None  # stepping on needs a new load(): the memory may change from here on
        return memory

    def _query_slots(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([(batch, n)] slots, [(batch, n)] validity) of the buffered queries, in the memory's layout."""
        slots, valid = list(self._q_slots), list(self._q_valid)
        if self._n_decoded:
            b, device = self.state.positions.shape[0], self.state.positions.device
            new = torch.arange(self._decode_start, self._decode_start + self._n_decoded, device=device)
            slots.append(new.expand(b, -1))
            valid.append(torch.ones(b, self._n_decoded, dtype=torch.bool, device=device))
        return slots, valid

    def _need_loaded(self) -> KVMemory:
        if self.memory is None or self.state is None:
            raise RuntimeError("StaticDecoder.load(memory) first")
        return self.memory

    # ---------------------------------------------------------------- stepping
    def _raw_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The fixed-shape part: one token per row through the model; writes and advances the buffers."""
        s = self.state
        logits = self.forward(s, tokens, s.positions)
        s.advance()
        return logits

    def _step_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if not self.compile or not self.state.layer_args:  # the first step runs eagerly: it records layer args
            return self._raw_step
        if self._compiled is None:
            mode = self.compile if isinstance(self.compile, str) else None
            # dynamic=None: a decoder of another capacity recompiles once with the capacity symbolic, then no more
            self._compiled = torch.compile(self._raw_step, mode=mode, dynamic=None, fullgraph=True)
        return self._compiled

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (batch,) or (batch, 1); returns the next logits (batch, vocab), then updates if due."""
        global _ACTIVE
        memory, s = self._need_loaded(), self.state
        tokens = tokens.reshape(-1, 1)
        if max(self._fill) >= self.capacity:
            i = next(i for i, n in enumerate(self._fill) if n >= self.capacity)
            raise CapacityError(
                f"static cache full: layer {i} holds {self._fill[i]} entries (capacity {self.capacity}): "
                f"{self._kept[i]} kept at the last update + {self._fill[i] - self._kept[i]} new tokens; a capacity "
                f"must cover the kept entries plus update_interval={memory.update_interval} (the policy's budget "
                "sets the first; a policy without a token budget may keep every token)")
        fn = self._step_fn()
        cudagraphs = self.compile in ("reduce-overhead", "max-autotune") and tokens.is_cuda  # modes with CUDA graphs
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        _ACTIVE = s
        try:
            with attn_implementation(self._configs, STATIC_ATTN_IMPLEMENTATION):
                logits = fn(tokens)
        finally:
            _ACTIVE = None
        if cudagraphs:  # the graph's output buffer is overwritten by the next replay
            logits = logits.clone()
        self._after_step(memory)
        return logits

    def _after_step(self, memory: KVMemory) -> None:
        """Host bookkeeping of one all-valid token per row, and the memory's update when one is due."""
        self._fill = [n + 1 for n in self._fill]
        self._n_query += 1
        self._n_decoded += 1
        memory.n_fed += 1
        memory._max_seen += 1
        if memory.n_fed % memory.update_interval == 0:
            self._update(memory)

    def _update(self, memory: KVMemory) -> None:
        """The memory's own update on each layer's live entries, then compaction to the buffers' front."""
        s = self.state
        memory.n_seen = s.positions[:, 0].clone()
        q_slots, q_valid = (torch.cat(x, dim=1) for x in self._query_slots())  # (batch, n_query)
        for i, cache_layer in enumerate(memory.cache.layers):
            n, st = self._fill[i], memory.layers[i]
            # contiguous copies of what the policy reads, as the dynamic cache holds them (kernels of the
            # fused update may assume it); values are only gathered
            key, value = s.keys[i][:, :, :n, : s.head_dim].contiguous(), s.values[i][:, :, :n, : s.head_dim_v]
            st.slots, st.valid = s.slots[i][:, :, :n].contiguous(), s.valid[i][:, :, :n].contiguous()
            st.queries = [s.queries[i][:, :, : self._n_query]] if s.queries is not None else []
            st.query_slots, st.query_valid, st.n_new = [q_slots], [q_valid], self._n_query
            cache_layer.keys, cache_layer.values = key, value
            scaling, window = s.layer_args[i]
            memory._update_layer(i, st, key, value, scaling, window)
            if cache_layer.keys is not key:  # evicted: the kept entries (in token order) move to the front
                m = cache_layer.keys.shape[2]
                s.keys[i][:, :, :m, : s.head_dim].copy_(cache_layer.keys)
                s.values[i][:, :, :m, : s.head_dim_v].copy_(cache_layer.values)
                s.slots[i][:, :, :m].copy_(st.slots)
                s.valid[i][:, :, :m].copy_(st.valid)
                s.valid[i][:, :, m:].fill_(False)
                s.mark(i)
                self._fill[i] = m
            self._kept[i] = self._fill[i]
            n = self._fill[i]  # views until sync(): the gathered copies are freed
            cache_layer.keys = s.keys[i][:, :, :n, : s.head_dim]
            cache_layer.values = s.values[i][:, :, :n, : s.head_dim_v]
        s.fill.copy_(torch.tensor(self._fill))
        s.n_query.zero_()
        self._n_query, self._q_slots, self._q_valid = 0, [], []
        self._decode_start, self._n_decoded = memory.n_fed, 0
