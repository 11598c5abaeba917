"""Registry of memory policies: names the CLI and configs use -> one small class each."""

from __future__ import annotations

from typing import Any

from transfer.policies.full import FullCache
from transfer.policies.h2o import H2O
from transfer.policies.l2 import L2Norm
from transfer.policies.random import RandomEviction
from transfer.policies.recency import Recency
from transfer.policies.streaming import StreamingLLM

POLICIES: dict[str, tuple[type, str]] = {
    "full": (FullCache, "keep every token (uncompressed reference)"),
    "recency": (Recency, "keep the newest tokens up to the budget"),
    "streaming": (StreamingLLM, "StreamingLLM: 4 attention-sink tokens + the newest tokens"),
    "h2o": (H2O, "H2O: heavy hitters by accumulated attention + a recent window (half the budget)"),
    "l2": (L2Norm, "L2 (Devoto et al. 2024): keep the keys with the lowest L2 norm"),
    "random": (RandomEviction, "evict uniformly at random down to the budget (seeded)"),
    "namm": (None, "the frozen evolved NAMM: BAM scores on attention spectrograms, keep score >= 0"),
}
BUDGETED = {"recency", "streaming", "h2o", "l2", "random"}


def make_policy(name: str, budget: float | int | None = None, namm: str | None = None, **kwargs: Any) -> Any:
    """Build a policy by name. `budget`: tokens (int) or kept fraction (float); `namm`: checkpoint path."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(POLICIES)}")
    if name == "namm":
        from transfer.policies.namm import NAMMPolicy

        return NAMMPolicy.from_checkpoint(namm, budget=budget, **kwargs)
    cls = POLICIES[name][0]
    if name in BUDGETED:
        if budget is None:
            raise ValueError(f"policy {name!r} needs a budget (tokens or a kept fraction, e.g. 0.5)")
        return cls(budget=budget, **kwargs)
    return cls(**kwargs)
