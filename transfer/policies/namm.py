"""NAMM: the frozen, evolved Neural Attention Memory Model as a memory policy, and its random controls.

Default behaviour is the reference rule (keep tokens whose BAM score is >= 0; all heads of a sequence
keep the same count, the newest token always stays). `budget` turns on budget mode: at every update
the threshold moves to the `budget`-th best score, so at most that many tokens stay while the learned
ranking decides which. The protected set of `ScoredPolicy` applies as for every other policy.
`collect_norm=True` is the reference's statistics pass: keep everything and accumulate the per-bin
EMA statistics into `norm`. `NAMMRandom` is the control every table needs: the same network with
random parameters at the evolved NAMM's parameter scale and with its normalisation statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from transfer.checkpoint import load_namm
from transfer.fused import fused_default, fused_namm_score
from transfer.namm import NAMMBuffers, NAMMConfig, NAMMParams, NormStats, namm_score, newest_index, select_keep
from transfer.policies.base import Keep, LayerView, ScoredPolicy, Selection, keep_top_rows, protected_mask


@dataclass
class NAMMPolicy(ScoredPolicy):
    name: ClassVar[str] = "namm"
    description: ClassVar[str] = "the frozen evolved NAMM: BAM scores on attention spectrograms, keep score >= 0"
    budget_rule: ClassVar[str] = "optional"
    needs_attention: ClassVar[bool] = True

    theta: torch.Tensor  # (param_size,) flat parameters, reference layout
    norm: NormStats | None = None
    config: NAMMConfig = field(default_factory=NAMMConfig)
    collect_norm: bool = False
    # "fp32": the reference's precision everywhere. "fast": the BAM's O(n^2) attention in fp16 flash
    # kernels on CUDA (about 10x faster at 32k keys; fp32 on the CPU, where it buys nothing).
    precision: str = "fp32"
    # True: the features come from the queries and keys block by block (transfer/fused.py), never from
    # the whole attention slice; False: the slice, then the STFT; None: `transfer.fused.FUSED` per device.
    # Decisions are the same either way (fp32 rounding apart; tests/test_fused.py).
    fused: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in ("fp32", "fast"):
            raise ValueError(f"precision must be 'fp32' or 'fast', got {self.precision!r}")
        self.params = NAMMParams.from_flat(self.theta, self.config)
        self._device_params: dict[torch.device, NAMMParams] = {}
        if self.collect_norm:
            self.norm = NormStats.empty()

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, **kwargs: Any) -> NAMMPolicy:
        """Load our format or the reference implementation's checkpoint (default: the shipped NAMM)."""
        theta, norm, config = load_namm(path)
        return cls(theta=theta, norm=norm, config=config, **kwargs)

    def _params_on(self, device: torch.device) -> NAMMParams:
        if device not in self._device_params:
            # The statistics pass runs with all-zero parameters, as the reference's iteration 0 does:
            # every score is 0 >= 0, so nothing is evicted and the buffers cover every token.
            theta = torch.zeros_like(self.theta) if self.collect_norm else self.theta
            self._device_params[device] = NAMMParams.from_flat(theta.to(device), self.config)
        return self._device_params[device]

    def fused_on(self, device: torch.device) -> bool:
        """Whether the memory should hand this policy the attention's inputs (`InputsView`), not the slice."""
        return fused_default(device) if self.fused is None else self.fused

    def score(self, view: LayerView, state: NAMMBuffers | None) -> tuple[torch.Tensor, NAMMBuffers]:
        if self.collect_norm:  # scores are irrelevant (all zero); identity statistics avoid a warning
            n_bins = self.config.n_bins
            norm = NormStats(mean=torch.zeros(n_bins), var=torch.ones(n_bins), count=1)
        else:
            norm = self.norm
        device = view.keys.device if view.attn is None else view.attn.device
        valid = None if view.all_valid else view.valid
        half = torch.float16 if self.precision == "fast" and device.type == "cuda" else None
        inputs = getattr(view, "inputs", None)  # an InputsView when the memory followed `fused_on`
        if view.attn is None and inputs is not None:
            scores, buffers = fused_namm_score(inputs, state, view.slots, self._params_on(device), norm,
                                               self.config, valid=valid, attention_dtype=half)
        else:  # check_finite off: the memory's own attention; a check would sync the device every layer
            scores, buffers = namm_score(view.attn, state, view.slots, self._params_on(device), norm, self.config,
                                         valid=valid, attention_dtype=half, check_finite=False)
        if self.collect_norm:
            self.norm = self.norm.merge(buffers.ema, view.valid)
        return scores, buffers

    def select(self, scores: torch.Tensor, view: LayerView) -> Keep:
        """The reference rule per sequence (or budget mode); keeping everything returns None."""
        valid_keys = None if view.all_valid else view.valid
        if self.budget is not None and not self.collect_norm:  # budget mode: the newest token stays, as above
            n_max, per_row = view.budget_rows(self.budget, self.protect_recent + self.protect_sink)
            if per_row is not None:
                newest = newest_index(valid_keys, scores.shape, scores.device)
                forced = scores.float().scatter(-1, newest[..., None], float("inf"))
                return keep_top_rows(forced, n_max, per_row, valid_keys)
            index, valid = select_keep(scores, valid_keys, self.config.threshold, n_max)
        else:
            index, valid = select_keep(scores, valid_keys, self.config.threshold, None)
        if valid is not None:
            return Selection(index, valid)
        return None if index.shape[-1] == scores.shape[-1] else index


