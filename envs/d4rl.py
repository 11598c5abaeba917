"""D4RL hdf5 datasets and normalised scores, implemented directly (the d4rl package does not import here).

Format (d4rl/offline_env.py `get_dataset`): flat arrays `observations (N, obs_dim)`, `actions (N, act_dim)`,
`rewards (N,)`, `terminals (N,)`, `timeouts (N,)`, plus an optional `metadata` group. Episodes end at
`terminals | timeouts`, as in kzl/decision-transformer `gym/data/download_d4rl_datasets.py`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from envs.mujoco import ENV_SPECS, check_obs, get_spec

REF_MIN_SCORE = {name: s.ref_min_score for name, s in ENV_SPECS.items()}
REF_MAX_SCORE = {name: s.ref_max_score for name, s in ENV_SPECS.items()}
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
DEFAULT_MAX_EP_LEN = 1000  # the DT download script's episode cut when a file has no `timeouts`


def d4rl_normalized_score(env_name: str, returns):
    """100 * (R - REF_MIN) / (REF_MAX - REF_MIN) with D4RL's constants for `env_name`."""
    spec = get_spec(env_name)
    r = np.asarray(returns, dtype=np.float64)
    return 100.0 * (r - spec.ref_min_score) / (spec.ref_max_score - spec.ref_min_score)


def normalized_score(returns, random_return: float, expert_return: float):
    """100 * (R - random) / (expert - random): a dataset's own normalisation (its metadata returns)."""
    if expert_return == random_return:
        raise ValueError("expert_return equals random_return; the normalised score is undefined")
    r = np.asarray(returns, dtype=np.float64)
    return 100.0 * (r - random_return) / (expert_return - random_return)


@dataclass
class Episode:
    """One trajectory; arrays are aligned per step (obs before the action)."""

    observations: np.ndarray  # (T, obs_dim) float32
    actions: np.ndarray  # (T, act_dim) float32
    rewards: np.ndarray  # (T,) float32
    terminals: np.ndarray  # (T,) bool, true only at a real termination
    timeouts: np.ndarray  # (T,) bool, true only at a time-limit cut

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def ret(self) -> float:
        return float(self.rewards.sum(dtype=np.float64))


