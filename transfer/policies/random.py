"""Random eviction at the same budget: the floor any informed rule must beat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from transfer.policies.base import LayerView, ScoredPolicy


@dataclass
class RandomEviction(ScoredPolicy):
    name: ClassVar[str] = "random"
    description: ClassVar[str] = "evict uniformly at random down to the budget (seeded)"
    seed: int = 0
    _gen: torch.Generator | None = field(default=None, repr=False)

    def score(self, view: LayerView, state: Any) -> tuple[torch.Tensor, None]:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(view.slots.shape, generator=self._gen).to(view.slots.device), None
