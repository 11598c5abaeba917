"""Registry: HF `config.model_type` -> the adapter (one file per model family)."""

from __future__ import annotations

from adapters.base import Adapter
from adapters.causal_lm import CausalLMAdapter
from adapters.decision_transformer import DecisionTransformerAdapter
from adapters.gpt2 import GPT2Adapter
from adapters.llava_next_video import LlavaNextVideoAdapter
from adapters.qwen2 import Qwen2Adapter

ADAPTERS: list[type[Adapter]] = [
    CausalLMAdapter, DecisionTransformerAdapter, GPT2Adapter, Qwen2Adapter, LlavaNextVideoAdapter,
]


def adapter_for(model_type: str) -> type[Adapter]:
    """The adapter class serving a model type; one clear error for unknown ones."""
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    known = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise ValueError(f"unknown model type {model_type!r}: no adapter; supported: {', '.join(known)}")
