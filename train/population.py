"""Several memory policies in one batched forward: rows of a batch grouped, one policy per group.

CMA-ES members differ only in the NAMM's parameters, so evaluating them one after another wastes a GPU
that a small LM cannot fill. `RowGroups` stacks the members along the batch: rows [0, n_0) belong to
policy 0, the next n_1 rows to policy 1, and so on. At every layer update each policy scores and selects
on ITS rows only (the view is sliced by rows), so a sequence's decisions depend on its own policy and its
own tokens, never on its batch-mates; the groups' selections are then merged into one `Selection` (kept
tokens in ascending order, each row padded with tokens it evicts, marked invalid). The memory and the
LM are shared, which is where the speed-up comes from.

`answer_groups` is `tasks.language.answer_batch` for such a stacked batch: it calls `answer_batch`
itself (one definition of how prompts are answered), with a `RowGroups` as the policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from tasks.language import answer_batch
from transfer.policies.base import Keep, LayerView, ScoredPolicy, Selection, gather_state, protected_mask
from transfer.policies.namm import NAMMStack, stackable


def _view_rows(view: LayerView, start: int, stop: int) -> LayerView:
    """The part of a layer view that belongs to rows [start, stop) of the batch."""
    rows = slice(start, stop)
    n_seen = view.n_seen[rows]
    all_valid = view.all_valid or bool(view.valid[rows].all())
    equal = view.equal_seen or bool((n_seen == n_seen[0]).all())
    return replace(
        view, keys=view.keys[rows], slots=view.slots[rows], valid=view.valid[rows], n_seen=n_seen,
        attn=None if view.attn is None else view.attn[rows], all_valid=all_valid,
        max_seen=view.max_seen if view.equal_seen else int(n_seen.max()), equal_seen=equal,
    )


def _kept_mask(keep: Keep, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """(rows, kv_heads, n_keys) bool: True on the cache entries a policy's `keep` keeps (and are valid)."""
    if keep is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    index, valid = (keep.index, keep.valid) if isinstance(keep, Selection) else (keep, None)
    src = torch.ones_like(index, dtype=torch.bool) if valid is None else valid
    return torch.zeros(shape, dtype=torch.bool, device=device).scatter_(-1, index, src)


def merge_keeps(keeps: Sequence[Keep], sizes: Sequence[int], view: LayerView) -> Keep:
    """One `Keep` for the whole batch from each group's own `Keep` (groups in row order).

    All None -> None; plain index tensors of one width -> their concatenation (what each group alone
    would have returned); otherwise a `Selection` whose rows keep exactly their group's tokens, in
    ascending cache order, padded to the widest row with evicted tokens marked invalid.
    """
    if all(k is None for k in keeps):
        return None
    widths = {k.shape[-1] for k in keeps if isinstance(k, torch.Tensor)}
    if all(isinstance(k, torch.Tensor) for k in keeps) and len(widths) == 1:
        return torch.cat(list(keeps), dim=0)
    b, h, n = view.valid.shape
    masks, start = [], 0
    for keep, size in zip(keeps, sizes):
        masks.append(_kept_mask(keep, torch.Size((size, h, n)), view.valid.device) & view.valid[start : start + size])
        start += size
    kept = torch.cat(masks, dim=0)  # (batch, kv_heads, n_keys)
    width = int(kept.sum(-1).max())
    # kept entries first (in cache order), then evicted ones (in cache order); the first `width` sorted
    order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    index = order.sort(dim=-1).values
    return Selection(index, kept.gather(-1, index))


