"""Recency: keep the newest `budget` tokens (the reference repo's `Recency` baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from transfer.memory import LayerView
from transfer.policies.base import keep_top, recent_scores


@dataclass
class Recency:
    budget: float | int = 0.5  # tokens (int) or fraction of tokens seen (float <= 1)
    name: str = "recency"
    needs_attention: bool = False

    def update(self, view: LayerView, state: Any) -> tuple[torch.Tensor | None, None]:
        return keep_top(recent_scores(view), view.budget_tokens(self.budget), view.valid), None
