"""Local Minari datasets (e.g. mujoco/hopper/medium-v0) as the same `Dataset` the D4RL loader returns.

Layout: `$MINARI_DATASETS_PATH/<namespace>/<name>-v<k>/data/{main_data.hdf5, metadata.json}`
(default root ~/.minari/datasets). Nothing is downloaded: a missing dataset is an error.
Minari datasets are scored with their own `ref_min_score`/`ref_max_score`, never the D4RL constants.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from envs.d4rl import Dataset, Episode
from envs.mujoco import get_spec


@contextmanager
def _datasets_root(root: str | os.PathLike | None):
    if root is None:
        yield
        return
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _env_name_from_id(env_id: str | None) -> str | None:
    try:
        return get_spec(env_id).name if env_id else None
    except ValueError:
        return None


def load_minari(dataset_id: str, root: str | os.PathLike | None = None, env_name: str | None = None) -> Dataset:
    """Load a locally stored Minari dataset (no download); obs size is checked against the env."""
    import minari

    with _datasets_root(root):
        base = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
        if not (base / dataset_id / "data" / "metadata.json").is_file():
            raise FileNotFoundError(f"Minari dataset {dataset_id!r} not found under {base} (no download is attempted)")
        ds = minari.load_dataset(dataset_id, download=False)
        meta = dict(ds.storage.metadata)
        env_id = (ds.env_spec.id if ds.env_spec is not None else None) or meta.get("env_spec", None)
        episodes = []
        for ep in ds.iterate_episodes():
            obs = np.asarray(ep.observations, dtype=np.float32)[:-1]  # (T+1, obs_dim) -> drop final obs
            term = np.asarray(ep.terminations, dtype=bool)
            episodes.append(Episode(observations=obs, actions=np.asarray(ep.actions, dtype=np.float32),
                                    rewards=np.asarray(ep.rewards, dtype=np.float32),
                                    terminals=term, timeouts=np.asarray(ep.truncations, dtype=bool) & ~term))
    name = env_name or _env_name_from_id(env_id if isinstance(env_id, str) else None)
    if not episodes:
        raise ValueError(f"Minari dataset {dataset_id!r} has no episodes")
    if name is not None:
        spec = get_spec(name)
        if episodes[0].observations.shape[1] != spec.obs_dim:
            raise ValueError(f"Minari dataset {dataset_id!r}: observation size "
                             f"{episodes[0].observations.shape[1]} does not match {spec.name} ({spec.obs_dim})")
        name = spec.name
    metadata = {"dataset_id": dataset_id, "env_id": env_id if isinstance(env_id, str) else None,
                "source": "minari"}
    for key, alias in (("ref_min_score", "random_return"), ("ref_max_score", "expert_return")):
        if meta.get(key) is not None:
            metadata[key] = metadata[alias] = float(meta[key])
    return Dataset(episodes=episodes, env_name=name, metadata=metadata)


def minari_normalized_score(dataset_id: str, returns, root: str | os.PathLike | None = None):
    """100 x `minari.get_normalized_score` (its metadata's ref_min/ref_max), on the D4RL scale."""
    import minari

    with _datasets_root(root):
        ds = minari.load_dataset(dataset_id, download=False)
        return 100.0 * np.asarray(minari.get_normalized_score(ds, np.asarray(returns, dtype=np.float64)))
