"""train/rl_gpu.sh, every phase on the CPU with tiny settings (one env, two DT seeds): the flags, paths and
hand-overs between phases that the one GPU lease relies on, and at most 8 files in $OUT."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="the sac phase needs jax (pip install -e '.[rl-train]')")
pytest.importorskip("mujoco")

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "DEVICE": "cpu", "JAX_PLATFORMS": "cpu", "ENVS": "hopper", "SEEDS": "0 1",
    "SAC_EXTRA": "--steps 1500 --learning-starts 300 --batch-size 16 --hidden 8 --n-critics 2 --n-quantiles 3 "
                 "--drop-per-net 1 --eval-every 500 --eval-episodes 1 --train-freq 4",
    "DATA_MB": "0.03", "DT_EXTRA": "--steps 2 --hidden 16 --layers 1 --batch-size 4 --warmup 1 --log-every 1",
    "EPISODES": "2", "MAX_STEPS": "6", "WINDOWS": "2", "BUDGETS": "6t", "OMP_NUM_THREADS": "1",
}


def _run(phase: str, runs: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **TINY, "RL_RUNS": str(runs), "OUT": str(out)}
    return subprocess.run(["bash", "train/rl_gpu.sh", phase], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_rl_gpu_script_phases(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    runs = tmp_path / "runs"
    sac = _run("sac", runs, tmp_path / "out1")
    assert sac.returncode == 0, sac.stdout[-3000:] + sac.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out1")) == ["sac-logs.tgz", "sac-scores.txt"]
    assert "hopper: step 1500" in (tmp_path / "out1" / "sac-scores.txt").read_text()
    fin = _run("finish", runs, tmp_path / "out3")
    assert fin.returncode == 0, fin.stdout[-3000:] + fin.stderr[-3000:]
    files = sorted(os.listdir(tmp_path / "out3"))
    assert files == ["rl-gpu.tgz.00", "summary.txt"]
    with tarfile.open(tmp_path / "out3" / "rl-gpu.tgz.00") as tar:
        names = set(tar.getnames())
    for kind in ("medium", "medium-replay", "expert"):
        assert f"data/hopper-{kind}-v5.hdf5" in names
    for dt in ("dt-hopper-k20-s0", "dt-hopper-k20-s1", "dt-hopper-k64-s0", "dt-hopper-pos-k200-s0"):
        assert f"dt/{dt}/model.safetensors" in names
    assert not any("ckpt" in n for n in names)  # the replay buffers stay on the machine
    summary = (tmp_path / "out3" / "summary.txt").read_text()
    assert "dt-hopper-pos-k200-s0 2 steps" in summary
    assert "sliding window K=2" in summary and "training seeds 0,1 pooled" in summary
