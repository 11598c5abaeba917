"""adapters/decision_transformer.py: the DT runtime (loading, statistics, return-to-go, the sliding-window
rollout) and the persistent-cache rollout, which acts exactly like recomputing over the same context."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from adapters import decision_transformer as D  # noqa: E402
from adapters.decision_transformer import DecisionTransformerAdapter, load_dt, rollout_sliding_window  # noqa: E402
from envs.mujoco import check_model, make_env  # noqa: E402
from transfer.policies import make_policy  # noqa: E402


def tiny_dt(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2, state_dim: int = 11, act_dim: int = 3,
            stats: bool = True):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(seed)
    cfg = DecisionTransformerConfig(state_dim=state_dim, act_dim=act_dim, hidden_size=hidden, n_layer=layers,
                                    n_head=heads, n_inner=2 * hidden, max_ep_len=1000, action_tanh=True)
    if stats:
        cfg.state_mean = np.linspace(-1, 1, state_dim).tolist()
        cfg.state_std = np.linspace(0.5, 2, state_dim).tolist()
        cfg.return_scale, cfg.target_return, cfg.context_length = 1000.0, 3600.0, 40
    return DecisionTransformerModel(cfg).eval()


# ----------------------------------------------------------------------------- return-to-go, states, windows


def test_rtg_and_state_helpers():
    assert D.initial_rtg(3600) == 3.6
    assert D.update_rtg(3.6, 100.0) == pytest.approx(3.5)
    np.testing.assert_allclose(D.normalize_state(np.array([3.0, 1.0]), np.array([1.0, 1.0]), np.array([2.0, 0.5])),
                               [1.0, 0.0])
    mean, std, scale = D.model_stats(tiny_dt().double())
    assert mean.dtype == torch.float64 and std[0] == 0.5 and scale == 1000.0


def test_window_inputs_left_pads():
    s, a = torch.arange(6.0).view(3, 2), torch.ones(3, 1)
    inp = D.window_inputs(s, a, torch.tensor([3.0, 2.0, 1.0]), torch.arange(3), context=5)
    assert inp["states"].shape == (1, 5, 2) and inp["returns_to_go"].shape == (1, 5, 1)
    assert inp["attention_mask"].tolist() == [[0, 0, 1, 1, 1]]
    assert inp["states"][0, :2].abs().sum() == 0 and torch.equal(inp["states"][0, 2:], s)
    assert inp["timesteps"].tolist() == [[0, 0, 0, 1, 2]]
    cut = D.window_inputs(s, a, torch.tensor([3.0, 2.0, 1.0]), torch.arange(3), context=2)
    assert torch.equal(cut["states"][0], s[1:]) and cut["attention_mask"].tolist() == [[1, 1]]


# ----------------------------------------------------------------------------- loading: our folders


def test_load_dt_our_format_and_errors(tmp_path):
    m = tiny_dt(hidden=16, layers=1, heads=1)
    del m.config.return_scale, m.config.target_return, m.config.context_length
    m.save_pretrained(tmp_path / "ours")
    loaded = load_dt(tmp_path / "ours", env_name="hopper")
    # transformers 5 drops `max_length` from configs, so edbeeching-style folders get their K=20 default
    assert loaded.config.return_scale == 1000.0 and loaded.config.context_length == 20
    assert loaded.config.env_name == "hopper" and not loaded.training
    assert loaded.config.state_std == m.config.state_std and loaded.config.state_stats_source == "config"
    # the RL domain's check: sizes against the environment, the DT paper's target when the config has none
    assert check_model(loaded.config).name == "hopper" and loaded.config.target_return == 3600.0
    with pytest.raises(ValueError, match="does not match walker2d"):
        check_model(load_dt(tmp_path / "ours").config, "walker2d")
    with pytest.raises(FileNotFoundError):
        load_dt(tmp_path / "nothing-here")
    ok = load_dt(tmp_path / "ours", state_mean=np.zeros(11), state_std=np.ones(11))
    assert ok.config.state_std == [1.0] * 11
    with pytest.raises(ValueError, match="11 values, the model's state_dim is 11|have 3/3 values"):
        load_dt(tmp_path / "ours", state_mean=np.zeros(3), state_std=np.ones(3))
    with pytest.raises(ValueError, match="std > 0"):
        load_dt(tmp_path / "ours", state_mean=np.zeros(11), state_std=np.zeros(11))


# ----------------------------------------------------------------------------- loading: public checkpoints


def _public_folder(path, layout: str):
    """A DT saved as the public edbeeching repos hold it: config.json without statistics + weights."""
    from safetensors.torch import save_file

    m = tiny_dt(hidden=16, layers=1, heads=1, stats=False)
    path.mkdir(parents=True)
    m.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    assert "state_mean" not in cfg and "state_std" not in cfg
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    if layout == "pytorch_model.bin":  # the hub's main branch (2022 uploads)
        torch.save(state, path / "pytorch_model.bin")
    else:  # safetensors conversion, as save_pretrained writes today
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return m


def _write_stats(path, mean, std):
    path.write_text(json.dumps({"state_mean": list(mean), "state_std": list(std)}))
    return path


LAYOUTS = ("pytorch_model.bin", "model.safetensors")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["hub-name", "hub-cache"])
def test_public_checkpoint_statistics_three_ways(tmp_path, layout, where):
    if where == "hub-name":
        folder = tmp_path / "decision-transformer-gym-hopper-medium"
    else:  # huggingface_hub's cache: the repository name is only in a parent folder
        folder = tmp_path / "models--edbeeching--decision-transformer-gym-hopper-medium" / "snapshots" / "3fdd7158"
    ref = _public_folder(folder, layout)
    card_mean, card_std = D.MODEL_CARD_STATS["hopper-medium"]

    # 3. the model card's values, found from the repository name; env and K=20 from the public defaults
    model = load_dt(folder)
    assert model.config.state_mean == card_mean and model.config.state_std == card_std
    assert model.config.state_stats_source == "model card hopper-medium"
    assert model.config.env_name == "hopper" and model.config.context_length == 20
    assert check_model(model.config).target_return == 3600.0 and model.config.target_return == 3600.0
    for name, p in ref.state_dict().items():  # the weights really were read from this layout
        assert torch.equal(model.state_dict()[name], p), name

    # 2. a JSON beside the weights wins over the card
    beside = _write_stats(folder / "state_stats.json", np.full(11, 0.5), np.full(11, 2.0))
    model = load_dt(folder)
    assert model.config.state_mean == [0.5] * 11 and model.config.state_stats_source == "state_stats.json"

    # 1. --state-stats FILE wins over both
    given = _write_stats(tmp_path / "mine.json", np.full(11, -1.0), np.full(11, 3.0))
    adapter = DecisionTransformerAdapter.from_pretrained(str(folder), env_name="hopper", state_stats=str(given))
    assert adapter.model.config.state_std == [3.0] * 11
    assert adapter.model.config.state_stats_source == "file mine.json"
    beside.unlink()

    # the statistics are what the rollout normalises with: other statistics, other actions
    envs = lambda: [make_env("hopper")]  # noqa: E731
    card = DecisionTransformerAdapter.from_pretrained(str(folder)).rollout(envs(), lambda: make_policy("full"),
                                                                           3600.0, 32, seed=0, max_steps=5)
    mine = adapter.rollout(envs(), lambda: make_policy("full"), 3600.0, 32, seed=0, max_steps=5)
    assert card.returns != mine.returns


def test_public_checkpoint_without_statistics_is_one_clear_error(tmp_path):
    folder = tmp_path / "my-dt"
    _public_folder(folder, "model.safetensors")
    with pytest.raises(ValueError, match="no state normalisation statistics.*--state-stats FILE") as err:
        load_dt(folder)
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"state_mean": [0.0]}')
    with pytest.raises(ValueError, match="state_mean and state_std"):
        load_dt(folder, state_stats=bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dt(folder, state_stats=tmp_path / "missing.json")
    _write_stats(bad, np.zeros(17), np.ones(17))
    with pytest.raises(ValueError, match="17/17 values, the model's state_dim is 11"):
        load_dt(folder, state_stats=bad)


def test_model_card_table_is_consistent():
    """Every card entry names a known env and dataset and has one mean and one positive std per state dim."""
    from envs.mujoco import get_spec

    assert {n.split("-", 1)[1] for n in D.MODEL_CARD_STATS} <= {"medium", "medium-replay", "expert"}
    for name, (mean, std) in D.MODEL_CARD_STATS.items():
        dim = get_spec(name.split("-")[0]).obs_dim
        assert len(mean) == len(std) == dim, name
        assert min(std) > 0, name
    assert D.public_checkpoint_name("edbeeching/decision-transformer-gym-walker2d-medium-replay") == \
        "walker2d-medium-replay"
    assert D.public_checkpoint_name("edbeeching/decision-transformer-gym-hopper-medium") == "hopper-medium"
    assert D.public_checkpoint_name("someone/dt-hopper") is None


def test_eval_rl_missing_statistics_is_one_line_cli_error(tmp_path, capsys):
    from transfer.cli import main

    _public_folder(tmp_path / "my-dt", "pytorch_model.bin")
    rc = main(["eval", "rl", "--env", "hopper", "--model", str(tmp_path / "my-dt"), "--policies", "full",
               "--episodes", "1", "--max-steps", "3", "--device", "cpu", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and "--state-stats" in err[0]
    assert not (tmp_path / "runs").exists()  # checked before any run directory is written


# ----------------------------------------------------------------------------- rollouts


def _hf_example_rollout(model, env, target_return, scale, context, seed, max_steps):
    """The HF blog evaluation loop (torch.cat history, get_action left padding), written independently.

    In the rollout precision (float64 model and inputs, float32 actions: see the adapter's docstring)."""
    model = model.double()
    mean = torch.tensor(model.config.state_mean, dtype=torch.float64)
    std = torch.tensor(model.config.state_std, dtype=torch.float64)
    state, _ = env.reset(seed=seed)
    states = torch.from_numpy(state).reshape(1, -1).double()
    actions = torch.zeros((0, model.config.act_dim), dtype=torch.float64)
    rtg = torch.tensor(target_return / scale, dtype=torch.float64).reshape(1, 1)
    timesteps = torch.tensor(0).reshape(1, 1)
    ret = 0.0
    for t in range(max_steps):
        actions = torch.cat([actions, torch.zeros((1, model.config.act_dim), dtype=torch.float64)], dim=0)
        s = ((states - mean) / std)[-context:].reshape(1, -1, model.config.state_dim)
        a = actions[-context:].reshape(1, -1, model.config.act_dim)
        r = rtg[:, -context:].reshape(1, -1, 1)
        ts = timesteps[:, -context:]
        pad = context - s.shape[1]
        mask = torch.cat([torch.zeros(pad), torch.ones(s.shape[1])]).long().reshape(1, -1)
        s = torch.cat([torch.zeros((1, pad, s.shape[2]), dtype=torch.float64), s], dim=1)
        a = torch.cat([torch.zeros((1, pad, a.shape[2]), dtype=torch.float64), a], dim=1)
        r = torch.cat([torch.zeros((1, pad, 1), dtype=torch.float64), r], dim=1)
        ts = torch.cat([torch.zeros((1, pad), dtype=torch.long), ts], dim=1)
        with torch.no_grad():
            action = model(states=s, actions=a, rewards=torch.zeros(1, context, 1, dtype=torch.float64),
                           returns_to_go=r, timesteps=ts, attention_mask=mask).action_preds[0, -1]
        action = action.float()
        actions[-1] = action
        state, reward, term, trunc, _ = env.step(action.numpy())
        ret += reward
        states = torch.cat([states, torch.from_numpy(state).reshape(1, -1).double()], dim=0)
        rtg = torch.cat([rtg, (rtg[0, -1] - reward / scale).reshape(1, 1)], dim=1)
        timesteps = torch.cat([timesteps, torch.ones((1, 1), dtype=torch.long) * (t + 1)], dim=1)
        if term or trunc:
            break
    return ret


def test_sliding_window_rollout_matches_hf_example():
    model = tiny_dt(hidden=16, layers=1, heads=1)
    env = make_env("hopper")
    rets = rollout_sliding_window(model, env, target_return=3600.0, context=4, episodes=2, seed=5, max_steps=9)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not cast
    assert len(rets) == 2 and np.isfinite(rets).all() and rets[0] != rets[1]
    ref = [_hf_example_rollout(model, env, 3600.0, 1000.0, 4, seed, 9) for seed in (5, 6)]
    np.testing.assert_allclose(rets, ref, rtol=1e-12)
    with pytest.raises(ValueError, match="does not match the model's state_dim=11"):
        rollout_sliding_window(model, make_env("walker2d"), target_return=1.0, episodes=1, max_steps=2)


def test_batched_sliding_window_equals_one_episode_at_a_time():
    """The lock-step evaluator (one model call per env step for every episode) returns exactly what the
    per-episode evaluator returns, for windows shorter and longer than the episode so far and for episodes
    that end at different steps (with this action bias hopper falls after 24, 24 and 23 steps)."""
    model = tiny_dt(seed=1, hidden=16, layers=1, heads=1)
    with torch.no_grad():
        model.predict_action[0].bias.fill_(1.0)
    seeds = [5, 6, 7]
    lengths = DecisionTransformerAdapter(model).rollout([make_env("hopper") for _ in seeds],
                                                        lambda: make_policy("full"), 3600.0, 32, seed=seeds,
                                                        max_steps=60).lengths
    assert lengths == [24, 24, 23]
    for context in (3, 40):
        batch = D.rollout_sliding_window_batch(model, [make_env("hopper") for _ in seeds], 3600.0, context, seeds,
                                               max_steps=60)
        one = [rollout_sliding_window(model, make_env("hopper"), 3600.0, context, episodes=1, seed=s,
                                      max_steps=60)[0] for s in seeds]
        assert batch == one
    short = D.rollout_sliding_window_batch(model, [make_env("hopper")], 3600.0, 1, [5], max_steps=60)
    assert short != D.rollout_sliding_window_batch(model, [make_env("hopper")], 3600.0, 40, [5], max_steps=60)
    with pytest.raises(ValueError, match="2 seeds for 1 environments"):
        D.rollout_sliding_window_batch(model, [make_env("hopper")], 1.0, 3, [1, 2])


def test_position_only_model_runs_in_the_position_only_env():
    model = tiny_dt(state_dim=5)  # hopper positions only
    model.config.env_name, model.config.obs_variant = "hopper", "pos"
    assert check_model(model.config).name == "hopper"
    env = make_env("hopper", obs="pos")
    rets = rollout_sliding_window(model, env, 3600.0, 4, episodes=1, seed=1, max_steps=5)
    res = DecisionTransformerAdapter(model).rollout([make_env("hopper", obs="pos")], lambda: make_policy("full"),
                                                    3600.0, 32, seed=1, max_steps=5)
    assert np.isfinite(rets).all() and len(res.returns) == 1
    model.config.obs_variant = "full"
    with pytest.raises(ValueError, match="with 'full' observations"):
        check_model(model.config)
    with pytest.raises(ValueError, match="does not match the model's state_dim=5"):
        rollout_sliding_window(model, make_env("hopper"), 1.0, episodes=1, max_steps=2)


def test_full_cache_equals_sliding_window_over_whole_history():
    model = tiny_dt()
    steps = 25  # context 40 >= steps: the window always holds the whole history
    ref = rollout_sliding_window(model, make_env("hopper"), context=40, episodes=1, seed=3, max_steps=steps)
    adapter = DecisionTransformerAdapter(model)
    res = adapter.rollout([make_env("hopper")], lambda: make_policy("full"), 3600.0, 32, seed=3, max_steps=steps)
    assert res.returns[0] == pytest.approx(ref[0], rel=1e-12, abs=1e-12)
    assert res.kept_fractions == [1.0] and res.lengths[0] <= steps


def test_eviction_changes_actions_and_reports_kept_fraction_and_memory():
    adapter = DecisionTransformerAdapter(tiny_dt())
    envs = [make_env("hopper"), make_env("hopper")]
    full = adapter.rollout(envs, lambda: make_policy("full"), 3600.0, 32, seed=1, max_steps=40)
    small = adapter.rollout(envs, lambda: make_policy("recency", budget=0.25), 3600.0, 32, seed=1, max_steps=40,
                            record=True)
    assert all(0.2 < k < 0.3 for k in small.kept_fractions)
    assert full.returns != small.returns
    # the recorded memory comes back in the result; the adapter keeps no reference to it
    assert small.memory.history and not hasattr(adapter, "last_memory")
    layer, kept = small.memory.history[0]
    assert layer == 0 and kept.shape[0] == 2  # (batch, kv_heads, n_keep)
    assert not full.memory.history  # nothing recorded unless asked


def test_episode_seed_does_not_depend_on_its_batch():
    adapter = DecisionTransformerAdapter(tiny_dt())
    pol = lambda: make_policy("full")  # noqa: E731
    pair = adapter.rollout([make_env("hopper"), make_env("hopper")], pol, 3600.0, 32, seed=[7, 4], max_steps=15)
    alone = adapter.rollout([make_env("hopper")], pol, 3600.0, 32, seed=[4], max_steps=15)
    assert pair.returns[1] == alone.returns[0]
    with pytest.raises(ValueError, match="2 seeds for 1 environments"):
        adapter.rollout([make_env("hopper")], pol, 3600.0, 32, seed=[1, 2], max_steps=2)


def test_wrong_observation_size_is_one_clear_error():
    adapter = DecisionTransformerAdapter(tiny_dt())
    with pytest.raises(ValueError, match=r"\(17,\)/\(6,\) does not match the model.s state_dim=11/act_dim=3"):
        adapter.rollout([make_env("halfcheetah")], lambda: make_policy("full"), 3600.0, 32, max_steps=2)


def test_loading_a_public_style_config_prints_no_token_id_warning(tmp_path, capfd):
    """Public DT configs carry GPT-2's bos/eos ids (50256) in a model with no vocabulary; transformers 5 warns about
    them on every load. load_dt reads such a config silently (and our trainer writes None)."""
    from adapters.decision_transformer import load_dt
    from train.dt import DTConfig, build_model

    model = tiny_dt()
    assert model.config.bos_token_id == 50256  # as in the public checkpoints
    model.save_pretrained(tmp_path / "dt")
    capfd.readouterr()
    load_dt(tmp_path / "dt", env_name="hopper")
    assert "token_id" not in capfd.readouterr().err
    ours = build_model(DTConfig(env="hopper", hidden=16, layers=1), 11, 3, [0.0] * 11, [1.0] * 11)
    assert (ours.config.bos_token_id, ours.config.eos_token_id) == (None, None)
    assert "token_id" not in capfd.readouterr().err
