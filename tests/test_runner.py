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


def test_max_minutes_stops_after_a_batch_and_the_rerun_resumes_to_the_same_result(tmp_path, monkeypatch):
    """--max-minutes: past the deadline the current run stops after its batch (rows kept, no metrics), no later
    policy starts, and rerunning without the cap finishes with exactly an uncapped run's numbers."""
    import time as time_module

    from transfer import runner

    calls = []

    clock = [1000.0]

    def counting(factory, batch):
        calls.append(len(batch))
        clock[0] += 61  # each batch takes a simulated 61 s: the first one passes the 1-minute cap
        return _evaluate(factory, batch)

    monkeypatch.setattr(runner.time, "time", lambda: clock[0])
    opts = RunOptions(policies="full,namm,h2o", controls=1, batch_size=2, max_minutes=1.0, started=1000.0)
    with pytest.raises(runner.TimeBudgetReached, match="time budget of 1 min reached"):
        evaluate_policies([Ex(i) for i in range(6)], counting, _summary, tmp_path / "capped", {"domain": "t"}, opts)
    assert calls == [2]
    namm_dir = tmp_path / "capped" / "namm"
    assert len((namm_dir / "predictions.jsonl").read_text().splitlines()) == 2
    assert not (namm_dir / "metrics.json").exists() and not (tmp_path / "capped" / "full").exists()
    monkeypatch.setattr(runner.time, "time", time_module.time)
    resumed = evaluate_policies([Ex(i) for i in range(6)], counting, _summary, tmp_path / "capped", {"domain": "t"},
                                RunOptions(policies="full,namm,h2o", controls=1, batch_size=2))
    assert calls[1:3] == [2, 2]  # the NAMM run resumed from its 2 saved rows: 4 left, 2 batches
    fresh = _run(tmp_path / "fresh", batch_size=2)
    for label in fresh:
        assert resumed[label]["score"] == fresh[label]["score"] and resumed[label]["ci"] == fresh[label]["ci"]


def test_run_cost_is_written_beside_the_metrics_not_into_them(tmp_path):
    """Costs depend on the machine: cost.json per computed run, metrics.json without them."""
    import json

    from transfer.rundir import slug

    _run(tmp_path, batch_size=2)
    for label in ("full", "namm", "h2o@match"):
        run = tmp_path / slug(label)
        cost = json.loads((run / "cost.json").read_text())
        assert cost["examples_computed"] == 6 and cost["seconds"] >= 0 and cost["device"] == "cpu"
        assert cost["peak_memory_gib"] is None  # no accelerator here
        assert "seconds" not in json.loads((run / "metrics.json").read_text())
    first = (tmp_path / "namm" / "cost.json").read_text()
    _run(tmp_path, batch_size=2)  # everything reused: nothing computed, the cost of the computing call stays
    assert (tmp_path / "namm" / "cost.json").read_text() == first
