"""train/dt.py: batches, tiny training + from_pretrained round trip, load_dt formats, sliding-window rollout."""

import csv
import json

import numpy as np
import pytest
import torch

from envs.d4rl import Episode, load_d4rl_hdf5, write_d4rl_hdf5
from train import dt as T


def _write_data(path, env="hopper", n_eps=4, seed=0):
    rng = np.random.default_rng(seed)
    obs_dim, act_dim = (11, 3) if env == "hopper" else (17, 6)
    eps = []
    for n in rng.integers(3, 12, size=n_eps):
        term = np.zeros(n, bool)
        term[-1] = True
        eps.append(Episode(rng.normal(size=(n, obs_dim)).astype(np.float32),
                           rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
                           rng.uniform(0, 3, n).astype(np.float32), term, np.zeros(n, bool)))
    meta = {"env_name": env, "env_version": "v5", "random_return": 0.0, "expert_return": 50.0}
    return write_d4rl_hdf5(path, eps, meta)


def _tiny_model(state_dim=11, act_dim=3, context=4, seed=0):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(seed)
    cfg = DecisionTransformerConfig(state_dim=state_dim, act_dim=act_dim, hidden_size=16, n_layer=1, n_head=1,
                                    n_inner=32, max_ep_len=1000, action_tanh=True, n_positions=3 * context)
    cfg.state_mean = np.linspace(-1, 1, state_dim).tolist()
    cfg.state_std = np.linspace(0.5, 2, state_dim).tolist()
    return DecisionTransformerModel(cfg).eval()


def _tiny_args(data, out, steps=4, **kw):
    args = ["--data", str(data), "--env", "hopper", "--out", str(out), "--context", "4", "--hidden", "16",
            "--layers", "1", "--steps", str(steps), "--batch-size", "8", "--warmup", "2", "--log-every", "2",
            "--threads", "1"]
    for k, v in kw.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


# ----------------------------------------------------------------------------- preprocessing


