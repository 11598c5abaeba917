"""Qwen2: Llama layout plus biases on q/k/v, served by CausalLMAdapter with only model_types changed.

The biases are added inside q_proj/k_proj/v_proj before rotary embedding, so the memory sees the same
post-positional queries and keys as for Llama. What is Qwen2's own is the optional sliding-window
attention (`use_sliding_window`): the memory attends over the whole kept cache and DynamicCache would
crop sliding layers behind the memory's back, so such configs are refused instead of run wrongly.
Released Qwen2/Qwen2.5 checkpoints ship with use_sliding_window=false.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedModel

from adapters.llama import CausalLMAdapter


class Qwen2Adapter(CausalLMAdapter):
    family: ClassVar[str] = "qwen2"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2",)

    def __init__(self, model: PreTrainedModel) -> None:
        layer_types = getattr(model.config, "layer_types", None) or []
        if "sliding_attention" in layer_types:
            raise ValueError("Qwen2 sliding-window layers (use_sliding_window=True) are not supported")
        super().__init__(model)

    @classmethod
    def from_pretrained(cls, id_or_path: str, device: str = "cpu", dtype: Any = None) -> Qwen2Adapter:
        model_type = AutoConfig.from_pretrained(id_or_path).model_type
        if model_type not in cls.model_types:
            raise ValueError(f"{id_or_path} is a {model_type!r} model, not Qwen2")
        return super().from_pretrained(id_or_path, device, dtype)
