"""D4RL-style `medium` / `medium-replay` / `expert` hdf5 datasets from a `train/sac.py` run (no JAX needed).

    python -m envs.d4rl_datasets runs/sac/hopper-s0 --out artifacts/rl/data            # small (shipped) files
    python -m envs.d4rl_datasets runs/sac/hopper-s0 --out runs/d4rl-full --max-file-mb 0   # D4RL's full size

As D4RL (Fu et al. 2020, section 5): `expert` = rollouts of the best evaluated policy snapshot, `medium` =
rollouts of the earlier snapshot whose evaluation return is nearest `--medium-frac` (1/3) of the expert's,
`medium-replay` = the agent's replay buffer up to the medium snapshot (complete episodes, cut per env).
Rollouts sample the stochastic policy (numpy copy of the actor, `train.sac.np_sample`), 1000-step time limit,
env i seeded `--seed` + i. Files are written by `envs.d4rl.write_d4rl_hdf5` (float32, gzip 9 + shuffle) and
carry metadata (env id and version, policy snapshot step and its evaluation, returns, seeds, gymnasium/mujoco
versions, the command). The repository and everything it ships travel to the GPU machine under a 64 MiB cap,
so by default each file holds at most `--max-file-mb` (1.9) MB of float32 arrays: about 30 hopper or 20
halfcheetah/walker 1000-step episodes instead of D4RL's 1M steps (gzip shrinks MuJoCo floats by only ~10-20 %).
`--max-file-mb 0` writes D4RL's size (1M steps of expert/medium, the whole replay buffer up to medium).

GPU machine wheels (Python 3.12; jax, numpy, h5py, absl-py, etils, cloudpickle, typing-extensions are there):
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl-rl gymnasium==1.4.0 mujoco==3.3.7 farama-notifications==0.0.6 glfw==2.11.0
(7.3 MB; mujoco 3.3.7 rather than CI's 4.0.0, whose wheels are 9.8 MB; glfw only because gymnasium's MuJoCo
renderer module imports it.) Install there with
    pip install -q --no-index --no-deps --target "$D" .whl-rl/*.whl && export PYTHONPATH="$D"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from envs.d4rl import Episode, d4rl_normalized_score, write_d4rl_hdf5
from envs.mujoco import get_spec, gym_id, make_env

KINDS = ("medium", "medium-replay", "expert")
D4RL_STEPS = 1_000_000


def np_sample(actor: list[dict], obs: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """The train/sac.py policy in numpy (float32): a tanh-Gaussian sample with `rng`, or the mean action when
    rng is None. The trainer acts with it too (no device round trip per env step), so rollouts here need no JAX."""
    x = np.asarray(obs, np.float32)
    for layer in actor[:-1]:
        x = np.maximum(x @ layer["w"] + layer["b"], 0.0)
    mean, log_std = np.split(x @ actor[-1]["w"] + actor[-1]["b"], 2, axis=-1)
    if rng is None:
        return np.tanh(mean)
    eps = rng.standard_normal(mean.shape).astype(np.float32)
    return np.tanh(mean + np.exp(np.clip(log_std, -20.0, 2.0)) * eps)


def load_actor(path: str | os.PathLike) -> list[dict]:
    """Actor weights of a train/sac.py snapshot as [{"w", "b"}, ...] numpy arrays."""
    z = np.load(path)
    n = 1 + max(int(k.split("_")[0]) for k in z.files)
    return [{"w": z[f"{i}_w"], "b": z[f"{i}_b"]} for i in range(n)]


def read_log(run: str | os.PathLike) -> list[dict]:
    """The evaluation curve (`log.csv`) of a train/sac.py run as dicts of floats."""
    import csv

    with open(Path(run) / "log.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _versions() -> dict:
    import gymnasium
    import mujoco

    return {"gymnasium_version": gymnasium.__version__, "mujoco_version": mujoco.__version__}


def step_budget(env: str, max_file_mb: float) -> int:
    """Steps whose float32 arrays fit `max_file_mb` MB (0: D4RL's 1M)."""
    if max_file_mb <= 0:
        return D4RL_STEPS
    spec = get_spec(env)
    return max(1, int(max_file_mb * 1e6 / ((spec.obs_dim + spec.act_dim + 1) * 4 + 2)))


def pick_snapshots(log: list[dict], available: list[int], medium_frac: float) -> tuple[int, int]:
    """(expert_step, medium_step) among snapshot steps on disk: best evaluation, and the earlier snapshot
    whose evaluation is nearest medium_frac x the expert's."""
    ev = {int(r["step"]): r["eval_return"] for r in log}
    steps = [s for s in available if s in ev]
    if not steps:
        raise ValueError("no policy snapshot with a logged evaluation; train longer (see --eval-every)")
    expert = max(steps, key=lambda s: ev[s])
    earlier = [s for s in steps if s < expert] or [expert]
    target = medium_frac * ev[expert]
    medium = min(earlier, key=lambda s: abs(ev[s] - target))
    return expert, medium


def rollouts(actor: list[dict], env: str, version: str, max_steps: int, seed: int,
             deterministic: bool = False, max_ep_len: int = 1000) -> list[Episode]:
    """Whole episodes of the numpy policy until `max_steps` steps (at least one episode)."""
    rng = np.random.default_rng(seed)
    out, total, i = [], 0, 0
    while total < max_steps:
        e = make_env(env, version, max_episode_steps=max_ep_len)
        o, _ = e.reset(seed=seed + i)
        obs, act, rew, term, trunc = [], [], [], [], []
        done = False
        while not done:
            a = np_sample(actor, o[None].astype(np.float32), None if deterministic else rng)[0]
            o2, r, te, tr, _ = e.step(a)
            obs.append(o)
            act.append(a)
            rew.append(r)
            term.append(te)
            trunc.append(tr and not te)
            o, done = o2, te or tr
        e.close()
        i += 1
        if out and total + len(rew) > max_steps:
            break
        out.append(Episode(np.asarray(obs, np.float32), np.asarray(act, np.float32), np.asarray(rew, np.float32),
                           np.asarray(term, bool), np.asarray(trunc, bool)))
        total += len(rew)
    return out


def replay_episodes(run: Path, until_step: int) -> list[Episode]:
    """Complete episodes of the replay buffer among the first `until_step` transitions (slot = round*n + env)."""
    z = np.load(run / "ckpt" / "state.npz")
    n_envs = json.loads((run / "ckpt" / "meta.json").read_text())["config"]["n_envs"]
    n = min(until_step, len(z["b_rew"]))
    obs, act, rew, term, trunc = (z[k][:n] for k in ("b_obs", "b_act", "b_rew", "b_term", "b_trunc"))
    eps = []
    for env_i in range(n_envs):
        idx = np.arange(env_i, n, n_envs)
        ends = np.flatnonzero(term[idx] | trunc[idx])
        start = 0
        for end in ends.tolist():
            sl = idx[start: end + 1]
            eps.append((int(sl[0]), Episode(obs[sl], act[sl], rew[sl], term[sl].copy(), trunc[sl] & ~term[sl])))
            start = end + 1
    return [e for _, e in sorted(eps, key=lambda x: x[0])]  # in the order they started


def subsample(eps: list[Episode], max_steps: int, seed: int) -> list[Episode]:
    """Uniformly chosen whole episodes (kept in their original order) with at most `max_steps` steps."""
    if sum(len(e) for e in eps) <= max_steps:
        return eps
    keep, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(eps)).tolist():
        if total + len(eps[i]) <= max_steps:
            keep.append(i)
            total += len(eps[i])
    return [eps[i] for i in sorted(keep)]


