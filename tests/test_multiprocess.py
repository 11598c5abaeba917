"""`accelerate launch` over 2 CPU processes (gloo): same results as one process, nothing lost or doubled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_namm_theta, tiny_lm_dir

from transfer.checkpoint import load_namm, save_namm
from transfer.cli import main
from transfer.namm import NAMMConfig, NormStats
from transfer.rundir import slug

ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
pytestmark = pytest.mark.skipif(not Path(ACCELERATE).exists(), reason="accelerate CLI not installed")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    tiny_lm_dir(root / "lm")
    norm = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=10)
    save_namm(root / "namm", random_namm_theta(), norm, NAMMConfig(), provenance={"made_by": "test"})
    return root


def launch(args: list[str], port: int) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "transfer.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_eval_sharded_over_two_processes_equals_one(assets):
    args = ["eval", "lm", "--model", str(assets / "lm"), "--tasks", "mqar,niah_multikey", "--n", "3", "--length",
            "256", "--update-interval", "64", "--policies", "full,h2o,namm", "--budget", "match", "--batch-size", "2",
            "--namm", str(assets / "namm"), "--device", "cpu"]
    assert main([*args, "--out", str(assets / "one")]) == 0
    launch([*args, "--out", str(assets / "two")], 29611)

    def rows(run: str, label: str) -> list[dict]:
        text = (assets / run / "len256" / slug(label) / "predictions.jsonl").read_text()
        return [json.loads(x) for x in text.splitlines()]

    for label in ("full", "namm", "h2o@match"):
        one, two = rows("one", label), rows("two", label)
        assert len(two) == 6 and len({r["id"] for r in two}) == 6  # no duplicates, no losses
        by_id = {r["id"]: r for r in one}
        for row in two:
            assert row["prediction"] == by_id[row["id"]]["prediction"]
            assert row["kept_fraction"] == pytest.approx(by_id[row["id"]]["kept_fraction"])


def test_evolve_over_two_processes_equals_one(assets):
    args = ["evolve", "--model", str(assets / "lm"), "--stages", "mqar", "--generations", "1", "--popsize", "4",
            "--prompts", "2", "--length", "256", "--update-interval", "64", "--device", "cpu"]
    assert main([*args, "--out", str(assets / "evo1")]) == 0
    launch([*args, "--out", str(assets / "evo2")], 29612)
    log1 = json.loads((assets / "evo1" / "log.json").read_text())
    log2 = json.loads((assets / "evo2" / "log.json").read_text())
    assert [e["best_fitness"] for e in log1] == [e["best_fitness"] for e in log2]
    theta1, _, _ = load_namm(assets / "evo1" / "namm")
    theta2, _, _ = load_namm(assets / "evo2" / "namm")
    assert torch.equal(theta1, theta2)  # identical CMA-ES state, checkpoint written once