@dataclass
class NAMMStack(NAMMPolicy):
    """Several NAMMs (e.g. CMA-ES members) over contiguous blocks of batch rows, scored in ONE call.

    `theta` (members, param_size) and `sizes` (rows of each member, in batch order). Every step of an
    update is per sequence (features, BAM, the per-sequence selection rule, budgets, protection), so
    rows b of member m decide exactly as member m's own `NAMMPolicy` would on them, while the whole
    batch runs as one set of kernels instead of one set per member (no Python loop over members, one
    host sync per layer update instead of one per member). All members share config, statistics,
    precision, budget and protection; `stackable` says whether a list of policies can be stacked.
    """

    name: ClassVar[str] = "namm-stack"
    description: ClassVar[str] = "several NAMMs over blocks of rows in one batched update (CMA-ES populations)"
    sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.collect_norm:
            raise ValueError("NAMMStack scores members; the statistics pass runs one NAMMPolicy")
        if self.theta.dim() != 2 or self.theta.shape[0] != len(self.sizes) or min(self.sizes, default=0) < 1:
            raise ValueError("NAMMStack needs theta (members, param_size) and one positive row count per member")
        ScoredPolicy.__post_init__(self)
        if self.precision not in ("fp32", "fast"):
            raise ValueError(f"precision must be 'fp32' or 'fast', got {self.precision!r}")
        self._device_params = {}

    @classmethod
    def from_policies(cls, policies: list[NAMMPolicy], sizes: list[int]) -> NAMMStack:
        """The stack of `policies` (each over `sizes[i]` consecutive rows); see `stackable`."""
        if not stackable(policies):
            raise ValueError("these policies differ in more than their parameters and cannot be stacked")
        first = policies[0]
        return cls(theta=torch.stack([p.theta.reshape(-1) for p in policies]), norm=first.norm, config=first.config,
                   precision=first.precision, fused=first.fused, budget=first.budget,
                   protect_recent=first.protect_recent, protect_sink=first.protect_sink, sizes=list(sizes))

    def _params_on(self, device: torch.device) -> NAMMParams:
        """One network per batch row: (rows, param_size) parameters, member m repeated over its rows."""
        if device not in self._device_params:
            counts = torch.tensor(self.sizes)
            rows = self.theta.repeat_interleave(counts, dim=0)  # (batch, param_size)
            self._device_params[device] = NAMMParams.from_flat(rows.to(device), self.config)
        return self._device_params[device]

    def score(self, view: LayerView, state: NAMMBuffers | None) -> tuple[torch.Tensor, NAMMBuffers]:
        if view.keys.shape[0] != sum(self.sizes):
            raise ValueError(f"NAMMStack covers {sum(self.sizes)} rows, the batch has {view.keys.shape[0]}")
        return super().score(view, state)


def stackable(policies: list[Any]) -> bool:
    """True when `policies` are plain NAMMPolicy objects that differ only in their parameters."""
    if not policies or any(type(p) is not NAMMPolicy or p.collect_norm for p in policies):
        return False
    first = policies[0]

    def same_norm(a: NormStats | None, b: NormStats | None) -> bool:
        if a is None or b is None:
            return a is b
        return a is b or (a.count == b.count and torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var))

    return all(p.config == first.config and p.precision == first.precision and p.fused == first.fused
               and p.budget == first.budget
               and p.protect_recent == first.protect_recent and p.protect_sink == first.protect_sink
               and same_norm(p.norm, first.norm) and p.theta.numel() == first.theta.numel() for p in policies)


@dataclass
class NAMMSink(NAMMPolicy):
    """The evolved NAMM that also keeps the first `n_sink` tokens (attention sinks, as StreamingLLM does).

    The reference rule has no sink protection; this variant shows where that matters (the sink study).
    """

    name: ClassVar[str] = "namm-sink"
    description: ClassVar[str] = "the frozen NAMM (reference rule) that never evicts the first 4 tokens (sinks)"
    n_sink: int = 4

    def score(self, view: LayerView, state: NAMMBuffers | None) -> tuple[torch.Tensor, NAMMBuffers]:
        scores, buffers = super().score(view, state)
        return scores.masked_fill(protected_mask(view, recent=0, sink=self.n_sink), float("inf")), buffers


@dataclass
class NAMMRandom(NAMMPolicy):
    """A random-parameter NAMM: theta ~ N(0, std(evolved theta)^2), the evolved NAMM's norm statistics.

    If the evolved NAMM does not beat these controls beyond the CI, evolution did not help.
    """

    name: ClassVar[str] = "namm-random"
    description: ClassVar[str] = ("control: a NAMM with random parameters at the evolved NAMM's scale "
                                  "and statistics (one per seed); budgeted")
    budget_rule: ClassVar[str] = "required"
    seed: int = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, seed: int = 0, **kwargs: Any) -> NAMMRandom:
        theta, norm, config = load_namm(path)
        return cls(theta=random_theta_like(theta, seed), norm=norm, config=config, seed=seed, **kwargs)


def random_theta_like(theta: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian parameters with the same overall standard deviation as `theta` (seeded, CPU generator)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(theta.shape, generator=g, dtype=torch.float64).mul(float(theta.double().std())).to(theta.dtype)
