"""Local Minari datasets (e.g. mujoco/hopper/medium-v0) as the same `Dataset` the D4RL loader returns.

Layout: `$MINARI_DATASETS_PATH/<namespace>/<name>-v<k>/data/{main_data.hdf5, metadata.json}`
(default root ~/.minari/datasets); a dataset folder can also be passed by path. Nothing is downloaded:
a missing dataset is an error. `load_dataset` picks the D4RL or Minari loader for `train dt --data`.
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


def _open_minari(dataset: str | os.PathLike, root: str | os.PathLike | None):
    """(MinariDataset, name for messages) from a dataset folder or an id under the local root."""
    try:
        import minari
    except ImportError:
        raise ValueError(f"{dataset}: reading a Minari dataset needs the minari package (pip install minari)") from None

    folder = Path(dataset)
    if folder.is_dir():
        data_dir = folder / "data" if (folder / "data").is_dir() else folder
        if not (data_dir / "metadata.json").is_file():
            raise FileNotFoundError(f"{folder}: not a Minari dataset folder (no data/metadata.json)")
        return minari.MinariDataset(str(data_dir)), str(folder)
    dataset_id = str(dataset)
    with _datasets_root(root):
        base = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
        if not (base / dataset_id / "data" / "metadata.json").is_file():
            raise FileNotFoundError(f"Minari dataset {dataset_id!r} not found under {base} (no download is attempted)")
        return minari.load_dataset(dataset_id, download=False), repr(dataset_id)


def load_minari(dataset: str | os.PathLike, root: str | os.PathLike | None = None,
                env_name: str | None = None) -> Dataset:
    """Load a locally stored Minari dataset (no download): an id under `root` (default
    $MINARI_DATASETS_PATH or ~/.minari/datasets) or the path of a dataset folder; obs size is checked."""
    ds, label = _open_minari(dataset, root)
    meta = dict(ds.storage.metadata)
    env_id = (ds.env_spec.id if ds.env_spec is not None else None) or meta.get("env_spec", None)
    episodes = []
    for ep in ds.iterate_episodes():
        obs = np.asarray(ep.observations, dtype=np.float32)
        if obs.ndim != 2:
            raise ValueError(f"Minari dataset {label}: observations must be flat vectors, got shape {obs.shape}")
        term = np.asarray(ep.terminations, dtype=bool)
        episodes.append(Episode(observations=obs[:-1],  # (T+1, obs_dim) -> drop the final obs
                                actions=np.asarray(ep.actions, dtype=np.float32),
                                rewards=np.asarray(ep.rewards, dtype=np.float32),
                                terminals=term, timeouts=np.asarray(ep.truncations, dtype=bool) & ~term))
    name = env_name or _env_name_from_id(env_id if isinstance(env_id, str) else None)
    if not episodes:
        raise ValueError(f"Minari dataset {label} has no episodes")
    if name is not None:
        spec = get_spec(name)
        obs_dim, act_dim = episodes[0].observations.shape[1], episodes[0].actions.shape[1]
        if (obs_dim, act_dim) != (spec.obs_dim, spec.act_dim):
            raise ValueError(f"Minari dataset {label}: observation/action size {obs_dim}/{act_dim} does not match "
                             f"{spec.name} ({spec.obs_dim}/{spec.act_dim})")
        name = spec.name
    metadata = {"dataset_id": meta.get("dataset_id", str(dataset)),
                "env_id": env_id if isinstance(env_id, str) else None, "source": "minari"}
    if name is not None:
        metadata["env_name"] = name
    for key, alias in (("ref_min_score", "random_return"), ("ref_max_score", "expert_return")):
        if meta.get(key) is not None:
            metadata[key] = metadata[alias] = float(meta[key])
    return Dataset(episodes=episodes, env_name=name, metadata=metadata)


def load_dataset(data: str | os.PathLike, env_name: str | None = None,
                 minari_root: str | os.PathLike | None = None) -> Dataset:
    """An offline dataset from a D4RL-format hdf5 file, a Minari dataset folder, or a local Minari id.

    `*.hdf5`/`*.h5` names are D4RL files; an existing folder is a Minari dataset; anything else is a
    Minari id looked up under `minari_root`. Nothing is downloaded.
    """
    from envs.d4rl import load_d4rl_hdf5

    text = str(data)
    if text.endswith((".hdf5", ".h5")) or Path(text).is_file():
        return load_d4rl_hdf5(text, env_name=env_name)
    return load_minari(text, root=minari_root, env_name=env_name)


def minari_normalized_score(dataset_id: str, returns, root: str | os.PathLike | None = None):
    """100 x `minari.get_normalized_score` (its metadata's ref_min/ref_max), on the D4RL scale."""
    import minari

    with _datasets_root(root):
        ds = minari.load_dataset(dataset_id, download=False)
        return 100.0 * np.asarray(minari.get_normalized_score(ds, np.asarray(returns, dtype=np.float64)))
