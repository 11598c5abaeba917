"""L2 key norm (Devoto et al., EMNLP 2024): keep the keys with the LOWEST L2 norm (they draw most attention).

As in the authors' code (`skip_layers`), the first layers are left uncompressed: their attention is
spread out and the norm-attention correlation the rule relies on does not hold there. To stay at the
memory it is given, the budget of the compressed layers is raised so that the mean over all layers
equals the budget (when the model's layer count is known and that is possible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from transfer.policies.base import Keep, LayerView, ScoredPolicy, keep_top_rows


@dataclass
class L2Norm(ScoredPolicy):
    name: ClassVar[str] = "l2"
    description: ClassVar[str] = "L2 (Devoto et al. 2024): keep the keys with the lowest L2 norm; layer 0 uncompressed"
    skip_layers: tuple[int, ...] = (0,)

    def score(self, view: LayerView, state: Any) -> tuple[torch.Tensor, None]:
        return -view.keys.float().norm(dim=-1), None  # (batch, kv_heads, n_keys)

    def select(self, scores: torch.Tensor, view: LayerView) -> Keep:
        if view.layer in self.skip_layers:
            return None
        floor = self.protect_recent + self.protect_sink
        n_max, per_row = view.budget_rows(self.budget, floor)
        n_skip = sum(1 for layer in self.skip_layers if layer < (view.n_layers or 0))
        if view.n_layers and view.n_layers > n_skip:  # spread the skipped layers' surplus over the others
            compressed = view.n_layers - n_skip
            seen = view.budget_tokens(1.0)
            n_max = max(1, floor, (view.n_layers * n_max - n_skip * seen) // compressed)
            if per_row is not None:
                seen_rows = view.n_seen.long()
                per_row = ((view.n_layers * per_row - n_skip * seen_rows) // compressed).clamp(min=max(1, floor))
        return keep_top_rows(scores, n_max, per_row, None if view.all_valid else view.valid)
