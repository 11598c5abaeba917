"""GPT-2: learned absolute positions and a fused QKV projection (`c_attn`).

GPT2Attention splits `c_attn` into q/k/v itself and then calls transformers' attention interface with
`layer_idx` and its own `scaling` (head_dim**-0.5, optionally / (layer_idx + 1)), so the memory gets
exactly what it needs and CausalLMAdapter's prefill/generate serve GPT-2 unchanged: its learned
position table is indexed by the absolute `position_ids` the adapter passes, never by the cache length.
What is GPT-2's own: the position table ends at `n_positions`, and cross-attention caches are not ours.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import PreTrainedModel

from adapters.causal_lm import CausalLMAdapter
from transfer.memory import KVMemory


class GPT2Adapter(CausalLMAdapter):
    family: ClassVar[str] = "gpt2"
    model_types: ClassVar[tuple[str, ...]] = ("gpt2",)

    def __init__(self, model: PreTrainedModel) -> None:
        if getattr(model.config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
        super().__init__(model)

    def prefill(
        self,
        memory: KVMemory,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int = 512,
    ) -> torch.Tensor:
        """As CausalLMAdapter.prefill; refuses (before any forward) to run past the learned position table."""
        seen = 0 if memory.n_seen is None else int(memory.n_seen.max())
        new = input_ids.shape[1] if attention_mask is None else int(attention_mask.sum(1).max())
        limit = self.model.config.n_positions
        if seen + new > limit:
            raise ValueError(f"GPT-2 has {limit} learned positions; this input would need {seen + new}")
        return super().prefill(memory, input_ids, attention_mask, chunk_size)

    def static_decode(
        self,
        memory: KVMemory,
        logits: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        compile: bool | str = False,
        capacity: int | None = None,
    ) -> torch.Tensor:
        """As Adapter.static_decode; refuses (before any step) a decode that would run past the position table
        (the static step has no host check per token, and an index past the table is a device error)."""
        need = int(memory.n_seen.max()) + max_new_tokens - 1  # the last fed token's position + 1
        limit = self.model.config.n_positions
        if need > limit:
            raise ValueError(f"GPT-2 has {limit} learned positions; this decode would need {need}")
        return super().static_decode(memory, logits, max_new_tokens, eos_token_id, compile, capacity)
