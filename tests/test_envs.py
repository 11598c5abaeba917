"""envs/: env specs, D4RL hdf5 format and scores, Minari loading, dataset generation."""

import json
import os

import h5py
import numpy as np
import pytest

from envs.d4rl import (
    Episode,
    d4rl_normalized_score,
    load_d4rl_hdf5,
    normalized_score,
    select_observations,
    split_episodes,
    write_d4rl_hdf5,
)
from envs.mujoco import ENV_SPECS, get_spec, gym_id, make_env, make_vector_env


def _episode(rng, n, obs_dim=11, act_dim=3, terminal=True):
    term = np.zeros(n, bool)
    tout = np.zeros(n, bool)
    (term if terminal else tout)[-1] = True
    return Episode(rng.normal(size=(n, obs_dim)).astype(np.float32),
                   rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
                   rng.normal(size=n).astype(np.float32), term, tout)


def _write_raw(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)


# ----------------------------------------------------------------------------- specs and envs


def test_d4rl_score_of_real_rollout_returns():
    """Real MuJoCo episodes of unequal length, run in one lock-step batch: the returns the rollout reports
    equal the rewards a recording wrapper saw (no step after an episode ended, none missed), and the
    evaluator's summary scores them with the D4RL formula per episode, then averages."""
    import gymnasium as gym
    import torch
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    from adapters.decision_transformer import DecisionTransformerAdapter
    from eval.rl import summarize
    from transfer.policies import make_policy

    class Recorder(gym.Wrapper):
        def reset(self, **kw):
            self.rewards, self.done = [], False
            return self.env.reset(**kw)

        def step(self, action):
            assert not self.done, "stepped an episode that had ended"
            obs, r, term, trunc, info = self.env.step(action)
            self.rewards.append(r)
            self.done = term or trunc
            return obs, r, term, trunc, info

    torch.manual_seed(1)  # a random DT whose hoppers fall after 18, 18 and 19 steps
    cfg = DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=16, n_layer=1, n_head=1, n_inner=32,
                                    action_tanh=True)
    cfg.state_mean, cfg.state_std = [0.0] * 11, [1.0] * 11
    adapter = DecisionTransformerAdapter(DecisionTransformerModel(cfg))
    envs = [Recorder(make_env("hopper")) for _ in range(3)]
    res = adapter.rollout(envs, lambda: make_policy("full"), 3600.0, 32, seed=[0, 1, 2], max_steps=60)
    lengths = [len(e.rewards) for e in envs]
    assert res.lengths == lengths and len(set(lengths)) > 1 and max(lengths) < 60  # real terminations
    assert res.returns == [sum(e.rewards, 0.0) for e in envs]  # summed in step order, as the rollout does
    rows = [{"return": r, "kept_fraction": 1.0, "seconds": 0.0} for r in res.returns]
    summary = summarize("hopper")(rows)
    spec = get_spec("hopper")
    per_episode = [100 * (r - spec.ref_min_score) / (spec.ref_max_score - spec.ref_min_score) for r in res.returns]
    np.testing.assert_allclose(summary["score"], np.mean(per_episode), rtol=1e-12)
    np.testing.assert_allclose(summary["score_std"], np.std(per_episode), rtol=1e-12)
    assert summary["return"] == pytest.approx(np.mean(res.returns), rel=1e-12)
    # each environment is scored with its own references (halfway between them is 50)
    for name, s in ENV_SPECS.items():
        np.testing.assert_allclose(d4rl_normalized_score(name, (s.ref_min_score + s.ref_max_score) / 2), 50.0)
        assert s.ref_max_score > s.ref_min_score
    np.testing.assert_allclose(normalized_score([10.0, 110.0], 10.0, 110.0), [0.0, 100.0])
    with pytest.raises(ValueError, match="undefined"):
        normalized_score(1.0, 5.0, 5.0)


