"""SnapKV (Li et al. 2024): keep the tokens the newest queries attend to, smoothed over neighbours.

Scored as kvpress's `SnapKVPress` scores them: the attention of the last `window` queries (the observation
window) over the keys before the window, averaged over those queries and over the query heads of each KV
head, then a 1-D average pooling over neighbouring keys (kernel_size, stride 1, zero padding of
kernel_size // 2, the pad counted in the mean, as `F.avg_pool1d`). The window's own tokens are always kept
(kvpress pads them with the largest score + 1; here they score above every vote, newest first, so a budget
below the window keeps its newest tokens instead of an arbitrary tie-break).

In our memory the policy runs at every update and sees `view.attn`, the attention of the `n_new` queries
since the last update over the whole cache (older kept tokens included), so the window is the last
min(window, n_new) of those queries and tokens. kvpress scores once, at the end of the prefill.

GQA: kvpress averages each query head's probabilities over the window, pools, then averages the pooled
scores over the heads of a group; `attention_slice` gives the group mean of the probabilities first, and
here the window mean and the pooling follow. All three are linear, so the scores agree exactly in real
arithmetic and only to float rounding in practice (fp32: ~1e-7 relative; in bf16 both round the
probabilities to bf16, then kvpress averages and pools in bf16, we in fp32). kvpress's sdpa path
recomputes the window logits with 1/sqrt(head_dim); we use the probabilities the model used (its own
scaling: the same for Llama).
tests/test_kvpress_equivalence.py checks the kept tokens equal kvpress's on a tiny Llama.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from transfer.policies.base import LayerView, ScoredPolicy


@dataclass
class SnapKV(ScoredPolicy):
    name: ClassVar[str] = "snapkv"
    description: ClassVar[str] = "SnapKV: pooled attention of the last 64 queries; that window always kept"
    budget_rule: ClassVar[str] = "required"
    needs_attention: ClassVar[bool] = True
    window: int = 64  # kvpress's window_size
    kernel_size: int = 5  # kvpress's kernel_size (odd, so the pooled scores keep their length)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"snapkv needs window >= 1 and an odd kernel_size, got {self.window}, {self.kernel_size}")

    def score(self, view: LayerView, state: Any) -> tuple[torch.Tensor, None]:
        attn = view.attn  # (batch, kv_heads, n_new, n_keys), GQA mean of the probabilities
        n_keys = attn.shape[-1]
        w = min(self.window, view.n_new, n_keys)
        votes = attn[..., -w:, : n_keys - w].float().mean(2)  # (batch, kv_heads, n_keys - w)
        if votes.shape[-1] > 0:  # pooling over keys: (batch, kv_heads) act as avg_pool1d's (N, C)
            votes = F.avg_pool1d(votes, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        # votes are means of probabilities, so <= 1: the window (2 + its slot) ranks above them, newest first
        window = 2.0 + view.slots[..., n_keys - w:].float()  # (batch, kv_heads, w)
        return torch.cat([votes, window], dim=-1), None
