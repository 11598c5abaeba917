"""Paired bootstrap confidence intervals over evaluation units, for every score the suite reports.

Every policy of a table sees the same inputs (prompts, episodes, videos), so differences between
policies are paired: one bootstrap draw resamples the units once and every policy is scored on that
same resample. A unit is the independent thing that was sampled: a prompt, an episode, or a video
(whose several questions are not independent, so they are resampled together: a cluster bootstrap).
Units are resampled within their stratum (a task, an environment), and a score is the mean over
strata of each stratum's mean over its rows (rows of a unit count once each, e.g. questions).

    units = {"full": [(stratum, unit, row_id, value), ...], "namm": [...]}
    table = PairedBootstrap(units)
    table.score("namm"), table.ci("namm"), table.diff("namm", "full")  # (delta, lo, hi)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

Unit = tuple[str, str, str, float]  # (stratum, unit id, row id, value of one row)
N_BOOT = 2000
SEED = 0


@dataclass
class _Stratum:
    sums: dict[str, np.ndarray]  # label -> (n_units,) sum of row values per unit
    counts: np.ndarray  # (n_units,) rows per unit (the same for every label: paired)


class PairedBootstrap:
    """Scores, percentile CIs and paired differences of several labels over the same units."""

    def __init__(self, units: dict[str, Sequence[Unit]], n_boot: int = N_BOOT, seed: int = SEED) -> None:
        if not units:
            raise ValueError("no results to summarise")
        self.labels = list(units)
        tables = {label: {(str(st), str(u), str(r)): float(v) for st, u, r, v in rows} for label, rows in units.items()}
        keys = set.intersection(*(set(t) for t in tables.values()))  # pair on the rows every label has
        if not keys:
            raise ValueError("the labels share no evaluation row; nothing can be paired")
        self.dropped = {label: len(t) - len(keys) for label, t in tables.items() if len(t) != len(keys)}
        grouped: dict[str, dict[str, list[tuple[str, str, str]]]] = {}
        for key in sorted(keys):
            grouped.setdefault(key[0], {}).setdefault(key[1], []).append(key)
        self.strata: dict[str, _Stratum] = {}
        for stratum, by_unit in grouped.items():
            members = list(by_unit.values())
            counts = np.array([len(m) for m in members], dtype=float)
            sums = {label: np.array([sum(tables[label][k] for k in m) for m in members]) for label in self.labels}
            self.strata[stratum] = _Stratum(sums, counts)
        self.n_units = sum(len(s.counts) for s in self.strata.values())
        self.n_rows = int(sum(s.counts.sum() for s in self.strata.values()))
        rng = np.random.default_rng(seed)
        # one resample of every stratum's units per draw, shared by all labels (the pairing)
        self._draws = {name: rng.integers(0, len(s.counts), size=(n_boot, len(s.counts)))
                       for name, s in self.strata.items()}
        self._boot = {label: self._score(label, self._draws) for label in self.labels}
        self._point = {label: float(self._score(label, None)[0]) for label in self.labels}

    def _score(self, label: str, draws: dict[str, np.ndarray] | None) -> np.ndarray:
        """(n_boot,) scores on the resamples, or (1,) on the data itself (draws None)."""
        means = []
        for name, s in self.strata.items():
            if draws is None:
                means.append(np.array([s.sums[label].sum() / s.counts.sum()]))
            else:
                idx = draws[name]
                means.append(s.sums[label][idx].sum(1) / s.counts[idx].sum(1))
        return np.mean(means, axis=0)

    def score(self, label: str) -> float:
        return self._point[label]

    def ci(self, label: str, level: float = 0.95) -> tuple[float, float]:
        return _percentiles(self._boot[label], level)

    def diff(self, a: str, b: str, level: float = 0.95) -> tuple[float, float, float]:
        """Paired difference score(a) - score(b) with its CI."""
        lo, hi = _percentiles(self._boot[a] - self._boot[b], level)
        return self._point[a] - self._point[b], lo, hi


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def verdict(delta_ci: tuple[float, float, float], higher_is_better: bool = True) -> str:
    """How a paired difference may be worded: only a CI that excludes zero supports a claim."""
    _, lo, hi = delta_ci
    if lo > 0:
        return "better" if higher_is_better else "worse"
    if hi < 0:
        return "worse" if higher_is_better else "better"
    return "within noise"


def units_of(rows: Iterable[dict], stratum_key: str | None = None) -> list[Unit]:
    """Rows of a run -> units: stratum from `stratum` (or `stratum_key`), unit from `unit` (else the row id)."""
    out = []
    for row in rows:
        if row.get("error") or row.get("score") is None:
            continue
        stratum = row.get(stratum_key, "") if stratum_key else row.get("stratum", "")
        out.append((str(stratum), str(row.get("unit", row["id"])), str(row["id"]), float(row["score"])))
    return out