@dataclass
class Dataset:
    """Episodes plus the statistics a DT needs (state mean/std over every step)."""

    episodes: list[Episode]
    env_name: str | None = None
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def num_steps(self) -> int:
        return int(sum(len(e) for e in self.episodes))

    @property
    def returns(self) -> np.ndarray:
        return np.array([e.ret for e in self.episodes], dtype=np.float64)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(e) for e in self.episodes], dtype=np.int64)

    @property
    def obs_dim(self) -> int:
        return int(self.episodes[0].observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.episodes[0].actions.shape[1])

    def state_stats(self, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (+eps, as in the DT code) of all observations; float32 (obs_dim,)."""
        obs = np.concatenate([e.observations for e in self.episodes], axis=0).astype(np.float64)
        return obs.mean(0).astype(np.float32), (obs.std(0) + eps).astype(np.float32)

    @property
    def state_mean(self) -> np.ndarray:
        return self.state_stats()[0]

    @property
    def state_std(self) -> np.ndarray:
        return self.state_stats()[1]


def select_observations(data: Dataset, obs: str) -> Dataset:
    """The dataset as seen through an observation variant (envs.mujoco.OBS_VARIANTS; "pos" = positions only,
    the same indices `make_env(..., obs="pos")` keeps), so a DT trained on it runs in that env. The files
    stay full-state; the variant is taken at load time and recorded in the metadata (`obs_variant`)."""
    check_obs(obs)
    if obs == "full":
        return data
    if data.env_name is None:
        raise ValueError(f"observation variant {obs!r} needs the dataset's environment; pass --env")
    spec = get_spec(data.env_name)
    if data.obs_dim != spec.obs_dim:
        raise ValueError(f"observation variant {obs!r}: the dataset has {data.obs_dim} observation entries, "
                         f"{spec.name}'s full observation has {spec.obs_dim}")
    idx = spec.obs_indices(obs)
    episodes = [Episode(e.observations[:, idx], e.actions, e.rewards, e.terminals, e.timeouts) for e in data.episodes]
    return Dataset(episodes, data.env_name, {**data.metadata, "obs_variant": obs, "obs_indices": str(idx)})


def split_episodes(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminals: np.ndarray,
    timeouts: np.ndarray | None = None,
    max_ep_len: int = DEFAULT_MAX_EP_LEN,
) -> list[Episode]:
    """Cut flat arrays at terminals | timeouts; a trailing unfinished piece is dropped (DT script)."""
    n = len(rewards)
    terminals = np.asarray(terminals).astype(bool)
    if timeouts is None:  # the DT script's fallback: cut every max_ep_len steps
        # the step count restarts after each terminal, so cut positions are set episode by episode
        timeouts = np.zeros(n, dtype=bool)
        start = 0
        for t in np.flatnonzero(terminals).tolist() + [n]:
            timeouts[start + max_ep_len - 1 : t : max_ep_len] = True
            start = t + 1
    timeouts = np.asarray(timeouts).astype(bool)
    done = np.flatnonzero(terminals | timeouts)
    episodes, start = [], 0
    for end in done.tolist():
        sl = slice(start, end + 1)
        episodes.append(
            Episode(
                observations=np.asarray(observations[sl], dtype=np.float32),
                actions=np.asarray(actions[sl], dtype=np.float32),
                rewards=np.asarray(rewards[sl], dtype=np.float32).reshape(-1),
                terminals=terminals[sl].copy(),
                timeouts=timeouts[sl].copy(),
            )
        )
        start = end + 1
    return episodes


def _read_metadata(f) -> dict:
    meta: dict = {}
    if "metadata" not in f:
        return meta
    grp = f["metadata"]
    items = list(grp.attrs.items())
    items += [(k, grp[k][()]) for k in grp.keys() if not hasattr(grp[k], "keys")]
    for k, v in items:
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        meta[k] = v
    return meta


def load_d4rl_hdf5(path: str | os.PathLike, env_name: str | None = None) -> Dataset:
    """Read a D4RL-format hdf5 into episodes; checks keys, shapes, and obs size against the env."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"D4RL dataset not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in REQUIRED_KEYS if k not in f]
            if missing:
                raise ValueError(f"{path}: missing D4RL key(s) {missing}; required: {list(REQUIRED_KEYS)}")
            obs, act = f["observations"][()], f["actions"][()]
            rew, term = f["rewards"][()], f["terminals"][()]
            tout = f["timeouts"][()] if "timeouts" in f else None
            meta = _read_metadata(f)
    except OSError as err:  # not HDF5, truncated, unreadable: h5py's message on one line
        raise ValueError(f"{path}: cannot read as HDF5 ({str(err).splitlines()[0]})") from None
    n = len(rew)
    if obs.ndim != 2 or act.ndim != 2 or len(obs) != n or len(act) != n or len(term) != n:
        raise ValueError(
            f"{path}: inconsistent D4RL arrays: observations {obs.shape}, actions {act.shape}, "
            f"rewards {rew.shape}, terminals {term.shape}"
        )
    if tout is not None and len(tout) != n:
        raise ValueError(f"{path}: timeouts has {len(tout)} entries, expected {n}")
    env_name = env_name or meta.get("env_name")
    if env_name is not None:
        spec = get_spec(env_name)
        if obs.shape[1] != spec.obs_dim or act.shape[1] != spec.act_dim:
            raise ValueError(
                f"{path}: observation/action size {obs.shape[1]}/{act.shape[1]} does not match {spec.name} "
                f"({spec.obs_dim}/{spec.act_dim})"
            )
        env_name = spec.name
    episodes = split_episodes(obs, act, rew, term, tout)
    if not episodes:
        raise ValueError(f"{path}: no complete episode (no terminal or timeout flag set)")
    return Dataset(episodes=episodes, env_name=env_name, metadata=meta)


def write_d4rl_hdf5(path: str | os.PathLike, episodes: list[Episode], metadata: dict | None = None) -> Path:
    """Write episodes as flat D4RL arrays (gzip, float32) plus `metadata` group attrs; atomic rename."""
    import h5py

    if not episodes:
        raise ValueError("write_d4rl_hdf5: no episodes to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cat = lambda key, dtype: np.concatenate([np.asarray(getattr(e, key), dtype=dtype) for e in episodes])  # noqa: E731
    arrays = {
        "observations": cat("observations", np.float32),
        "actions": cat("actions", np.float32),
        "rewards": cat("rewards", np.float32).reshape(-1),
        "terminals": cat("terminals", bool),
        "timeouts": cat("timeouts", bool),
    }
    ends = arrays["terminals"] | arrays["timeouts"]
    last = np.cumsum([len(e) for e in episodes]) - 1
    if not ends[last].all():
        raise ValueError("write_d4rl_hdf5: every episode must end with a terminal or timeout flag")
    fd, tmp = tempfile.mkstemp(suffix=".hdf5.tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in arrays.items():
                f.create_dataset(k, data=v, compression="gzip", compression_opts=9, shuffle=True)
            grp = f.create_group("metadata")
            for k, v in (metadata or {}).items():
                grp.attrs[k] = v if not isinstance(v, (list, tuple, dict)) else str(v)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
