"""train/dt.py: batches, tiny training + from_pretrained round trip, resume, D4RL and Minari data, CLI errors.

The DT runtime it uses (loading, statistics, sliding-window rollout) is tested in test_dt_adapter.py."""

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


def _tiny_args(data, out, steps=4, **kw):
    args = ["--data", str(data), "--env", "hopper", "--out", str(out), "--context", "4", "--hidden", "16",
            "--layers", "1", "--steps", str(steps), "--batch-size", "8", "--warmup", "2", "--log-every", "2",
            "--threads", "1"]
    for k, v in kw.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


# ----------------------------------------------------------------------------- preprocessing


def test_returns_to_go():
    r = np.array([1.0, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(T.returns_to_go(r), [6.0, 5.0, 3.0])


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


def test_position_only_variant_and_target_from_data(tmp_path):
    """--obs pos trains on the first 5 hopper entries (qpos[1:]) with their own statistics, the model is marked
    "pos" and evaluates in the wrapped env; --target-rule data-max conditions on the best episode return."""
    from transformers import DecisionTransformerModel

    data_path = _write_data(tmp_path / "d.hdf5")
    data = load_d4rl_hdf5(data_path)
    summary = T.main(_tiny_args(data_path, tmp_path / "pos", obs="pos", target_rule="data-max"))
    c = DecisionTransformerModel.from_pretrained(tmp_path / "pos").config
    assert (c.state_dim, c.obs_variant) == (5, "pos")
    obs = np.concatenate([e.observations for e in data.episodes])[:, :5].astype(np.float64)
    np.testing.assert_allclose(c.state_mean, obs.mean(0), rtol=1e-5, atol=1e-6)
    assert c.target_return == summary["target_return"] == round(float(data.returns.max()), -1)
    assert c.target_return != 3600.0
    res = T.main(["eval", str(tmp_path / "pos"), "--episodes", "2", "--max-steps", "3"])
    assert res["obs_variant"] == "pos" and len(res["returns"]) == 2
    assert "pos observations" in (tmp_path / "pos" / "PROVENANCE.md").read_text()
    with pytest.raises(SystemExit):  # argparse choices: one line, exit 2
        T.main(_tiny_args(data_path, tmp_path / "bad", obs="velocity"))


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


# ----------------------------------------------------------------------------- Minari data


def _write_minari(root, monkeypatch, dataset_id="mujoco/hopper/tiny-v0"):
    """A two-episode hopper dataset in Minari's own on-disk layout under `root` (written by minari itself)."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    rng = np.random.default_rng(0)
    bufs = [EpisodeBuffer(id=i, observations=list(rng.normal(size=(n + 1, 11))),
                          actions=list(rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)),
                          rewards=list(np.full(n, 2.0)), terminations=[False] * (n - 1) + [True],
                          truncations=[False] * n)
            for i, n in enumerate([6, 9])]
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers(dataset_id, bufs, env=gym.make("Hopper-v5"), ref_min_score=0.0,
                                           ref_max_score=20.0, algorithm_name="test")
    monkeypatch.delenv("MINARI_DATASETS_PATH")
    return bufs


def test_train_dt_from_local_minari_dataset(tmp_path, monkeypatch):
    from transformers import DecisionTransformerModel

    from transfer.cli import main

    root = tmp_path / "minari"
    bufs = _write_minari(root, monkeypatch)
    obs = np.concatenate([np.asarray(b.observations[:-1], np.float64) for b in bufs])
    tiny = ["--context", "4", "--hidden", "16", "--layers", "1", "--steps", "2", "--batch-size", "4", "--warmup", "1",
            "--log-every", "1", "--threads", "1"]
    # by id under --minari-root, no --env: the environment comes from the dataset
    summary = T.main(["--data", "mujoco/hopper/tiny-v0", "--minari-root", str(root), "--out", str(tmp_path / "a")]
                     + tiny)
    assert summary["env"] == "hopper" and summary["dataset_episodes"] == 2 and summary["dataset_steps"] == 15
    assert summary["dataset_metadata"]["expert_return"] == 20.0
    cfg = DecisionTransformerModel.from_pretrained(tmp_path / "a").config
    assert cfg.env_name == "hopper" and (cfg.state_dim, cfg.act_dim) == (11, 3)
    np.testing.assert_allclose(cfg.state_mean, obs.mean(0), rtol=1e-5, atol=1e-6)
    # by the dataset folder's path, through the CLI
    assert main(["train", "dt", "--data", str(root / "mujoco" / "hopper" / "tiny-v0"), "--out", str(tmp_path / "b")]
                + tiny) == 0
    assert DecisionTransformerModel.from_pretrained(tmp_path / "b").config.state_mean == cfg.state_mean


# ----------------------------------------------------------------------------- CLI errors


def test_train_dt_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from transfer.cli import main

    data = _write_data(tmp_path / "d.hdf5")
    (tmp_path / "cut.hdf5").write_bytes(data.read_bytes()[:300])  # a truncated download
    _write_minari(tmp_path / "minari", monkeypatch)
    out = tmp_path / "out"
    cases = {
        "D4RL dataset not found": ["--data", str(tmp_path / "missing.hdf5")],
        "cannot read as HDF5": ["--data", str(tmp_path / "cut.hdf5")],
        "does not match walker2d": ["--data", str(data), "--env", "walker2d"],
        "unknown environment 'ant'": ["--data", str(data), "--env", "ant"],
        "Minari dataset 'mujoco/hopper/medium-v0' not found": ["--data", "mujoco/hopper/medium-v0", "--minari-root",
                                                               str(tmp_path / "minari")],
        "Minari dataset .* does not match walker2d": ["--data", "mujoco/hopper/tiny-v0", "--minari-root",
                                                      str(tmp_path / "minari"), "--env", "walker2d"],
        "--steps must be >= 1": ["--data", str(data), "--steps", "0"],
        "--hidden 10 must be divisible by --heads 3": ["--data", str(data), "--hidden", "10", "--heads", "3"],
    }
    if not torch.cuda.is_available():
        cases["CUDA is not available"] = ["--data", str(data), "--device", "cuda"]
    for message, args in cases.items():
        rc = main(["train", "dt", "--out", str(out)] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (message, err)
        assert __import__("re").search(message, err[0]), (message, err[0])
        assert not out.exists() and not (tmp_path / "out.partial").exists(), message
    rc = main(["train", "dt", "eval", str(tmp_path / "no-model"), "--episodes", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "no-model" in err[0]


def test_half_precision_agents_ship_what_was_evaluated(tmp_path):
    """--save-dtype float16: the file holds float16 tensors (half the bytes), they are the float32 run's weights
    rounded (same seed: training is identical up to the end), load_dt reads them back as float32, and the final
    evaluation in summary.json is that of the shipped weights (a fresh evaluation of the folder repeats it)."""
    from safetensors import safe_open

    from adapters.decision_transformer import load_dt

    data_path = _write_data(tmp_path / "d.hdf5")
    T.main(_tiny_args(data_path, tmp_path / "fp32"))
    summary = T.main(_tiny_args(data_path, tmp_path / "fp16", save_dtype="float16", eval_episodes=2,
                                eval_max_steps=5))
    with safe_open(tmp_path / "fp16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "fp16")]
    assert sizes[1] < 0.55 * sizes[0]
    full, half = load_dt(tmp_path / "fp32"), load_dt(tmp_path / "fp16")
    assert {p.dtype for p in half.parameters()} == {torch.float32}
    for (name, a), (_, b) in zip(full.named_parameters(), half.named_parameters(), strict=True):
        assert torch.equal(a.half().float(), b), name
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), half.parameters()))  # rounding happened
    res = T.main(["eval", str(tmp_path / "fp16"), "--episodes", "2", "--max-steps", "5", "--seed", "100"])
    assert res["returns"] == summary["eval"]["returns"]
