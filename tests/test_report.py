"""The report: paper columns only ever show copied numbers (n/a otherwise), tables and figures are written."""

from __future__ import annotations

import json

import torch

from eval import reproduce
from transfer.cli import main

RESULTS = {
    "lm": {
        "full": {"score": 0.8, "kept_fraction": 1.0, "per_task": {"vt": 0.5}},
        "namm": {"score": 0.9, "kept_fraction": 0.66, "per_task": {"vt": 0.7}},
        "h2o@match": {"score": 0.7, "kept_fraction": 0.66, "per_task": {"vt": 0.3}},
        "l2@match": {"score": 0.2, "kept_fraction": 0.66, "per_task": {"vt": 0.0}},
        "namm@0.25": {"score": 0.85, "kept_fraction": 0.25, "per_task": {"vt": 0.6}},
    },
    "rl": {"full": {"score": 13.0, "kept_fraction": 1.0}, "namm": {"score": 13.5, "kept_fraction": 0.98}},
}


def test_paper_columns_never_invent_numbers(tmp_path, monkeypatch):
    header, rows = reproduce.cross_domain_table(RESULTS)
    assert header[:4] == ["policy", "lm score", "lm kept %", "lm paper score"]
    assert [r[0] for r in rows] == reproduce.MAIN_ROWS
    assert all(r[3] == "n/a" for r in rows)  # no paper cell has been copied yet
    # a copied cell appears, in the paper's column only
    monkeypatch.setitem(reproduce.PAPER["lm"]["rows"]["namm"], "LongBench avg", 29.33)
    _, rows = reproduce.cross_domain_table(RESULTS)
    assert rows[1][3] == "29.330" and rows[1][1] == "0.900"


def test_tables_and_figures_are_written(tmp_path):
    header, rows = reproduce.domain_table("lm", RESULTS["lm"])
    reproduce.write_table(tmp_path / "table_lm", header, rows, "caption")
    for suffix in (".md", ".csv", ".tex"):
        assert "namm@0.25" in (tmp_path / f"table_lm{suffix}").read_text()
    reproduce.plot_curves(RESULTS, tmp_path / "curves.png")
    history = [(layer, torch.tensor([[[0, 2, 3], [1, 2, 3]]])) for _ in range(2) for layer in (0, 1)]
    reproduce.eviction_map(history, 4, "test", tmp_path / "map.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "map.png").stat().st_size > 10_000


def test_config_file_overrides_and_rejects_unknown_domains(tmp_path):
    assert reproduce.config_argv({"rl": {"max_steps": 5, "model": "x/{env}"}}, "rl") == [
        "--max-steps", "5", "--model", "x/{env}"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"audio": {}}))
    assert main(["reproduce", "--config", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # nothing written half-way


def test_cli_lists_policies_and_inspects_the_shipped_namm(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("full", "h2o", "l2", "namm", "streaming", "recency", "random"))
    assert main(["namm", "inspect", str(reproduce.ROOT / "artifacts" / "namm" / "namm-shipped")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["param_count"] == 4172 and info["norm"]["count"] > 0
