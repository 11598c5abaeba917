"""Recency: keep the newest `budget` tokens (the reference repo's `Recency` baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from transfer.policies.base import LayerView, ScoredPolicy


def recent_scores(view: LayerView) -> torch.Tensor:
    """Newer tokens score higher: (batch, kv_heads, n_keys) slot indices."""
    return view.slots.float()


@dataclass
class Recency(ScoredPolicy):
    name: ClassVar[str] = "recency"
    description: ClassVar[str] = "keep the newest tokens up to the budget"

    def score(self, view: LayerView, state: Any) -> tuple[torch.Tensor, None]:
        return recent_scores(view), None
