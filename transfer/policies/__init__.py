"""Registry of memory policies: the names the CLI and configs use -> one small class each.

Each class carries its registry entry as class attributes (`name`, `description`, `budget_rule`), so
adding a policy is one file plus one line in `_CLASSES`.
"""

from __future__ import annotations

from typing import Any

from transfer.policies.base import MemoryPolicy
from transfer.policies.full import FullCache
from transfer.policies.h2o import H2O
from transfer.policies.l2 import L2Norm
from transfer.policies.namm import NAMMPolicy, NAMMRandom, NAMMSink
from transfer.policies.random import RandomEviction
from transfer.policies.recency import Recency
from transfer.policies.snapkv import SnapKV
from transfer.policies.streaming import StreamingLLM

_CLASSES = (FullCache, Recency, StreamingLLM, H2O, SnapKV, L2Norm, RandomEviction, NAMMPolicy, NAMMSink, NAMMRandom)
POLICIES: dict[str, type] = {cls.name: cls for cls in _CLASSES}


def make_policy(name: str, budget: float | int | None = None, namm: str | None = None, **kwargs: Any) -> MemoryPolicy:
    """Build a policy by name. `budget`: tokens (int) or kept fraction (float in (0, 1]); `namm`: checkpoint.

    Other keyword arguments go to the class (e.g. protect_recent, protect_sink, seed, precision).
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if cls.budget_rule == "none":  # nothing is evicted, so nothing needs protecting
        if budget is not None:
            raise ValueError(f"policy {name!r} takes no budget")
        unknown = set(kwargs) - {"protect_recent", "protect_sink"}
        if unknown:
            raise ValueError(f"policy {name!r} takes no options {sorted(unknown)}")
        return cls()
    if issubclass(cls, NAMMPolicy):
        return cls.from_checkpoint(namm, budget=budget, **kwargs)
    return cls(budget=budget, **kwargs)