@dataclass
class RowGroups:
    """A memory policy made of several policies, each over a contiguous block of batch rows."""

    name: ClassVar[str] = "row-groups"
    policies: list[Any]
    sizes: list[int]  # rows of each policy, in batch order

    def __post_init__(self) -> None:
        if len(self.policies) != len(self.sizes) or min(self.sizes, default=0) < 1:
            raise ValueError("RowGroups needs one positive row count per policy")

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return any(getattr(p, "needs_attention", False) for p in self.policies)

    def update(self, view: LayerView, state: list[Any] | None) -> tuple[Keep, list[Any]]:
        if view.keys.shape[0] != sum(self.sizes):
            raise ValueError(f"RowGroups covers {sum(self.sizes)} rows, the batch has {view.keys.shape[0]}")
        state = state or [None] * len(self.policies)
        keeps, states, start = [], [], 0
        for policy, size, st in zip(self.policies, self.sizes, state):
            part = _view_rows(view, start, start + size)
            if not getattr(policy, "needs_attention", False):
                part = replace(part, attn=None)
            if isinstance(policy, ScoredPolicy):  # ScoredPolicy.update, with the state aligned after the merge
                scores, st = policy.score(part, st)
                protected = protected_mask(part, policy.protect_recent, policy.protect_sink)
                if protected is not None:
                    scores = scores.float().masked_fill(protected, float("inf"))
                keep = policy.select(scores, part)
            else:
                keep, st = policy.update(part, st)
                if st is not None:
                    raise TypeError(f"RowGroups: policy {policy.name!r} keeps a state but is no ScoredPolicy")
            keeps.append(keep)
            states.append(st)
            start += size
        merged = merge_keeps(keeps, self.sizes, view)
        if merged is None:
            return None, states
        index = merged.index if isinstance(merged, Selection) else merged
        out, start = [], 0
        for st, size in zip(states, self.sizes):
            out.append(gather_state(st, index[start : start + size]))
            start += size
        return merged, out


def stack_policies(policies: Sequence[Any], sizes: Sequence[int]) -> tuple[list[Any], list[int]]:
    """Merge each run of consecutive NAMMs that differ only in their parameters into one `NAMMStack`.

    A stack scores all its members' rows in one batched update, so a pass of 40 members costs one
    update per layer instead of 40 (each with its own kernels and host syncs). Returns (policies, rows).
    """
    parts: list[Any] = []
    part_sizes: list[int] = []
    runs: list[tuple[list[Any], list[int]]] = []
    for policy, size in zip(policies, sizes):
        if runs and stackable([runs[-1][0][0], policy]):
            runs[-1][0].append(policy)
            runs[-1][1].append(size)
        else:
            runs.append(([policy], [size]))
    for members, rows in runs:
        parts.append(members[0] if len(members) == 1 else NAMMStack.from_policies(members, rows))
        part_sizes.append(sum(rows))
    return parts, part_sizes


def answer_groups(
    adapter: Any,
    tokenizer: Any,
    groups: Sequence[tuple[Callable[[], Any], list[Any]]],
    update_interval: int,
    rows_per_pass: int,
    stack: bool = True,
) -> list[list[dict[str, Any]]]:
    """Answer each group's examples under its own policy, many groups per forward (`rows_per_pass` rows).

    groups: (policy factory, synthetic examples). Returns one list of `answer_batch` rows per group, in
    order. A policy object is made once per group and serves every pass its rows fall in (policies keep
    their per-sequence state in the memory, not in themselves). `stack`: consecutive NAMMs that differ only
    in their parameters run as one `NAMMStack` (False: one update per member, the slower path the
    benches compare with).
    """
    rows = [(g, ex) for g, (_, examples) in enumerate(groups) for ex in examples]
    policies = [factory() for factory, _ in groups]
    out: list[list[dict[str, Any]]] = [[] for _ in groups]
    for start in range(0, len(rows), rows_per_pass):
        chunk = rows[start : start + rows_per_pass]
        owners: list[int] = []
        sizes: list[int] = []
        for g, _ in chunk:
            if owners and owners[-1] == g:
                sizes[-1] += 1
            else:
                owners.append(g)
                sizes.append(1)
        members = [policies[g] for g in owners]
        parts, part_sizes = stack_policies(members, sizes) if stack else (members, sizes)
        if len(parts) == 1:  # one policy (or one stack of NAMMs): exactly answer_batch
            factory: Callable[[], Any] = lambda p=parts[0]: p  # noqa: E731
        else:
            factory = lambda p=parts, s=part_sizes: RowGroups(p, s)  # noqa: E731
        answered = answer_batch(adapter, tokenizer, factory, [ex for _, ex in chunk], update_interval)
        for (g, _), row in zip(chunk, answered):
            out[g].append(row)
    return out
