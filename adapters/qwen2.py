"""Qwen2: Llama layout plus biases on q/k/v, served by CausalLMAdapter with only model_types changed.

The biases are added inside q_proj/k_proj/v_proj before rotary embedding, so the memory sees the same
post-positional queries and keys as for Llama. Optional sliding-window layers (`use_sliding_window`)
reach the memory as the attention function's `sliding_window` argument and are applied in its slot mask.
"""

from __future__ import annotations

from typing import ClassVar

from adapters.causal_lm import CausalLMAdapter


class Qwen2Adapter(CausalLMAdapter):
    family: ClassVar[str] = "qwen2"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2",)
