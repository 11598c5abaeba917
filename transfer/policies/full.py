"""Full cache: the uncompressed reference row of every table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transfer.memory import LayerView


@dataclass
class FullCache:
    name: str = "full"
    needs_attention: bool = False

    def update(self, view: LayerView, state: Any) -> tuple[None, None]:
        return None, None
