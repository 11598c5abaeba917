"""MuJoCo locomotion environments used by the offline-RL experiments.

The spec table is importable without gymnasium (the GPU machine has none): only `make_env` and
`make_vector_env` import it, lazily.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSIONS = ("v5", "v4")  # gymnasium[mujoco] 1.x; v2/v3 need mujoco-py, which does not install here


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

    @property
    def target_return(self) -> float:
        return self.target_returns[0]


ENV_SPECS: dict[str, EnvSpec] = {
    "hopper": EnvSpec("hopper", "Hopper", 11, 3, -20.272305, 3234.3, (3600.0, 1800.0)),
    "halfcheetah": EnvSpec("halfcheetah", "HalfCheetah", 17, 6, -280.178953, 12135.0, (12000.0, 6000.0)),
    "walker2d": EnvSpec("walker2d", "Walker2d", 17, 6, 1.629008, 4592.3, (5000.0, 2500.0)),
}


def get_spec(name: str) -> EnvSpec:
    """Look up a task by name (case-insensitive; "half_cheetah" and "Hopper-v5" style ids accepted)."""
    key = name.lower().split("-")[0].replace("_", "")
    if key not in ENV_SPECS:
        raise ValueError(f"unknown environment {name!r}; valid names: {', '.join(ENV_SPECS)}")
    return ENV_SPECS[key]


def check_model(config, env_name: str | None = None) -> EnvSpec:
    """The environment a Decision Transformer config runs in (`env_name`, else `config.env_name`), with its
    state/action sizes checked; sets `config.env_name` and, if missing, the DT paper's target return."""
    name = env_name or getattr(config, "env_name", None)
    if name is None:
        raise ValueError("the model does not name its environment; pass the environment (--env)")
    spec = get_spec(name)
    if (config.state_dim, config.act_dim) != (spec.obs_dim, spec.act_dim):
        raise ValueError(f"model state/action size {config.state_dim}/{config.act_dim} does not match "
                         f"{spec.name} ({spec.obs_dim}/{spec.act_dim})")
    config.env_name = spec.name
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


def make_env(name: str, version: str = "v5", seed: int | None = None, max_episode_steps: int | None = None):
    """One gymnasium env (TimeLimit 1000 by default); seeded by a first reset when `seed` is given."""
    env_id = gym_id(name, version)
    import gymnasium as gym

    kwargs = {} if max_episode_steps is None else {"max_episode_steps": int(max_episode_steps)}
    env = gym.make(env_id, **kwargs)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


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
