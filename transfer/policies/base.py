"""The one interface every memory policy implements, and the two helpers budgeted rules share.

A policy is a small dataclass with

    needs_attention: bool   # should the memory compute the attention slice for it?
    update(view, state) -> (keep, new_state)

`view` is a `transfer.memory.LayerView` (keys, slots, validity, and the attention of the queries since
the last update when asked for); `state` is whatever the policy returned for this layer last time
(None at the start of a sequence). `keep` is a (batch, kv_heads, n_keep) long tensor of cache indices
in ascending order, or None to keep everything; `new_state` must already be aligned with the kept
tokens. Policies never touch the cache themselves.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from transfer.memory import LayerView


class MemoryPolicy(Protocol):
    name: str
    needs_attention: bool

    def update(self, view: LayerView, state: Any) -> tuple[torch.Tensor | None, Any]: ...


def keep_top(scores: torch.Tensor, n_keep: int, valid: torch.Tensor) -> torch.Tensor | None:
    """Indices of the n_keep highest scores per (batch, head), ascending; padding goes first.

    scores, valid (batch, kv_heads, n_keys) -> (batch, kv_heads, n_keep) or None if all fit.
    """
    if n_keep >= scores.shape[-1]:
        return None
    scores = scores.float().masked_fill(~valid, float("-inf"))
    return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values


def recent_scores(view: LayerView) -> torch.Tensor:
    """Newer tokens score higher; used to protect a recent window."""
    return view.slots.float()


def gather_state(state: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """Align a per-token state (batch, kv_heads, n_keys, ...) with the kept tokens."""
    if state is None or keep is None:
        return state
    idx = keep.view(*keep.shape, *([1] * (state.dim() - 3))).expand(*keep.shape, *state.shape[3:])
    return state.gather(2, idx)
