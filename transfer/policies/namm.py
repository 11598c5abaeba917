"""NAMM: the frozen, evolved Neural Attention Memory Model as a memory policy.

Default behaviour is the reference rule (keep tokens whose BAM score is >= 0, all heads keep the same
count). `budget` turns on budget mode: at every update the threshold moves to the `budget`-th best score,
so at most that many tokens stay while the learned ranking decides which. `collect_norm=True` is the
reference's statistics pass: keep everything and accumulate the per-bin EMA statistics into `norm`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from transfer.memory import LayerView
from transfer.namm import NAMMBuffers, NAMMConfig, NAMMParams, NormStats, load_namm, namm_update

# Scores are irrelevant in the statistics pass (all-zero parameters); identity statistics avoid a warning.
_IDENTITY_NORM = NormStats(mean=torch.zeros(17), var=torch.ones(17), count=1)
DEFAULT_NAMM = Path(__file__).resolve().parents[2] / "artifacts" / "namm" / "namm-shipped"


@dataclass
class NAMMPolicy:
    theta: torch.Tensor  # (4172,) flat parameters, reference layout
    norm: NormStats | None = None
    config: NAMMConfig = field(default_factory=NAMMConfig)
    budget: float | int | None = None
    collect_norm: bool = False
    # "fp32": the reference's precision everywhere. "fast": the BAM's O(n^2) attention in fp16 flash
    # kernels on CUDA (about 10x faster at 32k keys; fp32 on the CPU, where it buys nothing).
    precision: str = "fp32"
    name: str = "namm"
    needs_attention: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fast"):
            raise ValueError(f"precision must be 'fp32' or 'fast', got {self.precision!r}")
        self.params = NAMMParams.from_flat(self.theta, self.config)
        self._device_params: dict[torch.device, NAMMParams] = {}
        if self.collect_norm:
            self.norm = NormStats.empty()

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, **kwargs) -> NAMMPolicy:
        """Load our format or the reference implementation's checkpoint (default: the shipped NAMM)."""
        theta, norm, config = load_namm(path or DEFAULT_NAMM)
        return cls(theta=theta, norm=norm, config=config, **kwargs)

    def _params_on(self, device: torch.device) -> NAMMParams:
        if device not in self._device_params:
            # The statistics pass runs with all-zero parameters, as the reference's iteration 0 does:
            # every score is 0 >= 0, so nothing is evicted and the buffers cover every token.
            theta = torch.zeros_like(self.theta) if self.collect_norm else self.theta
            self._device_params[device] = NAMMParams.from_flat(theta.to(device), self.config)
        return self._device_params[device]

    def update(self, view: LayerView, state: NAMMBuffers | None) -> tuple[torch.Tensor | None, NAMMBuffers]:
        collecting = self.collect_norm
        out = namm_update(
            view.attn,
            state,
            view.slots,
            self._params_on(view.attn.device),
            _IDENTITY_NORM if collecting else self.norm,
            self.config,
            valid=None if view.all_valid else view.valid,
            max_keep=None if collecting or self.budget is None else view.budget_tokens(self.budget),
            attention_dtype=torch.float16 if self.precision == "fast" and view.attn.is_cuda else None,
            check_finite=False,  # the memory's own attention; a check would sync the device every layer
        )
        if collecting:
            self.norm = self.norm.merge(out.ema, view.valid)
        keep = None if out.keep.shape[-1] == view.keys.shape[2] else out.keep
        return keep, out.buffers
