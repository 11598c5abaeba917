"""H2O (Zhang et al. 2023): heavy hitters by accumulated attention received, plus a recent window.

The accumulated score of a token is the sum of the (GQA-averaged) attention every query paid to it
since it entered the cache; half of the budget (``recent_ratio``) is reserved for the newest tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from transfer.policies.base import LayerView, ScoredPolicy, protected_mask


@dataclass
class H2O(ScoredPolicy):
    name: ClassVar[str] = "h2o"
    description: ClassVar[str] = "H2O: heavy hitters by accumulated attention + a recent window (half the budget)"
    needs_attention: ClassVar[bool] = True
    recent_ratio: float = 0.5

    def score(self, view: LayerView, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        received = view.attn.float().sum(2)  # (batch, kv_heads, n_keys)
        if state is not None:  # old tokens carry their sum; new tokens start at 0
            received[..., : state.shape[-1]] += state
        n_max, per_row = view.budget_rows(self.budget)
        n_recent = int(n_max * self.recent_ratio) if per_row is None else (per_row * self.recent_ratio).long()
        recent = protected_mask(view, recent=n_recent, sink=0)
        scores = received if recent is None else received.masked_fill(recent, float("inf"))
        return scores, received
