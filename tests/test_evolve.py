"""Evolution: stages chain, a checkpoint every generation, a killed run resumes to the same result, and a
rerun with other options is refused unless told to start over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import tiny_lm_dir

from transfer.checkpoint import load_namm
from transfer.cli import main

ARGS = ["evolve", "--stages", "niah_single", "vt", "--generations", "2", "1", "--popsize", "4", "--prompts", "2",
        "--length", "256", "--update-interval", "64", "--batch-size", "4", "--device", "cpu"]


def test_killed_run_resumes_to_the_same_namm(tmp_path):
    model = str(tiny_lm_dir(tmp_path / "lm"))
    assert main([*ARGS, "--model", model, "--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "log.json").read_text())
    assert [(e["stage"], e["generation"]) for e in straight] == [(1, 1), (1, 2), (2, 1)]
    assert (tmp_path / "straight" / "fitness.png").stat().st_size > 0

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "transfer.cli", *ARGS, "--model", model, "--out", str(out)],
                            env=env, cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "log.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # killed after the first checkpoint, mid-way through generation 2
    proc.wait()
    done = json.loads((out / "log.json").read_text())
    assert 1 <= len(done) < 3
    assert main([*ARGS, "--model", model, "--out", str(out)]) == 0  # the same command resumes
    resumed = json.loads((out / "log.json").read_text())
    assert [e["best_fitness"] for e in resumed] == [e["best_fitness"] for e in straight]
    assert torch.equal(load_namm(out / "namm")[0], load_namm(tmp_path / "straight" / "namm")[0])


def test_changed_options_are_refused_unless_overwrite(tmp_path, capsys):
    model = str(tiny_lm_dir(tmp_path / "lm"))
    out = tmp_path / "evo"
    small = ["evolve", "--stages", "niah_single", "--generations", "1", "--popsize", "4", "--prompts", "1",
             "--length", "128", "--update-interval", "64", "--batch-size", "2", "--device", "cpu",
             "--model", model, "--out", str(out)]
    assert main(small) == 0
    log = (out / "log.json").read_text()
    theta = load_namm(out / "namm")[0]
    changed = [*small, "--popsize", "6", "--stages", "niah_single", "vt", "--generations", "1", "1"]
    capsys.readouterr()
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "--overwrite" in err
    assert "popsize: 4 -> 6" in err and "stages" in err and "generations" in err and "prompts" not in err
    assert (out / "log.json").read_text() == log  # nothing touched
    assert main([*small, "--device", "cpu", "--max-minutes", "30"]) == 0  # where/how fast: not an option change
    assert (out / "log.json").read_text() == log  # finished already: resumed to the same end
    assert main([*changed, "--overwrite"]) == 0
    redone = json.loads((out / "log.json").read_text())
    assert [(e["stage"], e["generation"]) for e in redone] == [(1, 1), (2, 1)]
    assert json.loads((out / "config.json").read_text())["popsize"] == 6
    assert not torch.equal(load_namm(out / "namm")[0], theta)
