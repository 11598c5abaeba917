"""Full cache: the uncompressed reference row of every table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from transfer.policies.base import LayerView


@dataclass
class FullCache:
    name: ClassVar[str] = "full"
    description: ClassVar[str] = "keep every token (uncompressed reference)"
    budget_rule: ClassVar[str] = "none"
    needs_attention: ClassVar[bool] = False

    def update(self, view: LayerView, state: Any) -> tuple[None, None]:
        return None, None
