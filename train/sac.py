"""Train SAC-family agents (TQC by default, SAC) in JAX on gymnasium v5 MuJoCo, resumable across short calls.

    python -m train.sac --env hopper halfcheetah walker2d --out runs/sac --max-minutes 9   # side by side
    python -m train.sac --env hopper --out runs/sac --steps 1000000 --max-minutes 9        # one env

Why TQC (Kuznetsov et al., ICML 2020, "Controlling Overestimation Bias with Truncated Mixture of Continuous
Distributional Quantile Critics"): at 1M steps the RL Zoo's TQC agents (DLR-RM/rl-baselines3-zoo benchmark.md,
deterministic evaluation) score 3754 on Hopper-v3, 12090 on HalfCheetah-v3 and 4381 on Walker2d-v3, i.e. about
116 / 100 / 95 D4RL-normalised, while its SAC agents score lower on HalfCheetah and Walker at the same budget;
on HalfCheetah (the hardest of the three to reach 80 = 9652) SAC typically needs the whole 1M steps. Settings
are the zoo's/paper's: batch 256, lr 3e-4, gamma 0.99, tau 0.005, 2x256 MLPs, auto entropy (target -act_dim),
10k random warm-up steps, UTD 1, 5 critics x 25 quantiles, top quantiles dropped per net 5 / 0 / 2 for
hopper / halfcheetah / walker2d (TQC paper, Table 6). The sbx-rl package (JAX SAC/TQC/CrossQ) was the first
choice, but it needs tfp-nightly (+dm-tree, gast) and flax on top of SB3, and SB3's learn() loop keeps the
env's last observation and MuJoCo state in memory only, so a bit-exact resume would need patching it anyway;
this file is a ~small plain-JAX implementation (no flax/optax: hand-written MLP and Adam), so the GPU machine
needs only gymnasium + mujoco wheels and CI needs only `jax` (CPU wheel, measured 12 s to install).

Throughput: each iteration steps `--n-envs` envs `--train-freq` times, acting in numpy on the host with the
actor fetched once per iteration (`envs.d4rl_datasets.np_sample`; no device round trip per env step), then
runs n_envs x train_freq x utd gradient steps in ONE jitted, unrolled `lax.scan` (sbx's trick), so launch
overhead is paid once per iteration. Several envs train side by side as one subprocess per env.
Measured on the H200 machine (first version, which still acted through a jitted call per env step and a
rolled scan; three TQC processes side by side, --train-freq 8): about 520 env steps/s per env while learning
(10k steps in ~19 s), 30-45 s of start-up (jit compile, first eval); at 40k steps hopper 305, halfcheetah
2661, walker2d 241. At that speed 1M steps take ~32 min per env: raise --train-freq (16-32) and time it.

Resume (bit-exact): `<out>/<env>-s<seed>/ckpt/` holds `meta.json` (step counters, numpy RNG state, per-env
MuJoCo integration state via mj_getState, env RNG states, TimeLimit counters) and `state.npz` (all JAX
leaves: params, targets, Adam moments, PRNG key; the replay buffer without the redundant next-observations).
Stopping at `--max-minutes` or `--stop-at` finishes the current iteration, then checkpoints, so a resumed run
takes exactly the actions and losses an uninterrupted one would (tests/test_sac_data.py checks this).
`log.csv` holds the evaluation curve (deterministic policy, `--eval-episodes` fixed-seed 1000-step episodes,
D4RL-normalised score); `snapshots/step_<N>.npz` hold actor weights (numpy) for `envs/d4rl_datasets.py`:
every snapshot scoring <= 60 D4RL (medium candidates), plus the best and the latest.

Moving checkpoints through the device tool: the run folder stays in the ignored `runs/` on the device machine
between calls while it is warm (call again within its 30 s idle window). To take it off the machine, pack
it into $OUT in parts of at most 15 MiB (the tool returns at most 8 files, 16 MiB each, 64 MiB in all):
    tar cf - -C runs sac | gzip -1 | split -b 15m -d - "$OUT/sac.tgz."
and restore with `cat sac.tgz.* | tar xzf - -C runs`. A 1M-step buffer is about 60 B (hopper) to 96 B
(cheetah/walker) a step before compression, so only a run of about 300k steps per env, or one env of ~1M
steps, fits in 64 MiB; and the repository that travels to the machine is already ~58 MB of its 64 MiB, so a
checkpoint that large cannot be carried back in. Plan whole trainings inside one warm lease.

On the GPU machine (Python 3.12, jax there, no internet), install the wheels of `.whl-rl/` (see
envs/d4rl_datasets.py for how they were downloaded) without touching its jax/numpy:
    pip install -q --no-index --no-deps --target "$D" .whl-rl/*.whl && export PYTHONPATH="$D"
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from envs.d4rl import d4rl_normalized_score
from envs.d4rl_datasets import np_sample
from envs.mujoco import check_version, get_spec, make_env

TQC_DROP = {"hopper": 5, "halfcheetah": 0, "walker2d": 2}  # top quantiles dropped per net (TQC paper)
MEDIUM_KEEP_SCORE = 60.0  # snapshots scoring at most this (D4RL) are kept as medium candidates
LOG_FIELDS = ["step", "wall_s", "eval_return", "eval_std", "d4rl_score", "alpha", "critic_loss", "actor_loss", "sps"]


@dataclass(frozen=True)
class SACConfig:
    env: str = "hopper"
    version: str = "v5"
    out: str = "runs/sac"
    algo: str = "tqc"  # tqc | sac
    seed: int = 0
    steps: int = 1_000_000  # total env steps (all envs of this run)
    learning_starts: int = 10_000
    n_envs: int = 1
    train_freq: int = 8  # rounds of n_envs env steps between gradient phases
    utd: int = 1  # gradient steps per env step
    unroll: int = 0  # gradient steps unrolled per scan iteration (0: all of them; fewer compile faster)
    batch_size: int = 256
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    hidden: int = 256
    layers: int = 2
    n_critics: int = 0  # 0: 5 for tqc, 2 for sac
    n_quantiles: int = 25
    drop_per_net: int = -1  # -1: TQC_DROP[env]
    eval_every: int = 10_000
    eval_episodes: int = 5
    max_minutes: float = 0.0  # >0: stop (and checkpoint) once this call has trained this long
    stop_at: int = 0  # >0: stop (and checkpoint) once this many steps are done (tests; planned splits)
    threads: int = 0  # >0: single-threaded XLA CPU ops (side-by-side CPU runs); set before jax is imported

    @property
    def critics(self) -> int:
        return self.n_critics or (5 if self.algo == "tqc" else 2)

    @property
    def quantiles(self) -> int:
        return self.n_quantiles if self.algo == "tqc" else 1

    @property
    def drop(self) -> int:
        return TQC_DROP[get_spec(self.env).name] if self.drop_per_net < 0 else self.drop_per_net

    def run_dir(self) -> Path:
        return Path(self.out) / f"{get_spec(self.env).name}-s{self.seed}"


def validate(cfg: SACConfig) -> None:
    """Each bad option is one line (ValueError) before any work."""
    get_spec(cfg.env)
    check_version(cfg.version)
    if cfg.algo not in ("tqc", "sac"):
        raise ValueError(f"--algo must be tqc or sac, got {cfg.algo!r}")
    for name in ("steps", "n_envs", "train_freq", "utd", "batch_size", "hidden", "layers", "eval_every",
                 "eval_episodes"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.algo == "tqc" and not 0 <= cfg.drop < cfg.quantiles:
        raise ValueError(f"--drop-per-net must be in [0, {cfg.quantiles}), got {cfg.drop}")
    if cfg.learning_starts < cfg.batch_size:
        raise ValueError(f"--learning-starts ({cfg.learning_starts}) must be >= --batch-size ({cfg.batch_size})")


# ----------------------------------------------------------------------------- JAX model and update


def _jax():
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 drift between devices
    return jax


def _mlp_init(key, sizes: list[int]):
    jax = _jax()
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        kw, kb = jax.random.split(jax.random.fold_in(key, i))
        lim = 1.0 / np.sqrt(a)  # torch nn.Linear default (as SB3)
        params.append({"w": jax.random.uniform(kw, (a, b), minval=-lim, maxval=lim),
                       "b": jax.random.uniform(kb, (b,), minval=-lim, maxval=lim)})
    return params


def _mlp(params, x):
    jnp = _jax().numpy
    for layer in params[:-1]:
        x = jnp.maximum(x @ layer["w"] + layer["b"], 0.0)
    return x @ params[-1]["w"] + params[-1]["b"]


def _adam_init(params):
    jax = _jax()
    zeros = jax.tree_util.tree_map(lambda p: p * 0.0, params)
    return {"m": zeros, "v": zeros, "t": jax.numpy.zeros((), jax.numpy.int32)}


def _adam(params, grads, opt, lr, b1=0.9, b2=0.999, eps=1e-8):
    jax = _jax()
    jnp = jax.numpy
    t = opt["t"] + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, opt["m"], grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, opt["v"], grads)
    c1, c2 = 1 - b1 ** t.astype(jnp.float32), 1 - b2 ** t.astype(jnp.float32)
    new = jax.tree_util.tree_map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), params, m, v)
    return new, {"m": m, "v": v, "t": t}


def init_state(cfg: SACConfig, obs_dim: int, act_dim: int) -> dict:
    """All learnable and random state of the agent as one pytree (checkpointed leaf by leaf)."""
    jax = _jax()
    jnp = jax.numpy
    key = jax.random.PRNGKey(cfg.seed)
    ka, kc, key = jax.random.split(key, 3)
    h = [cfg.hidden] * cfg.layers
    actor = _mlp_init(ka, [obs_dim, *h, 2 * act_dim])
    critic = jax.vmap(lambda k: _mlp_init(k, [obs_dim + act_dim, *h, cfg.quantiles]))(
        jax.random.split(kc, cfg.critics))
    log_alpha = jnp.zeros(())
    return {"actor": actor, "critic": critic, "target": jax.tree_util.tree_map(lambda x: x, critic),
            "log_alpha": log_alpha, "opt_actor": _adam_init(actor), "opt_critic": _adam_init(critic),
            "opt_alpha": _adam_init(log_alpha), "key": key}


def _sample_action(actor, obs, key):
    """Tanh-squashed Gaussian sample and its log-probability (SAC appendix C)."""
    jax = _jax()
    jnp = jax.numpy
    out = _mlp(actor, obs)
    mean, log_std = jnp.split(out, 2, axis=-1)
    log_std = jnp.clip(log_std, -20.0, 2.0)
    eps = jax.random.normal(key, mean.shape)
    u = mean + jnp.exp(log_std) * eps
    logp = (-0.5 * eps**2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    logp = logp - (2 * (jnp.log(2.0) - u - jax.nn.softplus(-2 * u))).sum(-1)
    return jnp.tanh(u), logp


@lru_cache(maxsize=16)
def _functions(cfg: SACConfig, obs_dim: int, act_dim: int):
    """(act, greedy, train) jitted for one configuration (cached so repeated runs in a process reuse them)."""
    jax = _jax()
    jnp = jax.numpy
    nc, nq, tqc = cfg.critics, cfg.quantiles, cfg.algo == "tqc"
    keep = nc * (nq - cfg.drop) if tqc else 1
    taus = (jnp.arange(nq) + 0.5) / nq
    target_entropy = -float(act_dim)

    def q_all(critic, obs, act):  # (nc, B, nq)
        x = jnp.concatenate([obs, act], -1)
        return jax.vmap(lambda p: _mlp(p, x))(critic)

    def critic_loss(critic, target, actor, log_alpha, b, key):
        next_a, next_logp = _sample_action(actor, b["next_obs"], key)
        tq = q_all(target, b["next_obs"], next_a)  # (nc, B, nq)
        alpha = jnp.exp(log_alpha)
        if tqc:
            atoms = jnp.sort(jnp.transpose(tq, (1, 0, 2)).reshape(tq.shape[1], -1), axis=-1)[:, :keep]
        else:
            atoms = tq.min(0)  # (B, 1)
        y = b["rew"][:, None] + cfg.gamma * (1.0 - b["term"][:, None]) * (atoms - alpha * next_logp[:, None])
        y = jax.lax.stop_gradient(y)
        q = q_all(critic, b["obs"], b["act"])
        if tqc:  # quantile Huber loss, pairwise over (current quantile, target atom)
            d = y[None, :, None, :] - q[..., None]
            hub = jnp.where(jnp.abs(d) <= 1.0, 0.5 * d**2, jnp.abs(d) - 0.5)
            return (jnp.abs(taus[None, None, :, None] - (d < 0)) * hub).mean()
        return 0.5 * ((q - y[None]) ** 2).mean() * nc

    def actor_loss(actor, critic, log_alpha, obs, key):
        a, logp = _sample_action(actor, obs, key)
        q = q_all(critic, obs, a)
        qv = q.mean((0, 2)) if tqc else q.min(0)[:, 0]
        return (jnp.exp(log_alpha) * logp - qv).mean(), logp

    def one_step(st, b):
        key, k1, k2 = jax.random.split(st["key"], 3)
        lc, gc = jax.value_and_grad(critic_loss)(st["critic"], st["target"], st["actor"], st["log_alpha"], b, k1)
        critic, opt_c = _adam(st["critic"], gc, st["opt_critic"], cfg.lr)
        (la, logp), ga = jax.value_and_grad(actor_loss, has_aux=True)(
            st["actor"], critic, st["log_alpha"], b["obs"], k2)
        actor, opt_a = _adam(st["actor"], ga, st["opt_actor"], cfg.lr)
        ent = jax.lax.stop_gradient(logp + target_entropy).mean()
        log_alpha, opt_al = _adam(st["log_alpha"], -ent, st["opt_alpha"], cfg.lr)  # d/dla of -la*ent
        target = jax.tree_util.tree_map(lambda t, c: (1 - cfg.tau) * t + cfg.tau * c, st["target"], critic)
        new = {"actor": actor, "critic": critic, "target": target, "log_alpha": log_alpha, "opt_actor": opt_a,
               "opt_critic": opt_c, "opt_alpha": opt_al, "key": key}
        return new, jnp.stack([lc, la, jnp.exp(log_alpha)])

    @jax.jit
    def train(st, batches):  # unrolled: an XLA while loop syncs with the host every iteration on GPU
        st, stats = jax.lax.scan(one_step, st, batches, unroll=cfg.unroll or True)
        return st, stats.mean(0)

    @jax.jit
    def greedy(actor, obs):
        return jnp.tanh(jnp.split(_mlp(actor, obs), 2, axis=-1)[0])

    return greedy, train


# ----------------------------------------------------------------------------- environments


def _env_state(env) -> dict:
    import mujoco

    u = env.unwrapped
    n = mujoco.mj_stateSize(u.model, mujoco.mjtState.mjSTATE_INTEGRATION)
    s = np.empty(n)
    mujoco.mj_getState(u.model, u.data, s, mujoco.mjtState.mjSTATE_INTEGRATION)
    return {"mj": s.tolist(), "rng": u.np_random.bit_generator.state, "elapsed": int(env._elapsed_steps)}


def _set_env_state(env, st: dict) -> None:
    import mujoco

    u = env.unwrapped
    mujoco.mj_setState(u.model, u.data, np.asarray(st["mj"], np.float64), mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(u.model, u.data)
    u.np_random.bit_generator.state = st["rng"]
    env._elapsed_steps = st["elapsed"]


def evaluate_policy(greedy, actor, env_name: str, version: str, episodes: int, seed: int = 10_000,
                    max_steps: int = 1000) -> np.ndarray:
    """Deterministic returns of `episodes` envs stepped together (env i seeded seed + i)."""
    envs = [make_env(env_name, version, max_episode_steps=max_steps) for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    rets, alive = np.zeros(episodes), np.ones(episodes, bool)
    while alive.any():
        acts = np.asarray(greedy(actor, obs.astype(np.float32)))
        for i in np.flatnonzero(alive):
            o, r, term, trunc, _ = envs[i].step(acts[i])
            rets[i] += r
            obs[i] = o
            alive[i] = not (term or trunc)
    for e in envs:
        e.close()
    return rets


# ----------------------------------------------------------------------------- replay buffer


@dataclass
class Buffer:
    """Flat transitions in arrival order (slot = round * n_envs + env); capacity = total steps (no overwrite)."""

    obs: np.ndarray
    act: np.ndarray
    rew: np.ndarray
    term: np.ndarray
    trunc: np.ndarray
    next_obs: np.ndarray
    size: int = 0

    @classmethod
    def empty(cls, cap: int, obs_dim: int, act_dim: int) -> Buffer:
        return cls(np.zeros((cap, obs_dim), np.float32), np.zeros((cap, act_dim), np.float32),
                   np.zeros(cap, np.float32), np.zeros(cap, bool), np.zeros(cap, bool),
                   np.zeros((cap, obs_dim), np.float32))

    def compact(self) -> dict:
        """Arrays to save: next_obs only where an episode ended (elsewhere it is the env's next obs)."""
        n = self.size
        ends = np.flatnonzero(self.term[:n] | self.trunc[:n])
        return {"b_obs": self.obs[:n], "b_act": self.act[:n], "b_rew": self.rew[:n], "b_term": self.term[:n],
                "b_trunc": self.trunc[:n], "b_end_idx": ends, "b_end_obs": self.next_obs[ends]}

    @classmethod
    def restore(cls, cap: int, arrs: dict, n_envs: int, cur_obs: np.ndarray) -> Buffer:
        n = len(arrs["b_rew"])
        b = cls.empty(cap, arrs["b_obs"].shape[1], arrs["b_act"].shape[1])
        b.obs[:n], b.act[:n], b.rew[:n] = arrs["b_obs"], arrs["b_act"], arrs["b_rew"]
        b.term[:n], b.trunc[:n] = arrs["b_term"], arrs["b_trunc"]
        b.next_obs[: n - n_envs] = b.obs[n_envs:n]
        b.next_obs[n - n_envs: n] = cur_obs
        b.next_obs[arrs["b_end_idx"]] = arrs["b_end_obs"]
        b.size = n
        return b


# ----------------------------------------------------------------------------- training loop


def _log(msg: str) -> None:
    print(f"[train.sac {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _save_ckpt(run: Path, state: dict, meta: dict, buf: Buffer) -> None:
    jax = _jax()
    ck = run / "ckpt"
    ck.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]
    arrs = {f"leaf{i:03d}": x for i, x in enumerate(leaves)} | buf.compact()
    tmp = ck / "state.tmp.npz"
    np.savez(tmp, **arrs)
    os.replace(tmp, ck / "state.npz")
    (ck / "meta.tmp").write_text(json.dumps(meta))
    os.replace(ck / "meta.tmp", ck / "meta.json")


def _save_snapshot(run: Path, actor, step: int, keep: set[int]) -> None:
    """actor weights at `step`; prunes snapshots that are neither medium candidates, best, nor latest."""
    snap = run / "snapshots"
    snap.mkdir(parents=True, exist_ok=True)
    flat = {f"{i}_{k}": np.asarray(v) for i, layer in enumerate(actor) for k, v in layer.items()}
    np.savez(snap / f"step_{step:08d}.npz", **flat)
    for f in snap.glob("step_*.npz"):
        s = int(f.stem.split("_")[1])
        if s not in keep and s != step:
            f.unlink()


def train(cfg: SACConfig) -> dict:
    """Train (or resume) one env's agent until `steps`, `stop_at` or `max_minutes`; returns a summary."""
    validate(cfg)
    if cfg.threads:
        os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads="
                                           f"{cfg.threads}")
    jax = _jax()
    spec = get_spec(cfg.env)
    run = cfg.run_dir()
    run.mkdir(parents=True, exist_ok=True)
    envs = [make_env(spec.name, cfg.version) for _ in range(cfg.n_envs)]
    obs_dim, act_dim = spec.obs_dim, spec.act_dim
    # jitted functions depend only on the learner's settings: runs that differ in out/steps/stop reuse them
    greedy, train_fn = _functions(replace(cfg, out="", seed=0, steps=1, stop_at=0, max_minutes=0.0, threads=0,
                                          eval_every=1, eval_episodes=1, learning_starts=0), obs_dim, act_dim)
    state = init_state(cfg, obs_dim, act_dim)
    ck = run / "ckpt"
    if (ck / "meta.json").exists():
        meta = json.loads((ck / "meta.json").read_text())
        if meta["config"]["algo"] != cfg.algo or meta["config"]["n_envs"] != cfg.n_envs:
            raise ValueError(f"{run}: checkpoint was made with --algo {meta['config']['algo']} --n-envs "
                             f"{meta['config']['n_envs']}; resume with the same options")
        z = np.load(ck / "state.npz")
        treedef = jax.tree_util.tree_structure(state)
        n_leaves = treedef.num_leaves
        state = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(z[f"leaf{i:03d}"]) for i in range(n_leaves)])
        for e, st in zip(envs, meta["envs"]):
            e.reset(seed=0)
            _set_env_state(e, st)
        obs = np.asarray(meta["obs"], np.float32)
        buf = Buffer.restore(cfg.steps + cfg.n_envs * cfg.train_freq, {k: z[k] for k in z.files if k[:2] == "b_"},
                             cfg.n_envs, obs)
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng"]
        step, wall, best, ep_ret = meta["step"], meta["wall_s"], meta["best"], np.asarray(meta["ep_ret"])
        next_eval, keep, best_step = meta["next_eval"], set(meta["keep"]), meta["best_step"]
        _log(f"{spec.name}: resumed at step {step} ({wall:.0f}s trained so far)")
    else:
        obs = np.stack([e.reset(seed=cfg.seed * 1000 + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
        for i, e in enumerate(envs):
            e.action_space.seed(cfg.seed * 1000 + i)
        buf = Buffer.empty(cfg.steps + cfg.n_envs * cfg.train_freq, obs_dim, act_dim)
        rng = np.random.default_rng(cfg.seed)
        step, wall, best, ep_ret = 0, 0.0, -np.inf, np.zeros(cfg.n_envs)
        next_eval, keep, best_step = cfg.eval_every, set(), -1
        with open(run / "log.csv", "w", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writeheader()
        (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    _log(f"{spec.name}: {cfg.algo} seed {cfg.seed}, {cfg.n_envs} env(s), device {jax.devices()[0]}, "
         f"target {cfg.steps} steps")
    t0, s0 = time.time(), step
    actor_np = jax.device_get(state["actor"])
    stats = np.zeros(3)
    per_iter = cfg.n_envs * cfg.train_freq
    while step < cfg.steps:
        if cfg.stop_at and step >= cfg.stop_at:
            break
        if cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes:
            break
        for _ in range(cfg.train_freq):
            if step < cfg.learning_starts:
                acts = rng.uniform(-1.0, 1.0, (cfg.n_envs, act_dim)).astype(np.float32)
            else:
                acts = np_sample(actor_np, obs, rng)
            for i, e in enumerate(envs):
                o, r, term, trunc, _ = e.step(acts[i])
                j = buf.size
                buf.obs[j], buf.act[j], buf.rew[j], buf.term[j], buf.trunc[j] = obs[i], acts[i], r, term, trunc
                buf.next_obs[j] = o
                buf.size += 1
                ep_ret[i] += r
                if term or trunc:
                    o, _ = e.reset()
                    ep_ret[i] = 0.0
                obs[i] = o
            step += cfg.n_envs
        if step >= cfg.learning_starts:
            idx = rng.integers(0, buf.size, (per_iter * cfg.utd, cfg.batch_size))
            batches = {"obs": buf.obs[idx], "act": buf.act[idx], "rew": buf.rew[idx],
                       "term": buf.term[idx].astype(np.float32), "next_obs": buf.next_obs[idx]}
            state, st = train_fn(state, batches)
            stats = np.asarray(st)
            actor_np = jax.device_get(state["actor"])
        if step >= next_eval or step >= cfg.steps:
            next_eval += cfg.eval_every
            rets = evaluate_policy(greedy, state["actor"], spec.name, cfg.version, cfg.eval_episodes)
            score = float(d4rl_normalized_score(spec.name, rets.mean()))
            el = wall + time.time() - t0
            if score <= MEDIUM_KEEP_SCORE:  # medium candidates stay on disk
                keep.add(step)
            if rets.mean() > best:
                best, best_step = float(rets.mean()), step
            _save_snapshot(run, state["actor"], step, keep | {best_step})
            row = {"step": step, "wall_s": round(el, 1), "eval_return": round(float(rets.mean()), 2),
                   "eval_std": round(float(rets.std()), 2), "d4rl_score": round(score, 2),
                   "alpha": float(stats[2]), "critic_loss": float(stats[0]), "actor_loss": float(stats[1]),
                   "sps": round((step - s0) / max(time.time() - t0, 1e-9), 1)}
            with open(run / "log.csv", "a", newline="") as f:
                csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
            _log(f"{spec.name}: step {step} eval {rets.mean():.1f} +- {rets.std():.1f} (D4RL {score:.1f}), "
                 f"alpha {stats[2]:.3f}, {row['sps']} steps/s")
    wall += time.time() - t0
    meta = {"config": asdict(cfg), "step": step, "wall_s": wall, "best": best, "ep_ret": ep_ret.tolist(),
            "next_eval": next_eval, "keep": sorted(keep), "best_step": best_step, "rng": rng.bit_generator.state,
            "obs": obs.tolist(),
            "envs": [_env_state(e) for e in envs]}
    _save_ckpt(run, state, meta, buf)
    for e in envs:
        e.close()
    _log(f"{spec.name}: checkpoint at step {step} ({wall:.0f}s trained, "
         f"{(step - s0) / max(time.time() - t0, 1e-9):.0f} steps/s this call)")
    return {"env": spec.name, "step": step, "wall_s": wall, "best_return": best, "run": str(run),
            "last_stats": stats.tolist()}


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> tuple[list[str], SACConfig]:
    from transfer.options import Parser

    d = SACConfig()
    p = Parser(prog="python -m train.sac", description=__doc__.split("\n\n")[0])
    p.add_argument("--env", nargs="+", required=True, help="one or more of hopper halfcheetah walker2d")
    for f in fields(SACConfig):
        if f.name == "env":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=getattr(d, f.name))
    a = vars(p.parse_args(argv))
    envs = [get_spec(e).name for e in a.pop("env")]
    return envs, SACConfig(env=envs[0], **a)


def main(argv: list[str] | None = None) -> list[dict]:
    args = sys.argv[1:] if argv is None else list(argv)
    envs, cfg = parse_args(args)
    if len(envs) == 1:
        return [train(cfg)]
    for e in envs:  # one subprocess per env; each gets a share of the CPU threads and grows GPU memory lazily
        validate(replace(cfg, env=e))
    threads = cfg.threads or max(1, (os.cpu_count() or 2) // len(envs))
    procs = []
    for e in envs:
        rest = [x for x in _strip_env(args)] + ["--env", e, "--threads", str(threads)]
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", OMP_NUM_THREADS=str(threads))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        log = open(Path(cfg.out) / f"{e}.log", "a")
        procs.append((e, subprocess.Popen([sys.executable, "-m", "train.sac", *rest], env=env, stdout=log,
                                          stderr=subprocess.STDOUT), log))
        _log(f"started {e} (pid {procs[-1][1].pid}), log {Path(cfg.out) / f'{e}.log'}")
    bad = []
    for e, p, log in procs:
        if p.wait() != 0:
            bad.append(e)
        log.close()
    if bad:
        raise RuntimeError(f"training failed for {', '.join(bad)}; see {cfg.out}/<env>.log")
    return [json.loads((replace(cfg, env=e).run_dir() / "ckpt" / "meta.json").read_text())["step"] for e in envs]


def _strip_env(args: list[str]) -> list[str]:
    """The command line without `--env a b c` and `--threads N` (each child gets its own)."""
    out, skip = [], False
    for x in args:
        if x in ("--env", "--threads"):
            skip = True
            continue
        if skip and not x.startswith("--"):
            continue
        skip = False
        out.append(x)
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        sys.exit(f"error: {err}")