def test_specs_and_errors():
    assert [(s.obs_dim, s.act_dim) for s in ENV_SPECS.values()] == [(11, 3), (17, 6), (17, 6)]
    assert [s.target_return for s in ENV_SPECS.values()] == [3600.0, 12000.0, 5000.0]
    assert gym_id("half_cheetah", "v4") == "HalfCheetah-v4"
    with pytest.raises(ValueError, match="unknown environment 'ant'.*hopper, halfcheetah, walker2d"):
        get_spec("ant")
    with pytest.raises(ValueError, match="unknown environment version 'v3'.*v5, v4"):
        make_env("hopper", "v3")


@pytest.mark.parametrize("name,version", [("hopper", "v5"), ("walker2d", "v4"), ("halfcheetah", "v5")])
def test_make_env_shapes(name, version):
    env = make_env(name, version, seed=0)
    spec = get_spec(name)
    assert env.observation_space.shape == (spec.obs_dim,) and env.action_space.shape == (spec.act_dim,)
    assert env.spec.id == gym_id(name, version) and env.spec.max_episode_steps == 1000
    obs, *_ = env.step(env.action_space.sample())
    assert obs.shape == (spec.obs_dim,)
    env.close()


@pytest.mark.parametrize("name,version", [("hopper", "v5"), ("halfcheetah", "v5"), ("walker2d", "v4")])
def test_position_only_observations_are_qpos_without_root_x(name, version):
    """obs="pos" keeps exactly the joint positions (qpos[1:]) and no velocity; the wrapped env steps like the
    plain one (same seed, same actions -> same positions, same rewards, same termination)."""
    spec = get_spec(name)
    full, pos = make_env(name, version), make_env(name, version, obs="pos")
    assert pos.observation_space.shape == (spec.pos_dims,) == (spec.state_dim("pos"),)
    of, _ = full.reset(seed=4)
    op, _ = pos.reset(seed=4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        qpos, qvel = pos.unwrapped.data.qpos, pos.unwrapped.data.qvel
        np.testing.assert_array_equal(op, qpos[1:])
        np.testing.assert_array_equal(op, of[: spec.pos_dims])
        assert len(qpos) - 1 + len(qvel) == spec.obs_dim  # what was dropped is exactly the velocities
        a = rng.uniform(-1, 1, spec.act_dim).astype(np.float32)
        of, rf, tf, _, _ = full.step(a)
        op, rp, tp, _, _ = pos.step(a)
        assert (rf, tf) == (rp, tp)
    assert pos.spec.max_episode_steps == 1000
    with pytest.raises(ValueError, match="unknown observation variant 'vel'"):
        make_env(name, obs="vel")


def test_select_observations_cuts_a_dataset_like_the_env(tmp_path):
    rng = np.random.default_rng(0)
    data = load_d4rl_hdf5(write_d4rl_hdf5(tmp_path / "d.hdf5", [_episode(rng, 5), _episode(rng, 3)],
                                          {"env_name": "hopper"}))
    pos = select_observations(data, "pos")
    assert pos.obs_dim == 5 and pos.metadata["obs_variant"] == "pos" and len(pos) == 2
    np.testing.assert_array_equal(pos.episodes[1].observations, data.episodes[1].observations[:, :5])
    np.testing.assert_array_equal(pos.returns, data.returns)
    assert select_observations(data, "full") is data
    with pytest.raises(ValueError, match="has 5 observation entries"):
        select_observations(pos, "pos")


def test_make_vector_env_seeded():
    a, b = make_vector_env("walker2d", 2, seed=3), make_vector_env("walker2d", 2, seed=3)
    oa, _ = a.reset(seed=[3, 4])
    ob, _ = b.reset(seed=[3, 4])
    assert oa.shape == (2, 17)
    np.testing.assert_array_equal(oa, ob)
    assert not np.array_equal(oa[0], oa[1])
    with pytest.raises(ValueError, match=">= 1"):
        make_vector_env("hopper", 0)


# ----------------------------------------------------------------------------- D4RL hdf5


def test_split_at_terminals_or_timeouts_drops_trailing_piece():
    n = 12
    term = np.zeros(n, bool)
    tout = np.zeros(n, bool)
    term[2], tout[6], term[9] = True, True, True  # episodes 0-2, 3-6, 7-9; steps 10-11 are unfinished
    eps = split_episodes(np.arange(n)[:, None] * np.ones((1, 2)), np.zeros((n, 1)), np.arange(n), term, tout)
    assert [len(e) for e in eps] == [3, 4, 3]
    assert [e.observations[0, 0] for e in eps] == [0, 3, 7]
    assert [e.ret for e in eps] == [3.0, 18.0, 24.0]
    assert eps[1].timeouts[-1] and not eps[1].terminals.any()


def test_split_without_timeouts_cuts_every_1000_steps():
    n = 2600
    term = np.zeros(n, bool)
    term[1199] = True
    eps = split_episodes(np.zeros((n, 1)), np.zeros((n, 1)), np.ones(n), term, None)
    assert [len(e) for e in eps] == [1000, 200, 1000]  # 400 trailing steps dropped
    assert eps[0].timeouts[-1] and eps[1].terminals[-1]


def test_hdf5_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    eps = [_episode(rng, 5), _episode(rng, 3, terminal=False), _episode(rng, 7)]
    meta = {"env_name": "hopper", "env_version": "v5", "seed": 7, "random_return": -3.5, "expert_return": 99.0,
            "behaviour_policy": "test"}
    path = write_d4rl_hdf5(tmp_path / "d.hdf5", eps, meta)
    with h5py.File(path) as f:
        assert {"observations", "actions", "rewards", "terminals", "timeouts", "metadata"} <= set(f.keys())
        assert f["observations"].dtype == np.float32 and f["observations"].shape == (15, 11)
        assert f["terminals"].dtype == bool
    data = load_d4rl_hdf5(path)
    assert data.env_name == "hopper" and data.metadata == meta
    assert [len(e) for e in data.episodes] == [5, 3, 7] and data.num_steps == 15
    for a, b in zip(eps, data.episodes):
        for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    np.testing.assert_allclose(data.returns, [e.ret for e in eps], rtol=1e-6)
    obs = np.concatenate([e.observations for e in eps])
    np.testing.assert_allclose(data.state_mean, obs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data.state_std, obs.std(0) + 1e-6, rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["d.hdf5"]  # no temp file left


def test_load_d4rl_keys_written_by_hand(tmp_path):
    n = 8
    term = np.zeros(n, bool)
    term[3] = True
    tout = np.zeros(n, bool)
    tout[7] = True
    _write_raw(tmp_path / "raw.hdf5", observations=np.ones((n, 17)), actions=np.zeros((n, 6)), rewards=np.ones(n),
               terminals=term, timeouts=tout)
    data = load_d4rl_hdf5(tmp_path / "raw.hdf5", env_name="walker2d")
    assert data.env_name == "walker2d" and data.lengths.tolist() == [4, 4] and data.obs_dim == 17


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_d4rl_hdf5(tmp_path / "nope.hdf5")
    _write_raw(tmp_path / "a.hdf5", observations=np.ones((4, 11)), actions=np.zeros((4, 3)), rewards=np.ones(4))
    with pytest.raises(ValueError, match=r"missing D4RL key\(s\) \['terminals'\]"):
        load_d4rl_hdf5(tmp_path / "a.hdf5")
    term = np.array([0, 0, 0, 1], bool)
    _write_raw(tmp_path / "b.hdf5", observations=np.ones((4, 11)), actions=np.zeros((4, 3)), rewards=np.ones(4),
               terminals=term)
    with pytest.raises(ValueError, match="does not match walker2d"):
        load_d4rl_hdf5(tmp_path / "b.hdf5", env_name="walker2d")
    with pytest.raises(ValueError, match="unknown environment"):
        load_d4rl_hdf5(tmp_path / "b.hdf5", env_name="pong")
    _write_raw(tmp_path / "c.hdf5", observations=np.ones((4, 11)), actions=np.zeros((3, 3)), rewards=np.ones(4),
               terminals=term)
    with pytest.raises(ValueError, match="inconsistent"):
        load_d4rl_hdf5(tmp_path / "c.hdf5")


def test_write_refuses_unfinished_episode_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(1)
    ep = _episode(rng, 4)
    ep.terminals[-1] = False
    with pytest.raises(ValueError, match="terminal or timeout"):
        write_d4rl_hdf5(tmp_path / "x.hdf5", [ep])
    with pytest.raises(ValueError, match="no episodes"):
        write_d4rl_hdf5(tmp_path / "x.hdf5", [])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Minari


def test_minari_tiny_dataset(tmp_path, monkeypatch):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    from envs.minari_data import load_minari, minari_normalized_score

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    rng = np.random.default_rng(0)
    bufs = []
    for i, n in enumerate([5, 7]):
        bufs.append(EpisodeBuffer(
            id=i, observations=list(rng.normal(size=(n + 1, 11))),
            actions=list(rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)), rewards=list(np.full(n, 2.0)),
            terminations=[False] * (n - 1) + [i == 0], truncations=[False] * (n - 1) + [i == 1]))
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers("mujoco/hopper/tiny-v0", bufs, env=gym.make("Hopper-v5"),
                                           ref_min_score=0.0, ref_max_score=20.0, algorithm_name="test")
    monkeypatch.delenv("MINARI_DATASETS_PATH")
    data = load_minari("mujoco/hopper/tiny-v0", root=tmp_path)
    assert data.env_name == "hopper" and data.lengths.tolist() == [5, 7]
    np.testing.assert_array_equal(data.episodes[0].observations, np.asarray(bufs[0].observations[:-1], np.float32))
    assert data.episodes[0].terminals[-1] and data.episodes[1].timeouts[-1] and not data.episodes[1].terminals.any()
    np.testing.assert_allclose(data.returns, [10.0, 14.0])
    assert data.metadata["random_return"] == 0.0 and data.metadata["expert_return"] == 20.0
    np.testing.assert_allclose(minari_normalized_score("mujoco/hopper/tiny-v0", data.returns, root=tmp_path),
                               [50.0, 70.0])
    assert "MINARI_DATASETS_PATH" not in os.environ
    with pytest.raises(FileNotFoundError, match="no download"):
        load_minari("mujoco/hopper/medium-v0", root=tmp_path)
    with pytest.raises(ValueError, match="does not match walker2d"):
        load_minari("mujoco/hopper/tiny-v0", root=tmp_path, env_name="walker2d")


# ----------------------------------------------------------------------------- generation


def test_pick_checkpoints():
    from envs.generate import pick_checkpoints

    chunks = [{"steps": s, "eval_return": r} for s, r in [(1, 100), (2, 400), (3, 900), (4, 1000), (5, 800)]]
    assert pick_checkpoints(chunks, 0.0, 0.4) == (4, 2)  # best 1000, medium nearest 400 before it
    assert pick_checkpoints(chunks, 0.0, 0.9) == (4, 3)


def test_generate_tiny_end_to_end(tmp_path):
    from envs.generate import main

    args = ["--env", "hopper", "--out", str(tmp_path / "data"), "--work", str(tmp_path / "work"),
            "--timesteps", "1024", "--chunk", "512", "--n-envs", "2", "--max-file-mb", "0.02"]
    summary = main(args)
    assert [c["steps"] for c in summary["checkpoints"]] == [512, 1024]
    for kind in ("medium", "medium-replay", "expert"):
        data = load_d4rl_hdf5(tmp_path / "data" / f"hopper-{kind}-v5.hdf5", env_name="hopper")
        assert data.metadata["dataset"] == kind and data.metadata["env_id"] == "Hopper-v5"
        assert data.num_steps == summary["datasets"][kind]["steps"] <= 0.02e6 / 62
        np.testing.assert_allclose(data.returns.mean(), summary["datasets"][kind]["return_mean"], rtol=1e-5)
        assert data.metadata["expert_return"] == pytest.approx(summary["datasets"]["expert"]["return_mean"])
        # rewards in the file are the env's own: Hopper's healthy reward makes every step's reward positive-ish
        assert np.isfinite(data.returns).all()
    saved = json.loads((tmp_path / "data" / "hopper-v5-summary.json").read_text())
    assert saved["random_return"] == summary["random_return"]
    # a second call resumes: no extra training chunk
    assert [c["steps"] for c in main(args)["checkpoints"]] == [512, 1024]
