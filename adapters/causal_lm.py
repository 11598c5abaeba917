"""Causal LMs on transformers' attention interface (Llama, Mistral, Qwen3, Gemma, Phi-3, ...).

Chunked prefill and greedy decoding.

Everything these models share goes through transformers' attention interface, so the family code is
only: which token ids go in, with which absolute positions, and how to pick the next token.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from adapters.base import Adapter, greedy_decode
from transfer.memory import KVMemory
from transfer.static_cache import StaticKV


class CausalLMAdapter(Adapter):
    family: ClassVar[str] = "causal_lm"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen3", "gemma", "phi3")

    @classmethod
    def from_pretrained(cls, id_or_path: str, device: str = "cpu", dtype: Any = None) -> CausalLMAdapter:
        """Load an HF checkpoint of this family; a checkpoint of another model type is one clear error."""
        model_type = AutoConfig.from_pretrained(id_or_path).model_type
        if model_type not in cls.model_types:
            raise ValueError(f"{id_or_path} is a {model_type!r} model, not one of {', '.join(cls.model_types)}")
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(id_or_path, dtype=dtype)
        return cls(model.to(device))

    def prefill(
        self,
        memory: KVMemory,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int = 512,
    ) -> torch.Tensor:
        """Feed a (left-padded) prompt; returns the next-token logits (batch, vocab)."""
        input_ids = input_ids.to(self.device)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        valid = valid.to(self.device)
        pad = (-input_ids.shape[1]) % memory.update_interval if memory.n_fed == 0 else 0
        if pad:  # a new prompt is left-padded to whole update intervals, so that its updates are counted back
            # from its end: a left-padded batch then updates each prompt where batch 1 would
            input_ids = torch.nn.functional.pad(input_ids, (pad, 0))
            valid = torch.nn.functional.pad(valid, (pad, 0), value=False)

        def forward(start: int, end: int, positions: torch.Tensor) -> torch.Tensor:
            out = self.model(
                input_ids=input_ids[:, start:end],
                position_ids=positions,
                past_key_values=memory.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1].float()

        return self.feed(memory, input_ids.shape[1], forward, valid, chunk_size)

    def generate(
        self,
        memory: KVMemory,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        chunk_size: int = 512,
        static: bool = False,
        compile: bool | str = False,
    ) -> torch.Tensor:
        """Greedy decoding after a chunked prefill; the policy keeps running every update_interval tokens.

        Returns (batch, <= max_new_tokens) new token ids; rows that hit EOS are padded with EOS.
        `static` decodes on a compacting static cache (same tokens), `compile` also compiles its step.
        """
        logits = self.prefill(memory, input_ids, attention_mask, chunk_size)
        if static or compile:
            return self.static_decode(memory, logits, max_new_tokens, eos_token_id, compile)
        return greedy_decode(
            logits, lambda token: self.prefill(memory, token[:, None]), max_new_tokens, eos_token_id
        )

    def static_forward(self, cache: StaticKV, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decode forward of `prefill` without the feeding: (batch, 1) tokens -> (batch, vocab) logits."""
        out = self.model(input_ids=tokens, position_ids=positions, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].float()
