"""train/evolve_gpu.sh on the CPU with tiny settings: the phases, the hand-over between calls (a second `evolve`
resumes every seed; a packed evo-runs.tgz carried as FROM resumes on a fresh machine by replaying the log), and at
most 8 files in $OUT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("cma")

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "DEVICE": "cpu", "PRESET": "cpu-small", "SEEDS": "1 2", "EVO_MIN": "5", "OMP_NUM_THREADS": "1",
    "EVO_EXTRA": "--model artifacts/lm/tiny-llama-mqar --stages niah_single --generations 2 --popsize 4 --prompts 1 "
                 "--length 256",
}


def _run(phase: str, runs: Path, out: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **TINY, "EVO_RUNS": str(runs), "OUT": str(out), **extra}
    return subprocess.run(["bash", "train/evolve_gpu.sh", phase], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def _generations(runs: Path, seed: int) -> list[int]:
    return [e["generation"] for e in json.loads((runs / f"seed-{seed}" / "log.json").read_text())]


@pytest.mark.slow
def test_evolve_gpu_script_resumes_across_calls_and_machines(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    runs = tmp_path / "runs"
    first = _run("evolve", runs, tmp_path / "out1", EVO_MIN="0.01")  # stops after its first generation
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _generations(runs, 1) == [1] and _generations(runs, 2) == [1]
    assert sorted(os.listdir(tmp_path / "out1")) == ["evo-runs.tgz", "progress.txt", "summary.txt"]
    with tarfile.open(tmp_path / "out1" / "evo-runs.tgz") as tar:
        names = set(tar.getnames())
    assert {"seed-1/log.json", "seed-1/norm.json", "seed-1/config.json", "seed-2/log.json"} <= names
    assert not any(n.endswith("evolution.pkl") for n in names)  # the covariance stays behind

    # a fresh machine: only the packed folder travels; the run resumes by replaying its log, and the seeds'
    # second generation equals the one an uninterrupted run on the first machine makes
    fresh = tmp_path / "fresh"
    resumed = _run("evolve", fresh, tmp_path / "out2", FROM=str(tmp_path / "out1" / "evo-runs.tgz"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "replaying its log" in (fresh / "evolve-1.log").read_text()
    same = _run("evolve", runs, tmp_path / "out3")
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    for seed in (1, 2):
        a = json.loads((fresh / f"seed-{seed}" / "log.json").read_text())
        b = json.loads((runs / f"seed-{seed}" / "log.json").read_text())
        assert [e["member_fitness"] for e in a] == [e["member_fitness"] for e in b]
        assert len(a) == 2
    assert "seed 1: 2 generations" in (tmp_path / "out3" / "progress.txt").read_text()


def test_unknown_phase_is_one_line():
    res = subprocess.run(["bash", "train/evolve_gpu.sh", "nope"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "EVO_RUNS": "/tmp/evo-none", "OUT": "/tmp/evo-none/out"})
    assert res.returncode == 2 and res.stdout.strip().splitlines()[-1].startswith("error: unknown phase nope")


@pytest.mark.parametrize("packed", ["site.tar.xz", "wheel"])
def test_need_packages_installs_what_was_carried_once(tmp_path, packed):
    """train/carried_packages.sh: a module missing from the image becomes importable from a carried site.tar.xz
    or wheel (installed once into the site folder); a module nothing provides is one error line, status 3."""
    if shutil.which("bash") is None or shutil.which("xz") is None:
        pytest.skip("needs bash and xz")
    carried = tmp_path / "carried"
    carried.mkdir()
    pkg = tmp_path / "build" / "carriedmod_t"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 7\n")
    if packed == "site.tar.xz":
        subprocess.run(["tar", "cJf", str(carried / "site.tar.xz"), "-C", str(tmp_path / "build"), "carriedmod_t"],
                       check=True)
    else:
        import zipfile

        with zipfile.ZipFile(carried / "carriedmod_t-1.0-py3-none-any.whl", "w") as whl:
            whl.write(pkg / "__init__.py", "carriedmod_t/__init__.py")
            info = "carriedmod_t-1.0.dist-info/"
            whl.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: carriedmod_t\nVersion: 1.0\n")
            whl.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            whl.writestr(info + "RECORD", "")
    script = (f". {ROOT}/train/carried_packages.sh; need_packages {carried} site carriedmod_t || exit $?; "
              "python3 -c 'import carriedmod_t; print(carriedmod_t.VALUE)'; ls site/.done; "
              f"need_packages {carried} site carriedmod_t nosuchmod_t")
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = res.stdout.strip().splitlines()
    assert lines[:2] == ["7", "site/.done"], res.stdout + res.stderr
    assert res.returncode == 3 and lines[-1].startswith("error: cannot import carriedmod_t nosuchmod_t")
