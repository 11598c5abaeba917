"""H2O (Zhang et al. 2023): heavy hitters by accumulated attention received, plus a recent window.

The accumulated score of a token is the sum of the (GQA-averaged) attention every query paid to it
since it entered the cache; half of the budget (``recent_ratio``) is reserved for the newest tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfer.memory import LayerView
from transfer.policies.base import gather_state, keep_top


@dataclass
class H2O:
    budget: float | int = 0.5
    recent_ratio: float = 0.5
    name: str = "h2o"
    needs_attention: bool = True

    def update(self, view: LayerView, state: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        received = view.attn.float().sum(2)  # (batch, kv_heads, n_keys)
        if state is not None:  # old tokens carry their sum; new tokens start at 0
            received[..., : state.shape[-1]] += state
        n_keep = view.budget_tokens(self.budget)
        n_recent = int(n_keep * self.recent_ratio)
        # The cache is in token order, so the newest valid tokens are the last ones.
        newer = view.valid.flip(-1).long().cumsum(-1).flip(-1)  # valid tokens at or after each index
        recent = view.valid & (newer <= n_recent)
        scores = received.masked_fill(recent, float("inf"))
        keep = keep_top(scores, n_keep, view.valid)
        return keep, gather_state(received, keep)
