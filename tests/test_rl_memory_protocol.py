"""eval/rl.py's memory protocol on CPU with tiny random DTs: position-only models run in the wrapped env,
short sliding windows sit beside token budgets, and several training seeds pool into one paired table."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from adapters.decision_transformer import rollout_sliding_window_batch  # noqa: E402
from envs.d4rl import d4rl_normalized_score  # noqa: E402
from envs.mujoco import make_env  # noqa: E402
from eval import rl  # noqa: E402
from eval.options import add_rl_arguments  # noqa: E402


def _save_dt(path, seed: int) -> None:
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(seed)
    cfg = DecisionTransformerConfig(state_dim=5, act_dim=3, hidden_size=16, n_layer=1, n_head=1, n_inner=32,
                                    max_ep_len=1000, action_tanh=True)
    cfg.state_mean, cfg.state_std = [0.0] * 5, [1.0] * 5
    cfg.return_scale, cfg.target_return, cfg.context_length = 1000.0, 3600.0, 12
    cfg.env_name, cfg.obs_variant = "hopper", "pos"
    DecisionTransformerModel(cfg).save_pretrained(path)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_rl_arguments(p)
    return p.parse_args(list(argv))


def test_memory_protocol_two_seeds_windows_and_budgets(tmp_path):
    for s in (0, 1):
        _save_dt(tmp_path / f"dt-hopper-s{s}", s)
    args = _args("--env", "hopper", "--model", str(tmp_path / "dt-{env}-s{seed}"), "--train-seeds", "0,1",
                 "--episodes", "2", "--max-steps", "12", "--policies", "full,recency", "--budget", "6t",
                 "--update-interval", "16", "--protect-recent", "3", "--window-steps", "2",
                 "--out", str(tmp_path / "out"), "--device", "cpu")
    res = rl.run(args)
    assert set(res) == {"sliding window K=2", "sliding window (no cache)", "full", "recency@6t"}
    assert all(m["n"] == 4 for m in res.values())  # 2 seeds x 2 episodes, one stratum
    ids = sorted(u[2] for u in res["full"]["units"])
    assert ids == ["s0/hopper-0", "s0/hopper-1", "s1/hopper-0", "s1/hopper-1"]
    assert set(res["full"]["per_task"]) == {"seed 0", "seed 1"}
    # the K=2 row is the lock-step evaluator at context 2 in the position-only env, seeds 0 and 1 per model
    from adapters.decision_transformer import load_dt

    want = []
    for s in (0, 1):
        model = load_dt(tmp_path / f"dt-hopper-s{s}")
        want += rollout_sliding_window_batch(model, [make_env("hopper", obs="pos") for _ in range(2)], 3600.0, 2,
                                             [0, 1], max_steps=12)
    assert res["sliding window K=2"]["score"] == pytest.approx(float(np.mean(d4rl_normalized_score("hopper", want))))
    # recency at 6 tokens keeps under 1/3 of a 12-step (35-token) episode on average: the budget was applied
    assert res["recency@6t"]["kept_fraction"] < 0.6 and res["full"]["kept_fraction"] == 1.0
    assert res["recency@6t"]["delta_ci"] is not None  # paired against the full cache on the same 4 episodes


@pytest.mark.parametrize("argv,message", [
    (["--window-steps", "8,x"], "--window-steps '8,x': give distinct"),
    (["--window-steps", "0"], "integers >= 1"),
    (["--train-seeds", "0,1"], "needs '{seed}' in --model"),
])
def test_memory_protocol_errors(tmp_path, argv, message):
    _save_dt(tmp_path / "dt", 0)
    args = _args("--env", "hopper", "--model", str(tmp_path / "dt"), "--episodes", "1", "--max-steps", "2",
                 "--policies", "full", "--out", str(tmp_path / "out"), *argv)
    with pytest.raises(ValueError, match=message):
        rl.run(args)


def test_reproduce_rl_memory_domain_reports_the_memory_check(tmp_path):
    """`reproduce --domains rl-memory`: eval/rl.py under the memory protocol's preset (short windows beside token
    budgets of their sizes, compressed every 48 tokens, the newest step protected), and the findings state the
    full cache minus each window with the paired bootstrap's numbers."""
    import json

    from eval.reproduce import PRESETS, domain_args
    from transfer.cli import main
    from transfer.stats import PairedBootstrap

    _save_dt(tmp_path / "dt-hopper-pos", 0)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"rl-memory": {"model": str(tmp_path / "dt-{env}-pos"), "window_steps": "2,4",
                                                "budget": "6t", "episodes": 2, "max_steps": 20,
                                                "policies": "full,namm,recency"}}))
    _, args = domain_args("quick", tmp_path / "run", None, "rl-memory", {})
    assert (args.update_interval, args.protect_recent, args.budget, args.window_steps) == (48, 3, "match,24t,48t,96t",
                                                                                         "8,16,32")
    assert args.model == PRESETS["full"]["rl-memory"]["model"] == "artifacts/rl/dt-{env}-pos-k200"
    assert main(["reproduce", "--domains", "rl-memory", "--config", str(config), "--controls", "1",
                 "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "report" / "results.json").read_text())["rl-memory"]
    assert {"full", "namm", "recency@6t", "sliding window K=2", "sliding window K=4"} <= set(results)
    findings = (tmp_path / "run" / "report" / "findings.md").read_text()
    for k in (2, 4):
        d = PairedBootstrap({x: [tuple(u) for u in results[x]["units"]] for x in ("full", f"sliding window K={k}")}
                            ).diff("full", f"sliding window K={k}")
        assert f"full cache minus a {k}-step window: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" in findings
    assert "update every 48 tokens" in (tmp_path / "run" / "report" / "table_rl-memory.md").read_text()
