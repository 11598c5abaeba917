"""Evolution: stages chain, a checkpoint every generation, a killed run resumes to the same result, and a
rerun with other options is refused unless told to start over; members batched together decide as alone;
the noise measurement and the per-seed runs."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_namm_theta, tiny_lm_dir

from tasks.language import answer_batch, load_lm, make_examples
from train.population import answer_groups, merge_keeps
from transfer.checkpoint import load_namm
from transfer.cli import main
from transfer.namm import NormStats
from transfer.policies.base import LayerView, Selection
from transfer.policies.full import FullCache
from transfer.policies.namm import NAMMPolicy

ARGS = ["evolve", "--stages", "niah_single", "vt", "--generations", "2", "1", "--popsize", "4", "--prompts", "2",
        "--length", "256", "--update-interval", "64", "--batch-size", "4", "--device", "cpu"]


@pytest.mark.parametrize("carried", ["pickle", "log only"])
def test_killed_run_resumes_to_the_same_namm(tmp_path, carried):
    """Resumed from evolution.pkl, or (as from a GPU machine whose output cannot hold the ~280 MB pickle)
    by replaying log.json + norm.json: either way the final NAMM equals an uninterrupted run's, bit for bit."""
    model = str(tiny_lm_dir(tmp_path / "lm"))
    assert main([*ARGS, "--model", model, "--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "log.json").read_text())
    assert [(e["stage"], e["generation"]) for e in straight] == [(1, 1), (1, 2), (2, 1)]
    if carried == "log only":  # replaying the whole log rebuilds the final state exactly, stage change included
        from train.evolve import EvolveConfig, _read_norm, replay

        ckpt = pickle.loads((tmp_path / "straight" / "evolution.pkl").read_bytes())
        cfg = EvolveConfig(stages=["niah_single", "vt"], generations=[2, 1], popsize=4)
        rebuilt = replay(cfg, straight, _read_norm(tmp_path / "straight" / "norm.json"))
        assert (rebuilt["stage"], rebuilt["generation"]) == (ckpt["stage"], ckpt["generation"]) == (2, 0)
        assert np.array_equal(rebuilt["mean_prev"], ckpt["mean_prev"])
        assert all(np.array_equal(a, b) for a, b in zip(rebuilt["stage_start"], ckpt["stage_start"], strict=True))
        assert torch.equal(rebuilt["norm"].mean, ckpt["norm"].mean)
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
    if carried == "log only":
        (out / "evolution.pkl").unlink()
        assert (out / "norm.json").is_file()
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


# ----------------------------------------------------------------------------- population batching, seeds, noise

NORM = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)


def test_a_member_answers_alike_alone_or_stacked_with_other_members(tmp_path):
    """Members stacked along the batch (one NAMM per block of rows) decide exactly as each does alone."""
    adapter, tokenizer = load_lm(tiny_lm_dir(tmp_path / "lm"))
    examples = make_examples("niah_single,vt", 2, 256, seed=5)
    factories = [FullCache] + [lambda s=s: NAMMPolicy(random_namm_theta(s), NORM) for s in range(3)]
    alone = [answer_batch(adapter, tokenizer, f, examples, 64) for f in factories]
    kept = [[r["kept_fraction"] for r in rows] for rows in alone]
    assert all(k < 0.95 for rows in kept[1:] for k in rows)  # the NAMMs evict ...
    assert len({round(sum(rows), 9) for rows in kept}) == 4  # ... each its own amount, so a mix-up shows
    for rows_per_pass in (16, 5):  # all members in one pass; members split across passes
        stacked = answer_groups(adapter, tokenizer, [(f, examples) for f in factories], 64, rows_per_pass)
        for one, many in zip(alone, stacked):
            assert [r["prediction"] for r in one] == [r["prediction"] for r in many]
            assert [r["id"] for r in one] == [r["id"] for r in many]
            for a, b in zip(one, many):
                assert a["kept_fraction"] == pytest.approx(b["kept_fraction"], abs=1e-12)


def test_merged_selection_keeps_each_groups_tokens_in_order():
    """merge_keeps: every row keeps exactly its own group's tokens, ascending, the rest marked invalid."""
    b, h, n = 3, 2, 6
    view = LayerView(layer=0, keys=torch.zeros(b, h, n, 4), slots=torch.arange(n).expand(b, h, n),
                     valid=torch.ones(b, h, n, dtype=torch.bool), n_new=n, n_seen=torch.full((b,), n))
    first = torch.tensor([[[0, 5], [2, 5]]])  # one row, keeps 2 per head
    second = Selection(torch.tensor([[[1, 3, 5], [0, 4, 5]]] * 2), torch.tensor([[[True, False, True]] * 2] * 2))
    merged = merge_keeps([first, second], [1, 2], view)
    kept = [[sorted(i for i, v in zip(ix.tolist(), ok.tolist()) if v) for ix, ok in zip(ri, rv)]
            for ri, rv in zip(merged.index, merged.valid)]
    assert kept == [[[0, 5], [2, 5]], [[1, 5], [0, 5]], [[1, 5], [0, 5]]]
    assert bool((merged.index.diff(dim=-1) > 0).all())  # ascending, no duplicates
    assert merge_keeps([None, None], [1, 2], view) is None
    plain = merge_keeps([first, torch.tensor([[[1, 2], [3, 4]]] * 2)], [1, 2], view)
    assert isinstance(plain, torch.Tensor) and plain.shape == (3, 2, 2)  # one width: what each returns alone


def test_measure_noise_depends_on_the_prompt_draws(tmp_path, monkeypatch):
    """--measure-noise writes the fitness sd of one member over fresh draws; another seed, other draws."""
    model = str(_answering_lm(tmp_path / "lm"))
    base = ["evolve", "--model", model, "--stages", "count", "count,passage", "--generations", "1", "1",
            "--popsize", "3", "--prompts", "3", "--length", "128", "--update-interval", "64", "--batch-size", "8",
            "--device", "cpu", "--measure-noise", "4"]
    results = []
    for seed in (1, 2):
        out = tmp_path / f"noise{seed}"
        assert main([*base, "--seed", str(seed), "--out", str(out)]) == 0
        results.append(json.loads((out / "noise.json").read_text()))
    for r in results:
        assert r["draws"] == 4 and len(r["stages"]) == 2 and r["stages"][1]["tasks"] == ["count", "passage"]
        member0 = r["stages"][0]["member0_fitness"]
        assert len(member0) == 4 and len(set(member0)) > 1  # fresh prompts each draw
        assert r["stages"][0]["member0_std"] == pytest.approx(float(np.std(member0, ddof=1)))
    assert results[0]["stages"][0]["member0_fitness"] != results[1]["stages"][0]["member0_fitness"]
    out = tmp_path / "noise1"
    assert main([*base, "--seed", "1", "--out", str(out), "--popsize", "4"]) == 2  # other options: refused


def _answering_lm(root):
    """A tiny LM that always answers the word "3": it scores on count prompts whose answer is 3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_lm_dir(root)
    model = AutoModelForCausalLM.from_pretrained(root)
    tok = AutoTokenizer.from_pretrained(root)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 30.0  # a constant direction in every hidden state ...
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids("3"), 0] = 10.0  # ... read out as "3"
    model.save_pretrained(root)
    return root


def test_three_stages_chain_and_seeds_differ(tmp_path):
    """Each stage starts from the previous stage's mean; --seeds: one run per seed, reproducible, distinct."""
    model = str(tiny_lm_dir(tmp_path / "lm"))
    args = ["evolve", "--model", model, "--stages", "niah_single", "niah_single,vt", "niah_single,vt,fwe",
            "--generations", "1", "1", "1", "--popsize", "4", "--prompts", "1", "--length", "128",
            "--update-interval", "64", "--batch-size", "8", "--device", "cpu"]
    assert main([*args, "--seeds", "3", "4", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--seeds", "3", "--out", str(tmp_path / "b")]) == 0
    run = tmp_path / "a" / "seed-3"
    log = json.loads((run / "log.json").read_text())
    assert [(e["stage"], e["generation"]) for e in log] == [(1, 1), (2, 1), (3, 1)]
    ckpt = pickle.loads((run / "evolution.pkl").read_bytes())
    starts = ckpt["stage_start"]
    assert len(starts) == 3 and not starts[0].any()  # stage 1 from zero
    for k in (1, 2):
        previous = load_namm(run / f"namm-stage{k}")[0]
        assert previous.abs().sum() > 0 and torch.equal(torch.tensor(starts[k], dtype=torch.float32), previous)
    assert torch.equal(load_namm(run / "namm-stage3")[0], load_namm(run / "namm")[0])
    assert (run / "fitness.png").stat().st_size > 0 and (tmp_path / "a" / "fitness_seeds.png").stat().st_size > 0
    theta = {p: load_namm(tmp_path / p / "namm")[0] for p in ("a/seed-3", "a/seed-4", "b/seed-3")}
    assert torch.equal(theta["a/seed-3"], theta["b/seed-3"])  # the same seed, the same run
    assert not torch.equal(theta["a/seed-3"], theta["a/seed-4"])
    assert json.loads((tmp_path / "a" / "seed-4" / "config.json").read_text())["seed"] == 4


def test_a_spent_time_budget_still_computes_one_generation_per_call(tmp_path):
    """--max-minutes stops between generations, but never before the call's first: a call started with its
    budget already spent (the GPU script gives each call what is left of its 10 minutes) still progresses, and
    calls chained that way end exactly where one uninterrupted run ends."""
    model = str(tiny_lm_dir(tmp_path / "lm"))
    assert main([*ARGS, "--model", model, "--out", str(tmp_path / "straight")]) == 0
    steps = []
    for _ in range(3):
        assert main([*ARGS, "--model", model, "--out", str(tmp_path / "chained"), "--max-minutes", "1e-6"]) == 0
        log = json.loads((tmp_path / "chained" / "log.json").read_text())
        steps.append([(e["stage"], e["generation"]) for e in log])
    assert steps == [[(1, 1)], [(1, 1), (1, 2)], [(1, 1), (1, 2), (2, 1)]]
    straight = json.loads((tmp_path / "straight" / "log.json").read_text())
    assert [e["member_fitness"] for e in log] == [e["member_fitness"] for e in straight]
    assert torch.equal(load_namm(tmp_path / "chained" / "namm")[0], load_namm(tmp_path / "straight" / "namm")[0])
