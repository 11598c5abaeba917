"""What a memory policy sees (`LayerView`), what it returns, and the one base every scoring policy shares.

A policy is a small dataclass with

    needs_attention: bool   # should the memory compute the attention slice for it?
    update(view, state) -> (keep, new_state)

`view` describes one layer at one update; `state` is whatever the policy returned for this layer last
time (None at the start of a sequence). `keep` is None (keep everything), a (batch, kv_heads, n_keep)
long tensor of cache indices in ascending order, or a `Selection` when sequences of one batch keep
different counts. `new_state` must already be aligned with `keep`. Policies never touch the cache.

Most policies only rank tokens. They subclass `ScoredPolicy` and implement `score(view, state)`; the
base then applies, in one place and identically for every policy (as kvpress's ScorerPress does):

* the protected set: the newest `protect_recent` and the first `protect_sink` valid tokens of each row
  are never evicted (the question / instruction region, attention sinks). A table uses one W and S
  for every policy and prints them in its header;
* the budget: tokens (int) or a fraction of the tokens seen (float in (0, 1]); the protected set is a
  floor, so a budget below it keeps the protected tokens;
* `keep_top` and the alignment of the policy's per-token state with the kept tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

import torch


@dataclass
class LayerView:
    """What a policy sees of one layer at one update."""

    layer: int
    keys: torch.Tensor  # (batch, kv_heads, n_keys, head_dim), post-positional
    slots: torch.Tensor  # (batch, kv_heads, n_keys) absolute token index of each cached key
    valid: torch.Tensor  # (batch, kv_heads, n_keys) False for padding (and masked-out tokens)
    n_new: int  # keys added since the last update (the last n_new of the cache)
    n_seen: torch.Tensor  # (batch,) valid tokens fed so far
    attn: torch.Tensor | None = None  # (batch, kv_heads, n_new, n_keys), only if policy.needs_attention
    all_valid: bool = False  # every key valid: policies may pass valid=None and skip masking
    max_seen: int | None = None  # n_seen.max() known on the host, so budgets need no device sync
    n_layers: int | None = None  # layers the memory manages (None: unknown)
    equal_seen: bool = False  # every row has seen the same number of tokens (no padding fed so far)

    def budget_tokens(self, budget: float | int) -> int:
        """A budget in tokens (int >= 1) or as a fraction of the tokens seen (0 < float <= 1)."""
        if isinstance(budget, float):
            if not 0.0 < budget <= 1.0:
                raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")
            seen = int(self.n_seen.max()) if self.max_seen is None else self.max_seen
            return max(1, math.ceil(budget * seen))
        if budget < 1:
            raise ValueError(f"a token budget must be >= 1, got {budget}")
        return int(budget)


    def budget_rows(self, budget: float | int, floor: int = 0) -> tuple[int, torch.Tensor | None]:
        """A budget per sequence: (largest count, per-row counts (batch,) or None when all rows are equal).

        A fraction is of each row's OWN tokens seen, so a short (left-padded) prompt keeps what it would
        keep alone; `floor` (the protected tokens) is a minimum. The largest count comes from the host's
        copy of the tokens seen, so no device sync is needed.
        """
        n_max = max(self.budget_tokens(budget), floor)
        if self.equal_seen or self.n_seen.shape[0] == 1 or not isinstance(budget, float):
            return n_max, None
        per_row = (self.n_seen.double() * budget).ceil().long().clamp(min=max(1, floor))  # (batch,)
        return n_max, per_row


class Selection(NamedTuple):
    """Kept cache indices when sequences of a batch keep different counts."""

    index: torch.Tensor  # (batch, kv_heads, n_keep) ascending cache indices
    valid: torch.Tensor  # (batch, kv_heads, n_keep) False on entries a sequence evicts (they become padding)


Keep = torch.Tensor | Selection | None


class MemoryPolicy(Protocol):
    name: ClassVar[str]
    needs_attention: ClassVar[bool]

    def update(self, view: LayerView, state: Any) -> tuple[Keep, Any]: ...


def keep_top(scores: torch.Tensor, n_keep: int, valid: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of the n_keep highest scores per (batch, head), ascending; padding goes first.

    scores, valid (batch, kv_heads, n_keys) -> (batch, kv_heads, n_keep) or None if all fit.
    """
    if n_keep >= scores.shape[-1]:
        return None
    scores = scores.float()
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values


