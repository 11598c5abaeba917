"""train/sac.py + envs/d4rl_datasets.py on CPU with tiny networks: a resumed run is bit-exact, and the three
D4RL files it yields load with envs.d4rl and train a DT."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("jax", reason="train/sac.py needs jax (pip install -e '.[rl-train]')")
pytest.importorskip("mujoco", reason="MuJoCo envs need gymnasium[mujoco] (pip install -e '.[rl]')")

from envs import d4rl_datasets as D  # noqa: E402
from envs.d4rl import load_d4rl_hdf5  # noqa: E402
from train import sac  # noqa: E402

TINY = sac.SACConfig(env="hopper", steps=256, learning_starts=64, batch_size=16, hidden=8, n_critics=2,
                     n_quantiles=3, drop_per_net=1, eval_every=128, eval_episodes=1, n_envs=2, train_freq=1,
                     threads=1)


def _curve(run):
    with open(run / "log.csv") as f:  # wall time and speed differ between runs; everything else must not
        return [{k: v for k, v in r.items() if k not in ("wall_s", "sps")} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sac")
    whole = replace(TINY, out=str(tmp / "whole"))
    sac.train(whole)
    split = replace(TINY, out=str(tmp / "split"), stop_at=100)
    first = sac.train(split)
    second = sac.train(replace(split, stop_at=0))
    return whole.run_dir(), split.run_dir(), first, second


def test_resume_is_bit_exact(runs):
    whole, split, first, second = runs
    assert first["step"] == 100 and second["step"] == TINY.steps  # the run really was interrupted
    a, b = np.load(whole / "ckpt" / "state.npz"), np.load(split / "ckpt" / "state.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:  # params, targets, Adam moments, PRNG key and the replay buffer
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ma, mb = (json.loads((r / "ckpt" / "meta.json").read_text()) for r in (whole, split))
    for k in ("step", "rng", "obs", "envs", "ep_ret", "keep", "best_step"):
        assert ma[k] == mb[k], k
    curve = _curve(whole)
    assert curve == _curve(split) and len(curve) == 2
    assert float(curve[-1]["critic_loss"]) > 0  # the learner ran (losses are logged after learning_starts)
    # next actions after the resume point match too
    obs = np.asarray(ma["obs"], np.float32)
    actor = D.load_actor(sorted((whole / "snapshots").glob("step_*.npz"))[-1])
    np.testing.assert_array_equal(D.np_sample(actor, obs, np.random.default_rng(1)),
                                  D.np_sample(D.load_actor(sorted((split / "snapshots").glob("step_*.npz"))[-1]),
                                              obs, np.random.default_rng(1)))


def test_buffer_round_trip(runs):
    whole = runs[0]
    z = np.load(whole / "ckpt" / "state.npz")
    meta = json.loads((whole / "ckpt" / "meta.json").read_text())
    buf = sac.Buffer.restore(300, {k: z[k] for k in z.files if k.startswith("b_")}, TINY.n_envs,
                             np.asarray(meta["obs"], np.float32))
    assert buf.size == TINY.steps
    np.testing.assert_array_equal(buf.compact()["b_end_obs"], z["b_end_obs"])
    # next_obs rebuilt from the following round equals the env's obs there (not an episode end)
    ends = buf.term[: buf.size] | buf.trunc[: buf.size]
    i = int(np.flatnonzero(~ends[: buf.size - TINY.n_envs])[0])
    np.testing.assert_array_equal(buf.next_obs[i], buf.obs[i + TINY.n_envs])


def test_datasets_load_and_train_dt(runs, tmp_path):
    from train import dt as T

    whole = runs[0]
    summary = D.make_datasets(whole, tmp_path / "data", max_file_mb=0.03, seed=3)
    spec_steps = D.step_budget("hopper", 0.03)
    assert summary["medium_step"] < summary["expert_step"] or summary["medium_step"] == summary["expert_step"]
    for kind in D.KINDS:
        data = load_d4rl_hdf5(tmp_path / "data" / f"hopper-{kind}-v5.hdf5")
        assert data.env_name == "hopper" and data.metadata["dataset"] == kind
        assert 0 < data.num_steps <= max(spec_steps, data.lengths.max())
        assert data.metadata["env_version"] == "v5" and data.metadata["train_seed"] == 0
        assert all(e.terminals[-1] or e.timeouts[-1] for e in data.episodes)
        np.testing.assert_allclose(data.returns.mean(), summary["datasets"][kind]["return_mean"], rtol=1e-5)
    # medium-replay is the buffer itself: its first episode is env 0's first episode
    z = np.load(whole / "ckpt" / "state.npz")
    mr = load_d4rl_hdf5(tmp_path / "data" / "hopper-medium-replay-v5.hdf5").episodes[0]
    np.testing.assert_array_equal(mr.observations, z["b_obs"][0: 2 * len(mr): 2])
    assert mr.terminals[-1] == z["b_term"][2 * (len(mr) - 1)]
    out = T.main(["--data", str(tmp_path / "data" / "hopper-medium-v5.hdf5"), "--out", str(tmp_path / "dt"),
                  "--context", "4", "--hidden", "16", "--layers", "1", "--steps", "2", "--batch-size", "4",
                  "--warmup", "1", "--log-every", "1", "--threads", "1"])
    assert out["steps_done"] == 2 and out["dataset_metadata"]["dataset"] == "medium"


def test_cli_errors():
    with pytest.raises(ValueError, match="--algo"):
        sac.validate(replace(TINY, algo="ppo"))
    with pytest.raises(ValueError, match="--drop-per-net"):
        sac.validate(replace(TINY, drop_per_net=3))
    with pytest.raises(ValueError, match="unknown environment"):
        sac.parse_args(["--env", "pong"])
