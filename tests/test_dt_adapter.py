"""Decision Transformer with a persistent KV cache acts exactly like recomputing over the same context."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gymnasium")

from adapters.decision_transformer import DecisionTransformerAdapter  # noqa: E402
from envs.mujoco import make_env  # noqa: E402
from train.dt import rollout_sliding_window  # noqa: E402
from transfer.policies import make_policy  # noqa: E402


def tiny_dt(seed: int = 0):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(seed)
    cfg = DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=32, n_layer=2, n_head=2, max_ep_len=1000,
                                    action_tanh=True)
    cfg.state_mean, cfg.state_std = [0.1] * 11, [1.5] * 11
    cfg.return_scale, cfg.target_return, cfg.context_length = 1000.0, 3600.0, 40
    return DecisionTransformerModel(cfg).eval()


def test_full_cache_equals_sliding_window_over_whole_history():
    model = tiny_dt()
    steps = 25  # context 40 >= steps: the window always holds the whole history
    ref = rollout_sliding_window(model, make_env("hopper"), context=40, episodes=1, seed=3, max_steps=steps)
    adapter = DecisionTransformerAdapter(model)
    got, kept = adapter.rollout([make_env("hopper")], lambda: make_policy("full"), 3600.0, 32, seed=3,
                                max_steps=steps)
    assert got[0] == pytest.approx(ref[0], rel=1e-6, abs=1e-6)
    assert kept == [1.0]


def test_eviction_changes_actions_and_reports_kept_fraction():
    adapter = DecisionTransformerAdapter(tiny_dt())
    envs = [make_env("hopper"), make_env("hopper")]
    full, _ = adapter.rollout(envs, lambda: make_policy("full"), 3600.0, 32, seed=1, max_steps=40)
    small, kept = adapter.rollout(envs, lambda: make_policy("recency", budget=0.25), 3600.0, 32, seed=1,
                                  max_steps=40)
    assert all(0.2 < k < 0.3 for k in kept)
    assert full != small


def test_wrong_observation_size_is_one_clear_error():
    adapter = DecisionTransformerAdapter(tiny_dt())
    with pytest.raises(ValueError, match="state_dim"):
        adapter.rollout([make_env("halfcheetah")], lambda: make_policy("full"), 3600.0, 32, max_steps=2)
