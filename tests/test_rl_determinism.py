"""Rollouts are reproducible: an episode's return is bit-identical for 1 and 2 threads and whether it runs
alone or in a lock-step batch of 3 (the evaluator batches episodes).

Before the fix (float32 forward) the shipped halfcheetah DT's first action already differed by ~1 ulp
between batch 1 and batch 3, and MuJoCo's dynamics turned that into different returns (see the docstring
of adapters/decision_transformer.py); with float32 every comparison below fails. Each thread count runs in
its own process, since OpenMP reads OMP_NUM_THREADS at start-up. The hopper case is a random DT whose
episodes end at different steps, so the batch runs with finished (padded) rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40

SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import DecisionTransformerConfig, DecisionTransformerModel
from adapters import decision_transformer as D
from envs.mujoco import make_env
from transfer.policies import make_policy
if len(sys.argv) > 3:  # manual check of the test's power: python -c SCRIPT THREADS STEPS float32
    D.ROLLOUT_DTYPE = getattr(torch, sys.argv[3])
steps, out = int(sys.argv[2]), {}
torch.manual_seed(1)  # a random hopper DT whose episodes end after 18, 18 and 19 steps: padding in the batch
cfg = DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=16, n_layer=1, n_head=1, n_inner=32)
cfg.state_mean, cfg.state_std = [0.0] * 11, [1.0] * 11
cases = [("halfcheetah", D.DecisionTransformerAdapter.from_pretrained("artifacts/rl/dt-halfcheetah"), ("full", "h2o")),
         ("hopper", D.DecisionTransformerAdapter(DecisionTransformerModel(cfg)), ("full",))]
for env, adapter, policies in cases:
    for name in policies:
        factory = lambda: make_policy(name) if name == "full" else make_policy(name, budget=0.5)
        batch = adapter.rollout([make_env(env) for _ in range(3)], factory, 3600.0, 32, seed=[0, 1, 2], max_steps=steps)
        alone = [adapter.rollout([make_env(env)], factory, 3600.0, 32, seed=[s], max_steps=steps) for s in range(3)]
        out[f"{env}/{name}"] = {"batch": [r.hex() for r in batch.returns], "alone": [a.returns[0].hex() for a in alone],
                                "lengths": batch.lengths, "threads": torch.get_num_threads()}
print("RESULT " + json.dumps(out))
"""


def run(threads: int, *extra: str) -> dict:
    # PASSIVE: idle OpenMP threads sleep instead of spinning (same numbers; 10x faster on a busy 2-core machine)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(threads), str(STEPS), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_returns_identical_across_threads_and_batch_size():
    one, two = run(1), run(2)
    for key in one:
        assert one[key]["threads"] == 1 and two[key]["threads"] == 2
        assert one[key]["batch"] == one[key]["alone"], f"{key}: batch 3 differs from batch 1 (1 thread)"
        assert two[key]["batch"] == two[key]["alone"], f"{key}: batch 3 differs from batch 1 (2 threads)"
        assert one[key]["batch"] == two[key]["batch"], f"{key}: 1 thread differs from 2 threads"
    full, h2o = one["halfcheetah/full"]["batch"], one["halfcheetah/h2o"]["batch"]
    assert len(set(full)) == 3 and full != h2o  # three distinct episodes; the policy mattered
    lengths = one["hopper/full"]["lengths"]
    assert len(set(lengths)) > 1 and max(lengths) < STEPS  # episodes ended at different steps
