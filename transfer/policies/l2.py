"""L2 key norm (Devoto et al. 2024): keep the keys with the LOWEST L2 norm (they draw most attention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from transfer.memory import LayerView
from transfer.policies.base import keep_top


@dataclass
class L2Norm:
    budget: float | int = 0.5
    name: str = "l2"
    needs_attention: bool = False

    def update(self, view: LayerView, state: Any) -> tuple[torch.Tensor | None, None]:
        scores = -view.keys.float().norm(dim=-1)  # (batch, kv_heads, n_keys)
        return keep_top(scores, view.budget_tokens(self.budget), view.valid), None
