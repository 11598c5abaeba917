"""Run directories: resume after a torn write, reuse finished runs, refuse a run made with other weights."""

from __future__ import annotations

import pytest

from transfer.rundir import RunDir, fingerprint


def test_torn_last_line_is_dropped_and_appends_continue(tmp_path):
    run = RunDir(tmp_path / "r", {"a": 1})
    run.add_prediction({"id": "x", "score": 1})
    with open(tmp_path / "r" / "predictions.jsonl", "a") as f:
        f.write('{"id": "y", "sco')  # killed mid-write
    run = RunDir(tmp_path / "r", {"a": 1})
    run.add_prediction({"id": "y", "score": 0})
    assert [r["id"] for r in run.predictions()] == ["x", "y"]
    assert not run.finished()
    run.write_metrics({"score": 0.5})
    assert RunDir(tmp_path / "r", {"a": 1}).finished()


def test_other_config_or_weights_is_refused(tmp_path):
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"one")
    before = fingerprint(weights)
    RunDir(tmp_path / "r", {"model_sha": before})
    (weights / "model.safetensors").write_bytes(b"two")  # retrained
    assert fingerprint(weights) != before
    with pytest.raises(ValueError, match="different config"):
        RunDir(tmp_path / "r", {"model_sha": fingerprint(weights)})
    assert fingerprint("org/hub-id") == "org/hub-id"