def test_rtg_helpers():
    r = np.array([1.0, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(T.returns_to_go(r), [6.0, 5.0, 3.0])
    assert T.initial_rtg(3600) == 3.6
    assert T.update_rtg(3.6, 100.0) == pytest.approx(3.5)
    np.testing.assert_allclose(T.normalize_state(np.array([3.0, 1.0]), np.array([1.0, 1.0]), np.array([2.0, 0.5])),
                               [1.0, 0.0])


def test_window_inputs_left_pads():
    s, a = torch.arange(6.0).view(3, 2), torch.ones(3, 1)
    inp = T.window_inputs(s, a, torch.tensor([3.0, 2.0, 1.0]), torch.arange(3), context=5)
    assert inp["states"].shape == (1, 5, 2) and inp["returns_to_go"].shape == (1, 5, 1)
    assert inp["attention_mask"].tolist() == [[0, 0, 1, 1, 1]]
    assert inp["states"][0, :2].abs().sum() == 0 and torch.equal(inp["states"][0, 2:], s)
    assert inp["timesteps"].tolist() == [[0, 0, 0, 1, 2]]
    cut = T.window_inputs(s, a, torch.tensor([3.0, 2.0, 1.0]), torch.arange(3), context=2)
    assert torch.equal(cut["states"][0], s[1:]) and cut["attention_mask"].tolist() == [[1, 1]]


def test_sampler_matches_per_window_reference(tmp_path):
    data = load_d4rl_hdf5(_write_data(tmp_path / "d.hdf5"))
    k, scale = 6, 10.0
    smp = T.TrajectorySampler(data, k, scale, max_ep_len=1000, seed=0)
    rng = np.random.default_rng(0)  # same stream the sampler uses
    b = smp.sample(32)
    ep = rng.choice(len(data), size=32, p=data.lengths / data.lengths.sum())
    si = (rng.random(32) * data.lengths[ep]).astype(np.int64)
    for i in range(32):  # reference: slice the episode, normalise, left-pad
        e = data.episodes[ep[i]]
        s = (e.observations[si[i]: si[i] + k] - smp.mean) / smp.std
        n = len(s)
        rtg = np.cumsum(e.rewards[::-1])[::-1][si[i]: si[i] + k] / scale
        assert b["attention_mask"][i].tolist() == [0] * (k - n) + [1] * n
        np.testing.assert_allclose(b["states"][i, k - n:], s, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b["actions"][i, k - n:], e.actions[si[i]: si[i] + k])
        np.testing.assert_allclose(b["returns_to_go"][i, k - n:, 0], rtg, rtol=1e-5)
        assert b["timesteps"][i, k - n:].tolist() == list(range(si[i], si[i] + n))
        assert b["states"][i, : k - n].abs().sum() == 0


# ----------------------------------------------------------------------------- training and saving


def test_tiny_train_round_trip(tmp_path):
    from transformers import DecisionTransformerModel

    data_path = _write_data(tmp_path / "d.hdf5")
    summary = T.main(_tiny_args(data_path, tmp_path / "run"))
    out = tmp_path / "run"
    assert (out / "model.safetensors").is_file() and not (tmp_path / "run.partial").exists()
    m = DecisionTransformerModel.from_pretrained(out)
    c = m.config
    data = load_d4rl_hdf5(data_path)
    np.testing.assert_allclose(c.state_mean, data.state_mean, rtol=1e-6)
    np.testing.assert_allclose(c.state_std, data.state_std, rtol=1e-6)
    assert (c.return_scale, c.target_return, c.env_name, c.env_version, c.context_length) == (
        1000.0, 3600.0, "hopper", "v5", 4)
    assert (c.state_dim, c.act_dim, c.hidden_size, c.n_layer, c.max_ep_len, c.action_tanh) == (11, 3, 16, 1, 1000, True)
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(np.isfinite(float(r["loss"])) for r in rows)
    assert json.loads((out / "summary.json").read_text())["dataset_episodes"] == summary["dataset_episodes"] == 4
    # CPU evaluation of the saved folder records scores in summary.json and PROVENANCE.md
    res = T.main(["eval", str(out), "--episodes", "2", "--max-steps", "3", "--seed", "1"])
    assert len(res["returns"]) == 2 and np.isfinite(res["returns"]).all()
    np.testing.assert_allclose(res["return_mean"], np.mean(res["returns"]), atol=0.01)
    np.testing.assert_allclose(res["d4rl_score_mean"], 100 * (res["return_mean"] + 20.272305) / (3234.3 + 20.272305))
    np.testing.assert_allclose(res["dataset_score_mean"], res["return_mean"] * 2)  # 100 * (R - 0) / 50
    assert json.loads((out / "summary.json").read_text())["eval"]["returns"] == res["returns"]
    assert "D4RL-normalised score" in (out / "PROVENANCE.md").read_text()


def test_resume_continues_identically(tmp_path, monkeypatch):
    data_path = _write_data(tmp_path / "d.hdf5")
    T.main(_tiny_args(data_path, tmp_path / "full", steps=4))
    calls = {"n": 0}
    orig = T.TrajectorySampler.sample

    def crash_on_third(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, batch)

    monkeypatch.setattr(T.TrajectorySampler, "sample", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        T.main(_tiny_args(data_path, tmp_path / "cut", steps=4, ckpt_every=2))
    assert (tmp_path / "cut.partial" / "resume.pt").is_file() and not (tmp_path / "cut").exists()
    monkeypatch.setattr(T.TrajectorySampler, "sample", orig)
    T.main(_tiny_args(data_path, tmp_path / "cut", steps=4, ckpt_every=2))
    read = lambda p: [float(r["loss"]) for r in csv.DictReader(open(p / "loss.csv"))]  # noqa: E731
    np.testing.assert_allclose(read(tmp_path / "cut"), read(tmp_path / "full"), rtol=1e-5)


def test_train_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        T.main(_tiny_args(tmp_path / "missing.hdf5", tmp_path / "x"))
    data_path = _write_data(tmp_path / "d.hdf5")
    with pytest.raises(ValueError, match="does not match walker2d"):
        T.main(_tiny_args(data_path, tmp_path / "x") + ["--env", "walker2d"])
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- load_dt


def test_load_dt_edbeeching_format(tmp_path):
    m = _tiny_model()
    m.save_pretrained(tmp_path / "eb")
    cfg = json.loads((tmp_path / "eb" / "config.json").read_text())
    assert {"state_dim", "act_dim", "hidden_size", "max_ep_len", "action_tanh", "state_mean", "state_std"} <= set(cfg)
    loaded = T.load_dt(tmp_path / "eb", env_name="hopper")
    # transformers 5 drops `max_length` from configs, so edbeeching checkpoints get their K=20 default
    assert loaded.config.return_scale == 1000.0 and loaded.config.context_length == 20
    assert loaded.config.target_return == 3600.0 and not loaded.training
    with pytest.raises(ValueError, match="does not match walker2d"):
        T.load_dt(tmp_path / "eb", env_name="walker2d")
    with pytest.raises(FileNotFoundError):
        T.load_dt(tmp_path / "nothing-here")
    bare = _tiny_model()
    del bare.config.state_mean, bare.config.state_std
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no state_mean"):
        T.load_dt(tmp_path / "bare")
    ok = T.load_dt(tmp_path / "bare", state_mean=np.zeros(11), state_std=np.ones(11))
    assert ok.config.state_std == [1.0] * 11


# ----------------------------------------------------------------------------- rollout


def _hf_example_rollout(model, env, target_return, scale, context, seed, max_steps):
    """The HF blog evaluation loop (torch.cat history, get_action left padding), written independently."""
    mean = torch.tensor(model.config.state_mean)
    std = torch.tensor(model.config.state_std)
    state, _ = env.reset(seed=seed)
    states = torch.from_numpy(state).reshape(1, -1).float()
    actions = torch.zeros((0, model.config.act_dim))
    rtg = torch.tensor(target_return / scale).reshape(1, 1)
    timesteps = torch.tensor(0).reshape(1, 1)
    ret = 0.0
    for t in range(max_steps):
        actions = torch.cat([actions, torch.zeros((1, model.config.act_dim))], dim=0)
        s = ((states - mean) / std)[-context:].reshape(1, -1, model.config.state_dim)
        a = actions[-context:].reshape(1, -1, model.config.act_dim)
        r = rtg[:, -context:].reshape(1, -1, 1)
        ts = timesteps[:, -context:]
        pad = context - s.shape[1]
        mask = torch.cat([torch.zeros(pad), torch.ones(s.shape[1])]).long().reshape(1, -1)
        s = torch.cat([torch.zeros((1, pad, s.shape[2])), s], dim=1)
        a = torch.cat([torch.zeros((1, pad, a.shape[2])), a], dim=1)
        r = torch.cat([torch.zeros((1, pad, 1)), r], dim=1)
        ts = torch.cat([torch.zeros((1, pad), dtype=torch.long), ts], dim=1)
        with torch.no_grad():
            action = model(states=s, actions=a, rewards=torch.zeros(1, context, 1), returns_to_go=r, timesteps=ts,
                           attention_mask=mask).action_preds[0, -1]
        actions[-1] = action
        state, reward, term, trunc, _ = env.step(action.numpy())
        ret += reward
        states = torch.cat([states, torch.from_numpy(state).reshape(1, -1).float()], dim=0)
        rtg = torch.cat([rtg, (rtg[0, -1] - reward / scale).reshape(1, 1)], dim=1)
        timesteps = torch.cat([timesteps, torch.ones((1, 1), dtype=torch.long) * (t + 1)], dim=1)
        if term or trunc:
            break
    return ret


def test_sliding_window_rollout_matches_hf_example():
    from envs.mujoco import make_env

    model = _tiny_model(context=4)
    model.config.return_scale = 1000.0
    env = make_env("hopper")
    rets = T.rollout_sliding_window(model, env, target_return=3600.0, context=4, episodes=2, seed=5, max_steps=9)
    assert len(rets) == 2 and np.isfinite(rets).all() and rets[0] != rets[1]
    ref = [_hf_example_rollout(model, env, 3600.0, 1000.0, 4, seed, 9) for seed in (5, 6)]
    np.testing.assert_allclose(rets, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="does not match the model's state_dim=11"):
        T.rollout_sliding_window(model, make_env("walker2d"), target_return=1.0, episodes=1, max_steps=2)
