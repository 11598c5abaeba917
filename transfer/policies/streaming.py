"""StreamingLLM (Xiao et al. 2023): the first `n_sink` tokens plus a window of the newest ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from transfer.policies.base import LayerView, ScoredPolicy, protected_mask
from transfer.policies.recency import recent_scores


@dataclass
class StreamingLLM(ScoredPolicy):
    name: ClassVar[str] = "streaming"
    description: ClassVar[str] = "StreamingLLM: 4 attention-sink tokens + the newest tokens"
    n_sink: int = 4

    def score(self, view: LayerView, state: Any) -> tuple[torch.Tensor, None]:
        # Sinks are the first n_sink *valid* tokens of each row (after left padding).
        sink = protected_mask(view, recent=0, sink=self.n_sink)
        return recent_scores(view).masked_fill(sink, float("inf")), None
