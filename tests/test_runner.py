"""The shared evaluation loop: what goes into the run key, and matched budgets."""

from __future__ import annotations

import pytest

from transfer.runner import RunOptions, evaluate_policies


class Ex:
    def __init__(self, i: int) -> None:
        self.id = f"ex{i}"


def _evaluate(factory, batch):
    policy = factory()
    budget = getattr(policy, "budget", None)
    kept = budget if isinstance(budget, float) else (0.4 if policy.name == "namm" else 1.0)
    return [{"id": ex.id, "score": float(int(ex.id[2:]) % 2), "kept_fraction": kept} for ex in batch]


def _summary(rows):
    return {"score": sum(r["score"] for r in rows) / len(rows), "kept_fraction": rows[0]["kept_fraction"]}


def _run(tmp_path, **options):
    opts = RunOptions(policies="full,namm,h2o", controls=1, **options)
    return evaluate_policies([Ex(i) for i in range(6)], _evaluate, _summary, tmp_path, {"domain": "test"}, opts)


def test_batch_size_is_in_the_run_key(tmp_path):
    """Resuming with another batch size used to mix rows made at two batch sizes; now it is refused by name."""
    first = _run(tmp_path, batch_size=2)
    assert first["h2o@match"]["kept_fraction"] == pytest.approx(0.4)  # matched to the NAMM's memory
    assert _run(tmp_path, batch_size=2)["namm"]["score"] == first["namm"]["score"]  # reused
    with pytest.raises(ValueError, match="batch_size: 2 -> 3"):
        _run(tmp_path, batch_size=3)
    assert _run(tmp_path, batch_size=3, overwrite=True)["namm"]["n"] == 6


@pytest.mark.parametrize("option", [{"protect_recent": 8}, {"update_interval": 128}])
def test_protection_and_interval_are_in_the_run_key(tmp_path, option):
    _run(tmp_path, batch_size=2)
    with pytest.raises(ValueError, match=next(iter(option))):
        _run(tmp_path, batch_size=2, **option)
