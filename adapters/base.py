"""The adapter contract: what one model family provides so that every memory policy runs on it.

An adapter owns a Hugging Face model and knows how to feed it (tokens, video frames, RL steps).
It must:

1. route every self-attention layer through `transfer.memory.memory_attention`
   (`install_memory_attention` does this for any model that uses transformers' `AttentionInterface`;
   each such module has `layer_idx`). The model's own SDPA/flash path stays in charge outside a memory;
2. give the memory the *post-positional* queries and the full cached keys/values of each layer: this
   is exactly what transformers passes to an attention function, so families on the interface get it
   for free;
3. keep positions right after eviction: pass absolute `position_ids` (or the family's own time
   embedding) computed from tokens *seen*, never from the cache length, since the cache shrinks;
4. feed inputs through `feed()`, which splits them so that no forward crosses an update boundary
   and announces each chunk (with its padding mask) to the memory.

Nothing in an adapter knows which policy runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from transfer.memory import ATTN_IMPLEMENTATION, KVMemory, register_attention
from transfer.static_cache import StaticDecoder, StaticKV, default_capacity


def install_memory_attention(model: PreTrainedModel) -> None:
    """Select our attention function on the model (and all its sub-models)."""
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


class Adapter:
    """Base class: one subclass per model family (one file each in adapters/)."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # HF config.model_type values this adapter serves

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        install_memory_attention(self.model)

    # -- what the memory needs to know about the model ------------------------------------------
    @property
    def text_config(self) -> Any:
        """Config of the decoder whose KV cache is managed (the LM of a VLM)."""
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_memory(self, policy: Any, update_interval: int = 512, **kwargs: Any) -> KVMemory:
        """An empty cache for one batch of sequences, managed by `policy`.

        Sliding-window layers become plain layers: the memory applies the window in its mask, and a
        layer that crops itself would desynchronise the memory's slot bookkeeping.
        """
        cache = DynamicCache(config=self.text_config)
        cache.layers = [DynamicLayer() if isinstance(lay, DynamicSlidingWindowLayer) else lay for lay in cache.layers]
        return KVMemory(policy, cache, update_interval=update_interval, **kwargs)

    # -- feeding ------------------------------------------------------------------------------------
    def feed(
        self,
        memory: KVMemory,
        n_tokens: int,
        forward: Callable[[int, int, torch.Tensor], Any],
        valid: torch.Tensor,
        max_chunk: int = 512,
    ) -> Any:
        """Run `forward(start, end, position_ids)` over [0, n_tokens) in update-aligned chunks.

        valid (batch, n_tokens) marks padding; position_ids (batch, chunk) count valid tokens seen,
        so they stay absolute after eviction and skip left padding. Returns the last forward's output.
        """
        batch = valid.shape[0]
        out, start = None, 0
        for size in memory.chunk_sizes(n_tokens, max_chunk):
            end = start + size
            chunk_valid = valid[:, start:end]
            seen = memory.n_seen if memory.n_seen is not None else torch.zeros(batch, dtype=torch.long)
            positions = (seen.to(chunk_valid.device)[:, None] + chunk_valid.long().cumsum(1) - 1).clamp(min=0)
            memory.begin_chunk(size, chunk_valid)
            with memory.active(), torch.no_grad():
                out = forward(start, end, positions)
            start = end
        return out

    # -- decoding through a compacting static cache (transfer/static_cache.py) ----------------------
    def static_forward(self, cache: StaticKV, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row (batch, 1) at positions (batch, 1) with `cache` as past_key_values -> logits
        (batch, vocab) fp32. Families that decode text implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not decode tokens")

    def static_decoder(self, capacity: int, compile: bool | str = False) -> StaticDecoder:
        """The adapter's decoder for (capacity, compile), reused across calls so that it compiles once; a
        different request replaces it (one set of static buffers per adapter)."""
        key, decoder = self.__dict__.get("_static_decoder", (None, None))
        if key != (capacity, compile):
            decoder = StaticDecoder(self.model, self.static_forward, capacity, compile)
            self._static_decoder = ((capacity, compile), decoder)
        return decoder

    def static_decode(
        self,
        memory: KVMemory,
        logits: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        compile: bool | str = False,
        capacity: int | None = None,
    ) -> torch.Tensor:
        """`greedy_decode` on a static cache of `capacity` entries per layer (default: the policy's budget
        plus one update interval); the memory gets its state back afterwards. Same tokens as the dynamic
        decode; `compile` runs the step under torch.compile (a mode string, e.g. "reduce-overhead")."""
        decoder = self.static_decoder(capacity or default_capacity(memory, max_new_tokens), compile).load(memory)
        try:
            return greedy_decode(logits, decoder.step, max_new_tokens, eos_token_id)
        finally:
            decoder.sync()


def greedy_decode(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor], torch.Tensor],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding shared by the text-generating adapters.

    logits (batch, vocab) come from the prefill; step(tokens (batch,)) feeds one token per row under the
    memory and returns the next logits. Returns (batch, <= max_new_tokens); finished rows repeat EOS.
    """
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    new_tokens: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        token = logits.argmax(-1)  # (batch,)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        new_tokens.append(token)
        if bool(done.all()) or len(new_tokens) == max_new_tokens:
            break
        logits = step(token)
    return torch.stack(new_tokens, dim=1)