def make_datasets(run: str | os.PathLike, out: str | os.PathLike, max_file_mb: float = 1.9, seed: int = 0,
                  medium_frac: float = 1 / 3, deterministic: bool = False, kinds: tuple[str, ...] = KINDS,
                  command: str = "") -> dict:
    """Write `<env>-<kind>-<version>.hdf5` for each kind into `out`, plus `<env>-<version>-summary.json`."""
    run, out = Path(run), Path(out)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run}: not a train/sac.py run folder (no config.json)")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown dataset kind(s) {bad}; valid: {', '.join(KINDS)}")
    if not 0 < medium_frac < 1:
        raise ValueError(f"--medium-frac must be in (0, 1), got {medium_frac}")
    cfg = json.loads((run / "config.json").read_text())
    spec, version = get_spec(cfg["env"]), cfg["version"]
    log = read_log(run)
    snaps = {int(f.stem.split("_")[1]): f for f in (run / "snapshots").glob("step_*.npz")}
    expert_step, medium_step = pick_snapshots(log, sorted(snaps), medium_frac)
    ev = {int(r["step"]): r for r in log}
    budget = step_budget(spec.name, max_file_mb)
    summary = {"env": spec.name, "env_id": gym_id(spec.name, version), "run": str(run), "train_config": cfg,
               "train_steps": int(max(ev)), "expert_step": expert_step, "medium_step": medium_step,
               "expert_eval": ev[expert_step], "medium_eval": ev[medium_step], "max_file_mb": max_file_mb,
               "step_budget": budget, "seed": seed, "deterministic": deterministic, "command": command,
               "datasets": {}} | _versions()
    expert_ret = None
    for kind in ("expert", "medium", "medium-replay"):
        t0 = time.time()
        if kind == "medium-replay":
            eps = subsample(replay_episodes(run, medium_step), budget, seed)
            if not eps:
                raise ValueError(f"{run}: no complete episode in the replay buffer before step {medium_step}; "
                                 "train longer")
            policy = f"{cfg['algo']} replay buffer, transitions 0..{medium_step - 1} (complete episodes" + (
                ", uniform subsample)" if max_file_mb > 0 else ")")
            policy_step, rollout_seed = medium_step, -1
        else:
            policy_step = expert_step if kind == "expert" else medium_step
            rollout_seed = seed + (100_000 if kind == "expert" else 200_000)
            eps = rollouts(load_actor(snaps[policy_step]), spec.name, version, budget, rollout_seed, deterministic)
            policy = f"{cfg['algo']} policy snapshot at step {policy_step}, " + (
                "mean actions" if deterministic else "sampled actions")
        rets = np.array([e.ret for e in eps])
        if kind == "expert":
            expert_ret = float(rets.mean())
        if kind not in kinds:
            continue
        meta = {"env_name": spec.name, "env_id": gym_id(spec.name, version), "env_version": version,
                "dataset": kind, "behaviour_policy": policy, "policy_step": policy_step,
                "policy_eval_return": ev[policy_step]["eval_return"], "train_seed": cfg["seed"],
                "rollout_seed": rollout_seed, "train_steps": summary["train_steps"],
                "return_mean": float(rets.mean()), "return_std": float(rets.std()),
                "random_return": spec.ref_min_score, "expert_return": expert_ret,
                "generator": "python -m envs.d4rl_datasets", "command": command} | _versions()
        path = write_d4rl_hdf5(out / f"{spec.name}-{kind}-{version}.hdf5", eps, meta)
        summary["datasets"][kind] = {
            "file": path.name, "episodes": len(eps), "steps": int(sum(len(e) for e in eps)),
            "return_mean": float(rets.mean()), "return_std": float(rets.std()), "return_min": float(rets.min()),
            "return_max": float(rets.max()), "d4rl_score": float(d4rl_normalized_score(spec.name, rets.mean())),
            "size_mb": round(path.stat().st_size / 1e6, 3), "policy_step": policy_step,
            "wall_s": round(time.time() - t0, 1)}
        d = summary["datasets"][kind]
        print(f"[d4rl_datasets] {path}: {d['episodes']} episodes, {d['steps']} steps, return {d['return_mean']:.1f} "
              f"(D4RL {d['d4rl_score']:.1f}), {d['size_mb']} MB", flush=True)
    path = out / f"{spec.name}-{version}-summary.json"
    path.with_suffix(".tmp").write_text(json.dumps(summary, indent=1))
    os.replace(path.with_suffix(".tmp"), path)
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m envs.d4rl_datasets", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a train/sac.py run folder, e.g. runs/sac/hopper-s0")
    p.add_argument("--out", required=True)
    p.add_argument("--max-file-mb", type=float, default=1.9, help="float32 MB per file; 0 = D4RL's full size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--medium-frac", type=float, default=1 / 3)
    p.add_argument("--deterministic", action="store_true", help="mean actions instead of sampled ones")
    p.add_argument("--kinds", nargs="+", default=list(KINDS))
    a = p.parse_args(args)
    return make_datasets(a.run, a.out, a.max_file_mb, a.seed, a.medium_frac, a.deterministic, tuple(a.kinds),
                         command="python -m envs.d4rl_datasets " + shlex.join(args))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
