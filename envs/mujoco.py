"""MuJoCo locomotion environments used by the offline-RL experiments.

The spec table is importable without gymnasium (the GPU machine has none): only `make_env` and
`make_vector_env` import it, lazily.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSIONS = ("v5", "v4")  # gymnasium[mujoco] 1.x; v2/v3 need mujoco-py, which does not install here
# Observation variants. "full": the env's own observation. "pos": positions only, velocities removed, so a
# policy must infer them from the past (the memory-dependent variant of issue 18). In v4/v5 every one of the
# three envs observes qpos[1:] (all joint positions except the root's x) followed by qvel; "pos" keeps the
# first `pos_dims` entries, i.e. exactly qpos[1:]:
#   hopper      0-4: rootz, rooty, thigh, leg, foot (drops the 6 velocities 5-10)
#   halfcheetah 0-7: rootz, rooty, bthigh, bshin, bfoot, fthigh, fshin, ffoot (drops 8-16)
#   walker2d    0-7: rootz, rooty, thigh, leg, foot, thigh_left, leg_left, foot_left (drops 8-16)
# (tests/test_envs.py checks these against the simulator's qpos.)
OBS_VARIANTS = ("full", "pos")


@dataclass(frozen=True)
class EnvSpec:
    """Static facts about one locomotion task (shapes, D4RL references, DT targets)."""

    name: str
    gym_name: str  # gymnasium id without version, e.g. "Hopper"
    obs_dim: int
    act_dim: int
    ref_min_score: float  # D4RL REF_MIN_SCORE (d4rl/infos.py, the -random-v0 return)
    ref_max_score: float  # D4RL REF_MAX_SCORE (d4rl/infos.py, the expert return)
    target_returns: tuple[float, float]  # DT paper (kzl/decision-transformer gym/experiment.py)
    pos_dims: int = 0  # observation entries that are positions (qpos[1:]); the rest are velocities

    @property
    def target_return(self) -> float:
        return self.target_returns[0]

    def obs_indices(self, obs: str = "full") -> list[int]:
        """Indices of the env observation a variant keeps ("full": all; "pos": qpos[1:], no velocities)."""
        check_obs(obs)
        return list(range(self.obs_dim if obs == "full" else self.pos_dims))

    def state_dim(self, obs: str = "full") -> int:
        return len(self.obs_indices(obs))


ENV_SPECS: dict[str, EnvSpec] = {
    "hopper": EnvSpec("hopper", "Hopper", 11, 3, -20.272305, 3234.3, (3600.0, 1800.0), pos_dims=5),
    "halfcheetah": EnvSpec("halfcheetah", "HalfCheetah", 17, 6, -280.178953, 12135.0, (12000.0, 6000.0), pos_dims=8),
    "walker2d": EnvSpec("walker2d", "Walker2d", 17, 6, 1.629008, 4592.3, (5000.0, 2500.0), pos_dims=8),
}


def get_spec(name: str) -> EnvSpec:
    """Look up a task by name (case-insensitive; "half_cheetah" and "Hopper-v5" style ids accepted)."""
    key = name.lower().split("-")[0].replace("_", "")
    if key not in ENV_SPECS:
        raise ValueError(f"unknown environment {name!r}; valid names: {', '.join(ENV_SPECS)}")
    return ENV_SPECS[key]


def check_obs(obs: str) -> str:
    if obs not in OBS_VARIANTS:
        raise ValueError(f"unknown observation variant {obs!r}; valid: {', '.join(OBS_VARIANTS)}")
    return obs


def check_model(config, env_name: str | None = None) -> EnvSpec:
    """The environment a Decision Transformer config runs in (`env_name`, else `config.env_name`), with its
    state/action sizes checked against its observation variant (`config.obs_variant`, default "full"); sets
    `config.env_name`, `config.obs_variant` and, if missing, the DT paper's target return."""
    name = env_name or getattr(config, "env_name", None)
    if name is None:
        raise ValueError("the model does not name its environment; pass the environment (--env)")
    spec = get_spec(name)
    obs = check_obs(getattr(config, "obs_variant", None) or "full")
    if (config.state_dim, config.act_dim) != (spec.state_dim(obs), spec.act_dim):
        raise ValueError(f"model state/action size {config.state_dim}/{config.act_dim} does not match "
                         f"{spec.name} with {obs!r} observations ({spec.state_dim(obs)}/{spec.act_dim})")
    config.env_name, config.obs_variant = spec.name, obs
    if getattr(config, "target_return", None) is None:
        config.target_return = spec.target_return
    return spec


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"unknown environment version {version!r}; valid versions: {', '.join(VERSIONS)}")
    return version


def gym_id(name: str, version: str = "v5") -> str:
    """Gymnasium id, e.g. gym_id("hopper") == "Hopper-v5"."""
    return f"{get_spec(name).gym_name}-{check_version(version)}"


def make_env(name: str, version: str = "v5", seed: int | None = None, max_episode_steps: int | None = None,
             obs: str = "full"):
    """One gymnasium env (TimeLimit 1000 by default); seeded by a first reset when `seed` is given; with
    obs="pos" it observes positions only (`OBS_VARIANTS`), through `PositionOnly`."""
    env_id = gym_id(name, version)
    check_obs(obs)
    import gymnasium as gym

    kwargs = {} if max_episode_steps is None else {"max_episode_steps": int(max_episode_steps)}
    env = gym.make(env_id, **kwargs)
    if obs != "full":
        env = position_only(env, get_spec(name).obs_indices(obs))
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def position_only(env, indices: list[int]):
    """`env` observing only `indices` of its observation (a gymnasium ObservationWrapper; the TimeLimit and
    the unwrapped MuJoCo env stay reachable, so step counts and resets are unchanged)."""
    import gymnasium as gym
    import numpy as np

    idx = np.asarray(indices, dtype=np.int64)

    class PositionOnly(gym.ObservationWrapper):
        def __init__(self, inner):
            super().__init__(inner)
            box = inner.observation_space
            self.observation_space = gym.spaces.Box(box.low[idx], box.high[idx], dtype=box.dtype)

        def observation(self, observation):
            return observation[idx]

    return PositionOnly(env)


def make_vector_env(name: str, n: int, version: str = "v5", seed: int | None = None):
    """`n` copies in a gymnasium SyncVectorEnv; env i is seeded with seed + i."""
    if n < 1:
        raise ValueError(f"number of environments must be >= 1, got {n}")
    env_id = gym_id(name, version)
    import gymnasium as gym

    vec = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(n)])
    if seed is not None:
        vec.reset(seed=[seed + i for i in range(n)])
        vec.action_space.seed(seed)
    return vec
