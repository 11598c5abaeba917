"""Random eviction at the same budget: the floor any informed rule must beat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from transfer.memory import LayerView
from transfer.policies.base import keep_top


@dataclass
class RandomEviction:
    budget: float | int = 0.5
    seed: int = 0
    name: str = "random"
    needs_attention: bool = False
    _gen: torch.Generator | None = field(default=None, repr=False)

    def update(self, view: LayerView, state: Any) -> tuple[torch.Tensor | None, None]:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(view.slots.shape, generator=self._gen).to(view.slots.device)
        return keep_top(scores, view.budget_tokens(self.budget), view.valid), None
