"""Paired bootstrap CIs: the point estimate, the pairing, clustering and strata do what the tables claim."""

from __future__ import annotations

import numpy as np
import pytest

from transfer.stats import PairedBootstrap, units_of, verdict


def _units(values, stratum="", unit=None):
    return [(stratum, str(i if unit is None else unit[i]), str(i), float(v)) for i, v in enumerate(values)]


def test_point_estimate_is_the_mean_of_stratum_means():
    units = {"a": _units([1, 1, 0, 0], "t1") + _units([1, 0], "t2")}
    table = PairedBootstrap(units)
    assert table.score("a") == pytest.approx((0.5 + 0.5) / 2)
    units = {"a": _units([1, 1, 1, 0], "t1") + _units([0, 0], "t2")}
    assert PairedBootstrap(units).score("a") == pytest.approx((0.75 + 0.0) / 2)  # not the pooled 3/6


def test_a_constant_paired_difference_has_a_zero_width_ci():
    rng = np.random.default_rng(0)
    base = rng.normal(size=50)
    table = PairedBootstrap({"a": _units(base + 0.1), "b": _units(base)})
    delta, lo, hi = table.diff("a", "b")
    assert delta == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    lo_a, hi_a = table.ci("a")
    assert hi_a - lo_a > 0.3  # while each score alone is uncertain


def test_pairing_narrows_the_difference_ci_when_policies_share_the_noise():
    rng = np.random.default_rng(1)
    shared = rng.normal(size=200)
    a, b = shared + rng.normal(0, 0.1, 200) + 0.05, shared + rng.normal(0, 0.1, 200)
    table = PairedBootstrap({"a": _units(a), "b": _units(b)})
    _, lo, hi = table.diff("a", "b")
    assert lo > 0  # the 0.05 shift is found although each score's CI is ~ +-0.14
    width_a = np.subtract(*table.ci("a")[::-1])
    assert hi - lo < width_a / 3


def test_clustered_rows_are_resampled_together():
    """Ten copies of one question per video carry the information of one: the CI must not shrink 10x."""
    rng = np.random.default_rng(2)
    per_video = rng.integers(0, 2, 30).astype(float)
    once = PairedBootstrap({"a": _units(per_video)})
    ten = [("", str(v), f"{v}-{q}", per_video[v]) for v in range(30) for q in range(10)]
    clustered = PairedBootstrap({"a": ten})
    w1 = np.subtract(*once.ci("a")[::-1])
    w10 = np.subtract(*clustered.ci("a")[::-1])
    assert clustered.score("a") == pytest.approx(once.score("a"))
    assert w10 == pytest.approx(w1, rel=0.25)  # a row-level bootstrap would give about w1 / sqrt(10)
    assert clustered.n_units == 30 and clustered.n_rows == 300


def test_rows_missing_from_one_label_are_dropped_from_all():
    table = PairedBootstrap({"a": _units([1, 0, 1]), "b": _units([1, 0])})
    assert table.n_rows == 2 and table.dropped == {"a": 1}
    assert table.score("a") == pytest.approx(0.5)


def test_verdicts_follow_the_ci():
    assert verdict((0.1, 0.02, 0.2)) == "better"
    assert verdict((-0.1, -0.2, -0.01)) == "worse"
    assert verdict((0.1, -0.01, 0.2)) == "within noise"


def test_units_of_skips_error_rows_and_reads_strata():
    rows = [{"id": "x", "score": 1.0, "stratum": "vt"}, {"id": "y", "error": "bad", "score": None},
            {"id": "z", "score": 0.0, "unit": "v1"}]
    assert units_of(rows) == [("vt", "x", "x", 1.0), ("", "v1", "z", 0.0)]