def keep_top_rows(scores: torch.Tensor, n_max: int, per_row: torch.Tensor | None,
                  valid: torch.Tensor | None) -> Keep:
    """`keep_top` with a count per sequence: rows keep their own top per_row[b] (the rest is masked)."""
    if per_row is None:
        return keep_top(scores, n_max, valid)
    n_max = min(n_max, scores.shape[-1])
    scores = scores.float() if valid is None else scores.float().masked_fill(~valid, float("-inf"))
    top = scores.topk(n_max, dim=-1).indices  # (batch, kv_heads, n_max), best first
    index, perm = top.sort(dim=-1)
    rank = torch.arange(n_max, device=scores.device)
    in_budget = (rank < per_row.to(scores.device)[:, None, None]).expand_as(index)
    return Selection(index, in_budget.gather(-1, perm))


def protected_mask(view: LayerView, recent: int | torch.Tensor, sink: int) -> torch.Tensor | None:
    """(batch, kv_heads, n_keys) True for the newest `recent` (an int or one per row) and the first `sink`
    valid tokens of each row."""
    per_row = isinstance(recent, torch.Tensor)
    if not per_row and recent <= 0 and sink <= 0:
        return None
    valid = view.valid
    mask = torch.zeros_like(valid)
    if per_row or recent > 0:  # the cache is in token order: count valid tokens at or after each index
        newer = valid.flip(-1).long().cumsum(-1).flip(-1)
        limit = recent.to(valid.device)[:, None, None] if per_row else recent
        mask |= valid & (newer <= limit)
    if sink > 0:
        mask |= valid & (valid.long().cumsum(-1) <= sink)
    return mask


def gather_state(state: Any, keep: Keep) -> Any:
    """Align a per-token state (batch, kv_heads, n_keys, ...) with the kept tokens."""
    if state is None or keep is None:
        return state
    index = keep.index if isinstance(keep, Selection) else keep
    if hasattr(state, "gather"):
        if isinstance(state, torch.Tensor):
            idx = index.view(*index.shape, *([1] * (state.dim() - 3))).expand(*index.shape, *state.shape[3:])
            return state.gather(2, idx)
        return state.gather(index)  # a state object that knows how to align itself
    raise TypeError(f"cannot align policy state of type {type(state).__name__} with kept tokens")


@dataclass
class ScoredPolicy:
    """Base of every ranking policy: subclasses give `score`, the base applies protection and budget.

    Class attributes drive the registry and the CLI: `name`, `description`, `budget_rule` ("required":
    needs a budget; "optional": runs without one; "none": never takes one), `needs_attention`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    budget_rule: ClassVar[str] = "required"
    needs_attention: ClassVar[bool] = False

    budget: float | int | None = field(default=None, kw_only=True)
    protect_recent: int = field(default=0, kw_only=True)  # newest valid tokens per row never evicted
    protect_sink: int = field(default=0, kw_only=True)  # first valid tokens per row never evicted

    def __post_init__(self) -> None:
        if self.budget_rule == "required" and self.budget is None:
            raise ValueError(f"policy {self.name!r} needs a budget (tokens or a kept fraction, e.g. 0.5)")
        if self.protect_recent < 0 or self.protect_sink < 0:
            raise ValueError("protected token counts must be >= 0")

    def score(self, view: LayerView, state: Any) -> tuple[torch.Tensor, Any]:
        """(scores (batch, kv_heads, n_keys), new per-token state aligned with the CURRENT cache)."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, view: LayerView) -> Keep:
        """Budget rule: each sequence keeps its top `budget` scores, never fewer than the protected set."""
        n_max, per_row = view.budget_rows(self.budget, self.protect_recent + self.protect_sink)
        return keep_top_rows(scores, n_max, per_row, None if view.all_valid else view.valid)

    def update(self, view: LayerView, state: Any) -> tuple[Keep, Any]:
        scores, state = self.score(view, state)
        protected = protected_mask(view, self.protect_recent, self.protect_sink)
        if protected is not None:
            scores = scores.float().masked_fill(protected, float("inf"))
        keep = self.select(scores, view)
        return keep, gather_state(state, keep)
