"""Run directories never lie: resume after a torn write, finish only with valid metrics, leave nothing that
blocks the next error, name the differing keys, portable and code-aware keys, --overwrite, one writer,
error rows retried when their input changes."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from transfer.rundir import (
    CODE_DIRS,
    DirLock,
    RunDir,
    _process_start,
    code_fingerprint,
    config_diff,
    file_stamp,
    fingerprint,
    model_id,
)

GOOD = {"score": 0.5, "n_examples": 2}


def _finished_run(path: Path, config: dict, rows: list[dict] | None = None) -> RunDir:
    run = RunDir(path, config)
    for row in rows or [{"id": "x", "score": 1}, {"id": "y", "score": 0}]:
        run.add_prediction(row)
    run.finish(GOOD)
    return run


def test_torn_last_line_is_dropped_and_appends_continue(tmp_path):
    run = RunDir(tmp_path / "r", {"a": 1})
    run.add_prediction({"id": "x", "score": 1})
    run.close()
    with open(tmp_path / "r" / "predictions.jsonl", "a") as f:
        f.write('{"id": "y", "sco')  # killed mid-write
    run = RunDir(tmp_path / "r", {"a": 1})
    assert [r["id"] for r in run.predictions()] == ["x"] and not run.finished()
    run.add_prediction({"id": "y", "score": 0})
    assert [r["id"] for r in run.predictions()] == ["x", "y"]
    assert len((tmp_path / "r" / "predictions.jsonl").read_text().splitlines()) == 2
    assert run.state() == "running" and not run.finished()
    run.finish(GOOD)
    again = RunDir(tmp_path / "r", {"a": 1})
    assert again.finished() and again.metrics() == GOOD and again.state() == "finished"


@pytest.mark.parametrize("metrics", [{"score": math.nan, "n_examples": 3}, {"score": 0.5, "n_examples": 0},
                                     {"score": None, "n_examples": 3}, {"n_examples": 3}])
def test_invalid_metrics_make_an_error_run_not_a_finished_one(tmp_path, metrics):
    run = RunDir(tmp_path / "r", {"a": 1})
    run.add_prediction({"id": "x", "score": 1})
    with pytest.raises(ValueError, match="no valid result"):
        run.finish(metrics)
    again = RunDir(tmp_path / "r", {"a": 1})
    assert not again.finished() and again.state() == "error" and not (tmp_path / "r" / "metrics.json").exists()
    assert not (tmp_path / "r" / ".lock").exists()
    assert "no valid result" in json.loads((tmp_path / "r" / "status.json").read_text())["error"]


def test_no_examples_counts_from_the_rows_when_metrics_do_not_say(tmp_path):
    run = RunDir(tmp_path / "r", {"a": 1})
    with pytest.raises(ValueError, match="n_examples is 0"):
        run.finish({"score": 0.3})  # no rows written
    assert not (tmp_path / "r").exists() or not RunDir(tmp_path / "r", {"a": 1}).finished()


def test_failure_before_the_first_example_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="model exploded"):
        with RunDir(tmp_path / "r", {"n": -1}):
            raise RuntimeError("model exploded")
    assert not (tmp_path / "r").exists()
    # the fixed call is not told about "a run with a different config"
    _finished_run(tmp_path / "r", {"n": 5})
    assert RunDir(tmp_path / "r", {"n": 5}).finished()


def test_a_killed_empty_run_does_not_block_another_config(tmp_path):
    run = RunDir(tmp_path / "r", {"n": -1}).start()  # started, then the process died: no rows, no metrics
    run.lock.release()
    run2 = RunDir(tmp_path / "r", {"n": 5})  # no "different config" error
    run2.add_prediction({"id": "x", "score": 1})
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"n": 5}


def test_failure_after_rows_keeps_them_and_says_why(tmp_path):
    with pytest.raises(RuntimeError):
        with RunDir(tmp_path / "r", {"n": 2}) as run:
            run.add_prediction({"id": "x", "score": 1})
            raise RuntimeError("video 2 unreadable\nlong traceback text")
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "error" and status["error"] == "RuntimeError: video 2 unreadable"
    assert not (tmp_path / "r" / ".lock").exists()
    resumed = RunDir(tmp_path / "r", {"n": 2})
    assert [r["id"] for r in resumed.completed()] == ["x"] and not resumed.finished()


def test_a_different_config_is_refused_naming_the_keys(tmp_path):
    key = {"model": "tiny@abc", "batch_size": 1, "policy": {"name": "h2o", "budget": 0.5}, "n": 4}
    _finished_run(tmp_path / "r", key)
    other = {**key, "batch_size": 8, "policy": {"name": "h2o", "budget": 0.25}}
    del other["n"]
    with pytest.raises(ValueError) as err:
        RunDir(tmp_path / "r", other)
    message = str(err.value)
    assert "\n" not in message and "finished run" in message and "--overwrite" in message
    assert "batch_size: 1 -> 8" in message and "policy.budget: 0.5 -> 0.25" in message and "n: 4 -> absent" in message
    assert "model" not in message  # equal keys are not listed
    assert config_diff({"a": [1, 2]}, {"a": (1, 2)}) == ""  # compared as they read back from JSON


def test_keys_are_portable_and_follow_the_weights(tmp_path):
    weights = tmp_path / "a" / "tiny-lm"
    weights.mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(b"one")
    (weights / "config.json").write_text('{"layers": 2}')
    (weights / "README.md").write_text("notes")
    copy = tmp_path / "b" / "tiny-lm"
    shutil.copytree(weights, copy)
    assert model_id(weights) == model_id(copy) == f"tiny-lm@{fingerprint(weights)}"
    assert str(tmp_path) not in model_id(weights)
    _finished_run(tmp_path / "r", {"model": model_id(weights)})
    shutil.copytree(tmp_path / "r", tmp_path / "elsewhere" / "r")
    assert RunDir(tmp_path / "elsewhere" / "r", {"model": model_id(copy)}).finished()  # a copied runs/ folder
    (weights / "README.md").write_text("other notes")  # not part of what the model computes
    assert model_id(weights) == model_id(copy)
    for name, data in (("model.safetensors", b"two"), ("config.json", '{"layers": 3}')):  # retrained, reshaped
        before = model_id(weights)
        (weights / name).write_bytes(data) if isinstance(data, bytes) else (weights / name).write_text(data)
        assert model_id(weights) != before
    with pytest.raises(ValueError, match="model: "):
        RunDir(tmp_path / "r", {"model": model_id(weights)})
    assert model_id("org/hub-id") == fingerprint("org/hub-id") == "org/hub-id" and model_id(None) is None


def test_code_fingerprint_covers_the_result_code_only(tmp_path):
    for folder in CODE_DIRS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text(f"X = '{folder}'\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "t.py").write_text("Y = 1\n")
    base = code_fingerprint(tmp_path)
    (tmp_path / "train" / "t.py").write_text("Y = 2\n")  # trainers do not change evaluation results
    (tmp_path / "eval" / "notes.md").write_text("text")
    (tmp_path / "eval" / "__pycache__").mkdir()
    (tmp_path / "eval" / "__pycache__" / "a.py").write_text("cached")
    assert code_fingerprint(tmp_path) == base
    for folder in CODE_DIRS:
        (tmp_path / folder / "a.py").write_text(f"X = '{folder}!'\n")
        changed = code_fingerprint(tmp_path)
        assert changed != base
        base = changed
    (tmp_path / "adapters" / "sub").mkdir()
    (tmp_path / "adapters" / "sub" / "b.py").write_text("")
    assert code_fingerprint(tmp_path) != base  # a new module counts
    assert code_fingerprint() == code_fingerprint()  # this repository: deterministic
    _finished_run(tmp_path / "r", {"code": base})
    with pytest.raises(ValueError, match=f"code: \"{base}\" -> \"{code_fingerprint(tmp_path)}\""):
        RunDir(tmp_path / "r", {"code": code_fingerprint(tmp_path)})


def test_overwrite_redoes_a_run(tmp_path):
    _finished_run(tmp_path / "r", {"a": 1})
    run = RunDir(tmp_path / "r", {"a": 2}, overwrite=True)
    assert not run.finished() and run.predictions() == []
    run.add_prediction({"id": "z", "score": 1})
    run.finish({"score": 1.0, "n_examples": 1})
    again = RunDir(tmp_path / "r", {"a": 2})
    assert again.finished() and [r["id"] for r in again.predictions()] == ["z"] and again.metrics()["score"] == 1.0
    redo = RunDir(tmp_path / "r", {"a": 2}, overwrite=True)  # the same key: redone, not reused
    assert not redo.finished()
    with pytest.raises(KeyboardInterrupt), redo:
        raise KeyboardInterrupt  # stopped before its first row: nothing left, the old run included
    assert not (tmp_path / "r").exists()


def _fake_lock(directory: Path, pid: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": socket.gethostname(), "start": _process_start(pid)}
    (directory / ".lock").write_text(json.dumps(holder))


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_lock(tmp_path / "r", other.pid)
        run = RunDir(tmp_path / "r", {"a": 1})  # reading is fine
        assert not run.finished()
        with pytest.raises(ValueError) as err:
            run.add_prediction({"id": "x"})
        assert f"being written by process {other.pid}" in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "r" / "predictions.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    run.add_prediction({"id": "x", "score": 1})  # the writer is gone: its lock is stale
    assert json.loads((tmp_path / "r" / ".lock").read_text())["pid"] == os.getpid()
    run.finish({"score": 1.0, "n_examples": 1})
    assert not (tmp_path / "r" / ".lock").exists()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "start": "1"}  # our pid, another process's start
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".lock").write_text(json.dumps(holder))
    if _process_start(os.getpid()) is None:
        pytest.skip("no /proc: process start times unavailable")
    with DirLock(tmp_path / "r") as lock:
        assert lock.held
    assert not (tmp_path / "r" / ".lock").exists()


def test_readers_never_write(tmp_path):
    run = RunDir(tmp_path / "r", {"a": 1}, writer=False)
    run.add_prediction({"id": "x", "score": 1})
    run.finish({"score": 1.0, "n_examples": 1})
    with run:
        pass
    assert not (tmp_path / "r").exists()


def test_error_rows_are_retried_when_their_input_changes(tmp_path):
    video, other = tmp_path / "v1.mp4", tmp_path / "v2.mp4"
    video.write_bytes(b"broken")
    other.write_bytes(b"also broken")
    rows = [{"id": "ok", "score": 1}, {"id": "v1", "error": "cannot decode", "input": file_stamp(video)},
            {"id": "v2", "error": "cannot decode", "input": file_stamp(other)},
            {"id": "v3", "error": "no stamp"}]
    _finished_run(tmp_path / "r", {"a": 1}, rows)
    assert RunDir(tmp_path / "r", {"a": 1}).finished()  # nothing changed: reused
    video.write_bytes(b"fixed video")  # size and mtime change
    run = RunDir(tmp_path / "r", {"a": 1})
    assert not run.finished()
    assert [r["id"] for r in run.completed()] == ["ok", "v2", "v3"]  # only v1 runs again
    run.add_prediction({"id": "v1", "score": 0, "input": file_stamp(video)})
    assert [r["id"] for r in run.predictions()] == ["ok", "v1", "v2", "v3"]
    assert "error" not in {r["id"]: r for r in run.predictions()}["v1"]
    run.finish(GOOD)
    assert RunDir(tmp_path / "r", {"a": 1}).finished()
    assert file_stamp(tmp_path / "gone") == {"path": str(tmp_path / "gone"), "size": None, "mtime_ns": None}
