"""bench/rehearsal_gpu.sh on the CPU: a call that runs out of time stops with status 3 after its first batch, packs
its runs, and a fresh machine given that pack (FROM=) resumes them instead of starting over."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(run: Path, out: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBEDDED": "1", "DOMAINS": "video", "STOP": "0.01", "RUN": str(run), "OUT": str(out),
           "OMP_NUM_THREADS": "1", **extra}
    return subprocess.run(["bash", "bench/rehearsal_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_rehearsal_script_stops_packs_and_resumes_elsewhere(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    first = _run(tmp_path / "a", tmp_path / "o1")
    assert first.returncode == 3, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stopped: time budget" in first.stdout
    assert sorted(os.listdir(tmp_path / "o1")) == ["nvidia-smi.txt", "rehearsal-runs.tgz", "rehearsal.log"]
    with tarfile.open(tmp_path / "o1" / "rehearsal-runs.tgz") as tar:
        done = [n for n in tar.getnames() if n.endswith("predictions.jsonl")]
    assert done, "the first batch's rows travel"
    second = _run(tmp_path / "b", tmp_path / "o2", FROM=str(tmp_path / "o1" / "rehearsal-runs.tgz"))
    assert second.returncode == 3, second.stdout[-3000:] + second.stderr[-3000:]
    assert " done before)" in second.stdout  # resumed from the carried rows, not started over
