"""The report: CIs in every table, verdicts that follow them, controls, paper columns only for verified numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval import reproduce
from transfer.cli import main
from transfer.runner import attach_stats

N = 60


def _domain(shift: dict[str, float], kept: dict[str, float], seed: int = 0) -> dict[str, dict]:
    """Per-prompt 0/1 scores sharing one difficulty per prompt (paired), shifted per policy."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(size=N)
    results, units = {}, {}
    for label, s in shift.items():
        scores = (difficulty < 0.5 + s).astype(float)
        units[label] = [("vt", str(i), str(i), v) for i, v in enumerate(scores)]
        results[label] = {"score": float(scores.mean()), "kept_fraction": kept[label], "per_task": {"vt": 0.0}}
    return attach_stats(results, units)


RESULTS = {
    "lm": _domain({"full": 0.0, "namm": 0.0, "h2o@match": -0.3, "l2@match": -0.01, "namm@0.25": -0.1,
                   "namm-random:s0@match": -0.4, "namm-random:s1@match": -0.2},
                  {"full": 1.0, "namm": 0.66, "h2o@match": 0.66, "l2@match": 0.66, "namm@0.25": 0.25,
                   "namm-random:s0@match": 0.66, "namm-random:s1@match": 0.66}),
    "rl": _domain({"full": 0.0, "namm": 0.02}, {"full": 1.0, "namm": 0.98}, seed=1),
}


def test_every_row_carries_its_ci_and_difference_to_full():
    header, rows = reproduce.cross_domain_table(RESULTS)
    assert header[:4] == ["policy", "lm score [95% CI]", "lm vs full", "lm kept %"]
    assert [r[0] for r in rows] == ["full", "namm", "namm-random@match (mean of seeds)", "h2o@match", "l2@match"]
    namm = rows[1]
    assert namm[1].startswith("0.") and "[" in namm[1] and namm[2].startswith("+0.000 [")
    assert all("paper" not in h for h in header)  # no verified paper number: no paper column at all


def test_verdicts_follow_the_paired_ci():
    _, rows = reproduce.comparisons(RESULTS)
    got = {(r[0], r[1]): r[3] for r in rows}
    assert got[("lm", "h2o@match")] == "better"  # 30 points on 60 paired prompts
    assert got[("lm", "namm-random@match")] == "better"
    assert got[("lm", "full")] == "within noise"  # identical
    assert got[("lm", "l2@match")] == "within noise"  # one point
    assert ("rl", "h2o@match") not in got  # not run: no row
    lines = reproduce.findings(RESULTS)
    assert "within noise of the full cache" in lines[0] and "above H2O" in lines[0]


def test_controls_show_each_seed_mean_and_range():
    _, rows = reproduce.controls_table(RESULTS)
    (row,) = rows
    s0, s1 = RESULTS["lm"]["namm-random:s0@match"]["score"], RESULTS["lm"]["namm-random:s1@match"]["score"]
    assert row[1] == "namm-random@match"
    assert row[3] == f"{(s0 + s1) / 2:.3f} ({min(s0, s1):.3f}-{max(s0, s1):.3f}, 2 seeds)"


def test_paper_column_appears_only_for_a_verified_number(monkeypatch):
    header, _ = reproduce.domain_table("lm", RESULTS["lm"])
    assert not [h for h in header if h.startswith("paper")]
    monkeypatch.setitem(reproduce.PAPER["lm"]["rows"]["namm"], "LongBench avg", 29.33)
    header, rows = reproduce.domain_table("lm", RESULTS["lm"])
    assert header[-1] == "paper LongBench avg"
    assert {r[0]: r[-1] for r in rows}["namm"] == "29.330" and {r[0]: r[-1] for r in rows}["full"] == "n/a"


def test_tables_figures_and_raw_csv_are_written(tmp_path):
    header, rows = reproduce.domain_table("lm", RESULTS["lm"])
    reproduce.write_table(tmp_path / "table_lm", header, rows, "caption")
    for suffix in (".md", ".csv", ".tex"):
        assert "namm@0.25" in (tmp_path / f"table_lm{suffix}").read_text()
    raw = reproduce.raw_csv(RESULTS).splitlines()
    assert raw[0].startswith("domain,policy,score,ci_low,ci_high")
    namm = next(line for line in raw if line.startswith("lm,namm,"))
    assert float(namm.split(",")[2]) == pytest.approx(RESULTS["lm"]["namm"]["score"])
    reproduce.plot_curves(RESULTS, tmp_path / "curves.png")
    history = [(layer, torch.tensor([[[0, 2, 3], [1, 2, -1]]])) for _ in range(2) for layer in (0, 1)]
    reproduce.eviction_map(history, 4, "test", tmp_path / "map.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "map.png").stat().st_size > 10_000


def test_domain_options_take_config_keys_without_argv(tmp_path):
    _, parser = reproduce.domain_parser("lm")
    args = reproduce.domain_options(parser, {"update-interval": 512, "n": 3, "batch_size": 2}, "test")
    assert (args.update_interval, args.limit, args.batch_size) == (512, 3, 2)
    with pytest.raises(ValueError, match="unknown option 'frames'"):
        reproduce.domain_options(parser, {"frames": 8}, "test")
    with pytest.raises(ValueError, match="option 'limit'"):  # the command line's own checks apply to configs
        reproduce.domain_options(parser, {"limit": 0}, "test")


def test_config_file_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    for content in (json.dumps({"audio": {}}), json.dumps({"lm": {"frames": 8}}), "{not json"):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        assert main(["reproduce", "--config", str(bad), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "bad.json" in err[0]
        assert not (tmp_path / "out").exists()  # nothing written half-way


def test_cli_lists_policies_and_inspects_the_shipped_namm(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("full", "h2o", "l2", "namm", "namm-random", "namm-sink", "streaming"))
    assert main(["namm", "inspect", str(reproduce.ROOT / "artifacts" / "namm" / "namm-shipped")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["param_count"] == 4172 and info["norm"]["count"] > 0
