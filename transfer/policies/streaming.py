"""StreamingLLM (Xiao et al. 2023): the first `n_sink` tokens plus a window of the newest ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from transfer.memory import LayerView
from transfer.policies.base import keep_top, recent_scores


@dataclass
class StreamingLLM:
    budget: float | int = 0.5
    n_sink: int = 4
    name: str = "streaming"
    needs_attention: bool = False

    def update(self, view: LayerView, state: Any) -> tuple[torch.Tensor | None, None]:
        scores = recent_scores(view)
        # Sinks are the first n_sink *valid* tokens of each row: rank valid tokens by slot.
        rank = view.valid.long().cumsum(-1) - 1  # (batch, kv_heads, n_keys)
        sink = view.valid & (rank < self.n_sink)
        scores = torch.where(sink, torch.full_like(scores, float("inf")), scores)
        return keep_top(scores, view.budget_tokens(self.budget), view.valid), None
