"""Generate small D4RL-style datasets (medium / medium-replay / expert) with SB3 PPO behaviour policies.

    python -m envs.generate --env hopper --out artifacts/rl/data --timesteps 250000 --seed 0

PPO with vectorised envs is the only trainer fast enough on 2 CPU cores (SAC runs ~21 steps/s).
Training runs in chunks; each chunk saves a checkpoint (policy + VecNormalize stats), the completed
training episodes of that chunk (raw observations, for medium-replay) and a deterministic evaluation,
so a killed run resumes from its last chunk. Then:
  expert        = rollouts of the best-evaluated checkpoint,
  medium        = rollouts of the earlier checkpoint whose return is closest to `--medium-frac` x best,
  medium-replay = training episodes collected up to that medium checkpoint (uniform episode subsample).
Rollouts sample the stochastic policy (as D4RL did) and are capped at `--max-file-mb` of float32 data.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

from envs.d4rl import Episode, write_d4rl_hdf5
from envs.mujoco import check_version, get_spec, gym_id, make_env

KINDS = ("medium", "medium-replay", "expert")


@dataclass
class GenConfig:
    env: str = "hopper"
    version: str = "v5"
    out: str = "artifacts/rl/data"
    work: str = "runs/generate"
    seed: int = 0
    timesteps: int = 250_000
    chunk: int = 25_000  # steps between checkpoints
    n_envs: int = 8
    eval_episodes: int = 3
    random_episodes: int = 20
    medium_frac: float = 0.4  # medium checkpoint target: this fraction of the best return (above random)
    max_file_mb: float = 1.9  # float32 budget per dataset file (gzip barely shrinks it)
    threads: int = 1
    kinds: tuple[str, ...] = KINDS


class RecordEpisodes(gym.Wrapper):
    """Appends each finished episode (raw obs, clipped actions) to a shared list."""

    def __init__(self, env, sink: list[Episode]):
        super().__init__(env)
        self.sink, self._buf, self._obs = sink, [], None

    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        self._buf, self._obs = [], obs
        return obs, info

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        self._buf.append((self._obs, np.asarray(action, np.float32), r, term, trunc))
        self._obs = obs
        if term or trunc:
            o, a, rr, te, tr = map(np.array, zip(*self._buf))
            self.sink.append(Episode(o.astype(np.float32), a, rr.astype(np.float32), te, tr & ~te))
            self._buf = []
        return obs, r, term, trunc, info


def _vec_env(cfg: GenConfig, n: int, sink: list[Episode], seed: int, vecnorm_path: Path | None = None):
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    fns = [lambda i=i: RecordEpisodes(make_env(cfg.env, cfg.version), sink) for i in range(n)]
    venv = DummyVecEnv(fns)
    venv.seed(seed)
    if vecnorm_path is None:
        return VecNormalize(venv, norm_obs=True, norm_reward=True, gamma=0.99)
    venv = VecNormalize.load(str(vecnorm_path), venv)
    venv.training, venv.norm_reward = False, False
    return venv


def rollouts(cfg: GenConfig, model, vecnorm_path: Path, max_steps: int, max_episodes: int, seed: int,
             deterministic: bool) -> list[Episode]:
    """Run a frozen policy until `max_steps` finished steps or `max_episodes` episodes."""
    sink: list[Episode] = []
    venv = _vec_env(cfg, min(cfg.n_envs, max_episodes), sink, seed, vecnorm_path)
    obs = venv.reset()
    while sum(len(e) for e in sink) < max_steps and len(sink) < max_episodes:
        action, _ = model.predict(obs, deterministic=deterministic)
        obs, _, _, _ = venv.step(action)
    venv.close()
    out, total = [], 0
    for e in sink[:max_episodes]:
        if total + len(e) > max_steps and out:
            break
        out.append(e)
        total += len(e)
    return out


def random_return(cfg: GenConfig) -> float:
    env = make_env(cfg.env, cfg.version, seed=cfg.seed + 10_000)
    rets = []
    for _ in range(cfg.random_episodes):
        env.reset()
        done, ret = False, 0.0
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            ret, done = ret + float(r), term or trunc
        rets.append(ret)
    env.close()
    return float(np.mean(rets))


def step_budget(cfg: GenConfig) -> int:
    spec = get_spec(cfg.env)
    return int(cfg.max_file_mb * 1e6 / ((spec.obs_dim + spec.act_dim + 1) * 4 + 2))


def _log(msg: str) -> None:
    print(f"[generate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(cfg: GenConfig, work: Path) -> dict:
    """Train PPO in chunks with checkpoints; resumes from the newest checkpoint in `work`."""
    from stable_baselines3 import PPO

    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"chunks": [], "wall_s": 0.0}
    done_steps = state["chunks"][-1]["steps"] if state["chunks"] else 0
    sink: list[Episode] = []
    venv = _vec_env(cfg, cfg.n_envs, sink, cfg.seed + done_steps)
    if done_steps:
        from stable_baselines3.common.vec_env import VecNormalize

        venv = VecNormalize.load(str(work / f"vecnorm_{done_steps}.pkl"), venv.venv)
        model = PPO.load(work / f"ppo_{done_steps}.zip", env=venv, device="cpu")
        _log(f"{cfg.env}: resumed at {done_steps} steps")
    else:
        model = PPO("MlpPolicy", venv, n_steps=256, batch_size=64, n_epochs=10, learning_rate=3e-4,
                    gamma=0.99, gae_lambda=0.95, clip_range=0.2, seed=cfg.seed, device="cpu", verbose=0)
    while done_steps < cfg.timesteps:
        t0 = time.time()
        model.learn(cfg.chunk, reset_num_timesteps=False, progress_bar=False)
        done_steps = int(model.num_timesteps)
        model.save(work / f"ppo_{done_steps}.zip")
        venv.save(str(work / f"vecnorm_{done_steps}.pkl"))
        with open(work / f"replay_{done_steps}.pkl", "wb") as f:
            pickle.dump(sink, f)
        sink.clear()
        ev = rollouts(cfg, model, work / f"vecnorm_{done_steps}.pkl", 10**9, cfg.eval_episodes,
                      cfg.seed + 777, deterministic=True)
        ret = float(np.mean([e.ret for e in ev]))
        state["chunks"].append({"steps": done_steps, "eval_return": ret})
        state["wall_s"] += time.time() - t0
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)
        _log(f"{cfg.env}: {done_steps}/{cfg.timesteps} steps, eval return {ret:.1f}, "
             f"{(time.time() - t0):.0f}s/chunk")
    venv.close()
    return state


def pick_checkpoints(chunks: list[dict], rand_ret: float, medium_frac: float) -> tuple[int, int]:
    """(expert_steps, medium_steps): best checkpoint, and the earlier one nearest medium_frac of it."""
    rets = np.array([c["eval_return"] for c in chunks])
    best = int(np.argmax(rets))
    target = rand_ret + medium_frac * (rets[best] - rand_ret)
    earlier = np.arange(max(best, 1))
    med = int(earlier[np.argmin(np.abs(rets[earlier] - target))])
    return chunks[best]["steps"], chunks[med]["steps"]


def generate(cfg: GenConfig) -> dict:
    import torch
    from stable_baselines3 import PPO

    check_version(cfg.version)
    spec = get_spec(cfg.env)
    bad = [k for k in cfg.kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown dataset kind(s) {bad}; valid: {', '.join(KINDS)}")
    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work) / f"{spec.name}-{cfg.version}-s{cfg.seed}"
    t0 = time.time()
    state = train(cfg, work)
    rand_ret = random_return(cfg)
    expert_steps, medium_steps = pick_checkpoints(state["chunks"], rand_ret, cfg.medium_frac)
    budget = step_budget(cfg)
    summary = {"env": spec.name, "env_id": gym_id(spec.name, cfg.version), "seed": cfg.seed,
               "timesteps_requested": cfg.timesteps, "host": socket.gethostname(),
               "train_steps": state["chunks"][-1]["steps"], "train_wall_s": round(state["wall_s"], 1),
               "random_return": rand_ret, "expert_checkpoint": expert_steps,
               "medium_checkpoint": medium_steps, "checkpoints": state["chunks"], "datasets": {}}
    expert_eps = None
    for kind in ("expert", "medium", "medium-replay"):
        if kind not in cfg.kinds and not (kind == "expert"):
            continue
        if kind == "medium-replay":
            eps = []
            for c in state["chunks"]:
                if c["steps"] > medium_steps:
                    break
                with open(work / f"replay_{c['steps']}.pkl", "rb") as f:
                    eps += pickle.load(f)
            rng = np.random.default_rng(cfg.seed)
            order, keep, total = rng.permutation(len(eps)), [], 0
            for i in order.tolist():
                if total + len(eps[i]) <= budget:
                    keep.append(i)
                    total += len(eps[i])
            eps = [eps[i] for i in sorted(keep)]
            policy = f"PPO training episodes up to {medium_steps} steps (uniform subsample)"
        else:
            steps = expert_steps if kind == "expert" else medium_steps
            model = PPO.load(work / f"ppo_{steps}.zip", device="cpu")
            eps = rollouts(cfg, model, work / f"vecnorm_{steps}.pkl", budget, 10**6,
                           cfg.seed + (1 if kind == "expert" else 2) * 1000, deterministic=False)
            policy = f"SB3 PPO checkpoint at {steps} steps, stochastic actions"
        if kind == "expert":
            expert_eps = eps
        expert_ret = float(np.mean([e.ret for e in expert_eps]))
        rets = np.array([e.ret for e in eps])
        meta = {"env_name": spec.name, "env_id": gym_id(spec.name, cfg.version), "env_version": cfg.version,
                "dataset": kind, "seed": cfg.seed, "behaviour_policy": policy,
                "train_steps": summary["train_steps"], "random_return": rand_ret, "expert_return": expert_ret,
                "generator": "python -m envs.generate"}
        if kind not in cfg.kinds:
            continue
        path = write_d4rl_hdf5(Path(cfg.out) / f"{spec.name}-{kind}-{cfg.version}.hdf5", eps, meta)
        summary["datasets"][kind] = {
            "file": str(path), "episodes": len(eps), "steps": int(sum(len(e) for e in eps)),
            "return_mean": float(rets.mean()), "return_std": float(rets.std()),
            "return_min": float(rets.min()), "return_max": float(rets.max()),
            "expert_return": expert_ret, "size_mb": round(path.stat().st_size / 1e6, 3)}
        _log(f"{spec.name}: wrote {path} ({len(eps)} episodes, return {rets.mean():.1f} +- {rets.std():.1f})")
    summary["total_wall_s"] = round(time.time() - t0, 1)  # this invocation (a resumed run trains less)
    out = Path(cfg.out) / f"{spec.name}-{cfg.version}-summary.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out)
    render_provenance(Path(cfg.out))
    return summary


def render_provenance(out: Path) -> Path:
    """PROVENANCE.md for every `*-summary.json` in `out` (one section per env)."""
    lines = ["# Generated offline-RL datasets (D4RL hdf5 format)", "",
             "Written by `envs/generate.py` from the `*-summary.json` files next to this page (all numbers are "
             "from those runs). Behaviour policies: stable-baselines3 PPO (MlpPolicy 64x64, 8 DummyVecEnv envs, "
             "n_steps 256, batch 64, 10 epochs, lr 3e-4, VecNormalize obs+reward), trained in chunks with a "
             "deterministic 3-episode evaluation after each chunk. expert = rollouts of the best checkpoint, "
             "medium = rollouts of the earlier checkpoint closest to random + 0.4 x (best - random), both with "
             "stochastic actions; medium-replay = a uniform episode subsample of PPO's own training episodes up "
             "to the medium checkpoint. Files are capped at about 1.9 MB of float32 data (gzip level 9, "
             "shuffle), so they hold fewer episodes than D4RL's 1M-step datasets. `random_return` / "
             "`expert_return` in each file's `metadata` group give its own normalisation: random = mean of 20 "
             "uniform-random episodes, expert = mean return of the expert file.", ""]
    for f in sorted(out.glob("*-summary.json")):
        s = json.loads(f.read_text())
        lines += [f"## {s['env_id']}", "",
                  f"- command: `python -m envs.generate --env {s['env']} --out {out} --timesteps "
                  f"{s.get('timesteps_requested', s['train_steps'])} --seed {s['seed']}` (CPU, 1 torch thread)",
                  f"- PPO steps {s['train_steps']}, training wall {s['train_wall_s']} s, wall of the whole command "
                  f"{s['total_wall_s']} s (2 CPU cores shared with other jobs)",
                  f"- random-policy return {s['random_return']:.1f}; expert checkpoint {s['expert_checkpoint']} "
                  f"steps, medium checkpoint {s['medium_checkpoint']} steps",
                  "- checkpoint evaluations (steps: deterministic return): "
                  + ", ".join(f"{c['steps']}: {c['eval_return']:.0f}" for c in s["checkpoints"]), "",
                  "| file | episodes | steps | return mean +- std [min, max] | own normalised | D4RL normalised | MB |",
                  "|---|---|---|---|---|---|---|"]
        for d in s["datasets"].values():
            own = 100 * (d["return_mean"] - s["random_return"]) / (d["expert_return"] - s["random_return"])
            spec = get_spec(s["env"])
            d4 = 100 * (d["return_mean"] - spec.ref_min_score) / (spec.ref_max_score - spec.ref_min_score)
            lines.append(f"| {Path(d['file']).name} | {d['episodes']} | {d['steps']} | {d['return_mean']:.1f} +- "
                         f"{d['return_std']:.1f} [{d['return_min']:.0f}, {d['return_max']:.0f}] | {own:.1f} | "
                         f"{d4:.1f} | {d['size_mb']} |")
        lines.append("")
    path = out / "PROVENANCE.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = GenConfig()
    p.add_argument("--env", required=True)
    p.add_argument("--version", default=d.version)
    p.add_argument("--out", default=d.out)
    p.add_argument("--work", default=d.work, help="checkpoint folder (resumable)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timesteps", type=int, default=d.timesteps)
    p.add_argument("--chunk", type=int, default=d.chunk)
    p.add_argument("--n-envs", type=int, default=d.n_envs)
    p.add_argument("--medium-frac", type=float, default=d.medium_frac)
    p.add_argument("--max-file-mb", type=float, default=d.max_file_mb)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--kinds", nargs="+", default=list(KINDS))
    a = p.parse_args(argv)
    cfg = GenConfig(env=a.env, version=a.version, out=a.out, work=a.work, seed=a.seed, timesteps=a.timesteps,
                    chunk=a.chunk, n_envs=a.n_envs, medium_frac=a.medium_frac, max_file_mb=a.max_file_mb,
                    threads=a.threads, kinds=tuple(a.kinds))
    get_spec(cfg.env)
    return generate(cfg)


if __name__ == "__main__":
    main()
