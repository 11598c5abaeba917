"""Decision Transformer runtime (HF `DecisionTransformerModel`, edbeeching format) with a persistent KV cache.

Everything that runs a DT lives here: loading (our folders and the public
`edbeeching/decision-transformer-gym-*` checkpoints), state statistics, return-to-go, the HF-example
sliding-window rollout (the reference row: re-run the last K steps at every env step, no cache) and the
cached rollout. In the cached rollout each step appends its tokens to one KV cache that lives for the
whole episode — (a_{t-1}, R_t, s_t), embedded exactly as `DecisionTransformerModel.forward` does
(modality embedding + timestep embedding, then `embed_ln`, GPT-2 position ids all zero) — and the
memory policy manages that cache every `update_interval` tokens. The action is read from s_t's hidden
state, as in the model's own forward.

Reproducibility: every rollout runs the model in float64 and hands the env float32 actions. In float32,
the matrix kernels (MKL/oneDNN) pick their blocking, hence their summation order, by the number of rows
(episodes x tokens) and by how rows are split over threads, so the same episode's first action differs
by about 1 ulp between batch 1 and batch 3, or between 1 and 2 threads; MuJoCo's chaotic dynamics
grow that to a different return within ~100 steps (halfcheetah, one episode: 124.6 alone, 69.3 in a
batch of 3; 10.3 vs 89.4 with 1 vs 2 threads). In float64 the kernel-order noise (~1e-16 relative) sits
far below float32's quantum (6e-8), so rounding each action to float32 removes it: returns are
bit-identical across batch sizes, thread counts and kernel choices (see tests/test_rl_determinism.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from adapters.base import Adapter
from transfer.memory import KVMemory

DEFAULT_SCALE = 1000.0  # returns-to-go are divided by this (DT paper, edbeeching checkpoints)
ROLLOUT_DTYPE = torch.float64  # see the module docstring: batch- and thread-invariant rollouts
ACTION_DTYPE = torch.float32  # actions are rounded to this before the env (and the model) sees them
STATS_FILE = "state_stats.json"  # {"state_mean": [...], "state_std": [...]} beside the weights

# State normalisation of the public checkpoints, copied from each model card's "normlization coefficients"
# (https://huggingface.co/edbeeching/decision-transformer-gym-<env>-<dataset>, README.md): the public
# config.json files carry none. Not listed: halfcheetah-medium-replay, whose card gives 18 std values for
# the 17-dimensional state (its values cannot be used without guessing which one is spurious).
MODEL_CARD_STATS: dict[str, tuple[list[float], list[float]]] = {
    "hopper-medium": (
        [1.311279, -0.08469521, -0.5382719, -0.07201576, 0.04932366, 2.1066856, -0.15017354, 0.00878345,
         -0.2848186, -0.18540096, -0.28461286],
        [0.17790751, 0.05444621, 0.21297139, 0.14530419, 0.6124444, 0.85174465, 1.4515252, 0.6751696, 1.536239,
         1.6160746, 5.6072536],
    ),
    "hopper-medium-replay": (
        [1.2305138, -0.04371411, -0.44542956, -0.09370098, 0.09094488, 1.3694725, -0.19992675, -0.02286135,
         -0.5287045, -0.14465883, -0.19652697],
        [0.17565121, 0.06369286, 0.34383234, 0.19566889, 0.5547985, 1.0510299, 1.1583077, 0.79631287, 1.4802359,
         1.6540332, 5.108601],
    ),
    "hopper-expert": (
        [1.3490015, -0.11208222, -0.5506444, -0.13188992, -0.00378754, 2.6071432, 0.02322114, -0.01626922,
         -0.06840388, -0.05183131, 0.04272673],
        [0.15980862, 0.0446214, 0.14307782, 0.17629202, 0.5912333, 0.5899924, 1.5405099, 0.8152689, 2.0173461,
         2.4107876, 5.8440027],
    ),
    "halfcheetah-medium": (
        [-0.06845774, 0.01641455, -0.18354906, -0.27624607, -0.34061527, -0.09339716, -0.21321271, -0.08774239,
         5.1730075, -0.04275195, -0.03610836, 0.14053793, 0.06049833, 0.09550975, 0.067391, 0.00562739, 0.01338279],
        [0.07472999, 0.30234998, 0.3020731, 0.34417078, 0.17619242, 0.5072056, 0.25670078, 0.32948127, 1.2574149,
         0.7600542, 1.9800916, 6.5653625, 7.4663677, 4.472223, 10.566964, 5.6719327, 7.498259],
    ),
    "halfcheetah-expert": (
        [-0.04489148, 0.03232588, 0.06034835, -0.17081226, -0.19480659, -0.05751596, 0.09701628, 0.03239211,
         11.047426, -0.07997331, -0.32363534, 0.36297753, 0.42322603, 0.40836546, 1.1085187, -0.4874403, -0.0737481],
        [0.04002118, 0.4107858, 0.54217845, 0.41522816, 0.23796624, 0.62036866, 0.30100912, 0.21737163, 2.2105937,
         0.572586, 1.7255033, 11.844218, 12.06324, 7.0495934, 13.499867, 7.195647, 5.0264325],
    ),
    "walker2d-medium": (
        [1.218966, 0.14163373, -0.03704914, -0.1381431, 0.51382244, -0.0471911, -0.47288352, 0.04225416, 2.3948874,
         -0.03143199, 0.04466356, -0.02390724, -0.10134014, 0.09090938, -0.00419264, -0.12120572, -0.5497064],
        [0.12311358, 0.324188, 0.11456084, 0.26230657, 0.5640279, 0.22718786, 0.38373196, 0.7373677, 1.2387927,
         0.7980206, 1.5664079, 1.8092705, 3.0256042, 4.062486, 1.4586568, 3.744569, 5.585129],
    ),
    "walker2d-medium-replay": (
        [1.2093647, 0.13264023, -0.14371201, -0.20465161, 0.55776125, -0.03231537, -0.2784661, 0.19130707,
         1.4701707, -0.12504704, 0.05649531, -0.09991033, -0.34034026, 0.03546293, -0.08934259, -0.2992438,
         -0.5984178],
        [0.11929835, 0.3562574, 0.258522, 0.42075422, 0.5202291, 0.15685083, 0.3677098, 0.7161388, 1.3763766,
         0.8632222, 2.6364644, 3.0134118, 3.720684, 4.867284, 2.6681626, 3.845187, 5.47683867],
    ),
    "walker2d-expert": (
        [1.2384834e00, 1.9578537e-01, -1.0475016e-01, -1.8579608e-01, 2.3003316e-01, 2.2800924e-02, -3.7383768e-01,
         3.3779100e-01, 3.9250960e00, -4.7428459e-03, 2.5267061e-02, -3.9287535e-03, -1.7367510e-02, -4.8212224e-01,
         3.5432147e-04, -3.7124525e-03, 2.6285544e-03],
        [0.06664903, 0.16980624, 0.17309439, 0.21843709, 0.74599105, 0.02410989, 0.3729872, 0.6226182, 0.9708009,
         0.72936815, 1.504065, 2.495893, 3.511518, 5.3656907, 0.79503316, 4.317483, 6.1784487],
    ),
}
_PUBLIC_NAME = re.compile(r"decision-transformer-gym-([a-z0-9]+-(?:medium-replay|medium|expert))(?![a-z-])")


# ----------------------------------------------------------------------------- return-to-go and states


def normalize_state(state, mean, std):
    """(s - mean) / std with the dataset statistics stored in the model config."""
    return (state - mean) / std


def initial_rtg(target_return: float, scale: float = DEFAULT_SCALE) -> float:
    """First return-to-go token: the desired episode return in model units."""
    return float(target_return) / float(scale)


def update_rtg(rtg: float, reward: float, scale: float = DEFAULT_SCALE) -> float:
    """rtg_{t+1} = rtg_t - r_t / scale (DT paper)."""
    return rtg - float(reward) / float(scale)


def model_stats(model) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(state_mean, state_std, return_scale) from a model config; tensors in the model's dtype and device."""
    cfg = model.config
    param = next(model.parameters())
    mean = torch.tensor(cfg.state_mean, dtype=param.dtype, device=param.device)
    std = torch.tensor(cfg.state_std, dtype=param.dtype, device=param.device)
    return mean, std, float(getattr(cfg, "return_scale", DEFAULT_SCALE))


def stats_digest(model) -> str:
    """Short hash of the state statistics a model runs with (for run keys: other statistics, other run)."""
    cfg = model.config
    text = json.dumps([[float(x) for x in cfg.state_mean], [float(x) for x in cfg.state_std]])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- loading


def public_checkpoint_name(id_or_path: str | os.PathLike) -> str | None:
    """'hopper-medium' etc. for a public edbeeching DT, from a hub id or any folder on its path.

    Hub-cache folders (models--edbeeching--decision-transformer-gym-hopper-medium/snapshots/<hash>) match too.
    """
    text = str(id_or_path)
    path = Path(text)
    if path.exists():
        text = str(path.resolve())
    names = _PUBLIC_NAME.findall(text.lower())
    return names[-1] if names else None


def read_state_stats(path: str | os.PathLike) -> tuple[list[float], list[float]]:
    """state_mean/state_std lists from a JSON file ({"state_mean": [...], "state_std": [...]})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state statistics file not found: {path}")
    try:
        data = json.loads(path.read_text())
        mean, std = data["state_mean"], data["state_std"]
        mean, std = [float(x) for x in mean], [float(x) for x in std]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: expected JSON with numeric lists state_mean and state_std ({err})") from None
    return mean, std


def resolve_state_stats(
    id_or_path: str | os.PathLike, config: Any, state_stats: str | os.PathLike | None = None
) -> tuple[list[float], list[float], str]:
    """(mean, std, source): `state_stats` file, else `state_stats.json` beside the weights, else the
    config's own state_mean/state_std (our folders), else the public model card's values."""
    if state_stats is not None:
        return (*read_state_stats(state_stats), f"file {Path(state_stats).name}")
    beside = Path(id_or_path) / STATS_FILE
    if beside.is_file():
        return (*read_state_stats(beside), STATS_FILE)
    if getattr(config, "state_mean", None) is not None and getattr(config, "state_std", None) is not None:
        return [float(x) for x in config.state_mean], [float(x) for x in config.state_std], "config"
    name = public_checkpoint_name(id_or_path)
    if name in MODEL_CARD_STATS:
        mean, std = MODEL_CARD_STATS[name]
        return list(mean), list(std), f"model card {name}"
    known = ", ".join(MODEL_CARD_STATS)
    raise ValueError(
        f"{id_or_path}: no state normalisation statistics (config has no state_mean/state_std, no {STATS_FILE} "
        f"beside the weights, and no model card values known for it; known: {known}); pass --state-stats FILE"
    )


def load_dt(id_or_path: str | os.PathLike, env_name: str | None = None, device: str = "cpu",
            state_mean=None, state_std=None, state_stats: str | os.PathLike | None = None):
    """Load our folders or a public edbeeching checkpoint (pytorch_model.bin or safetensors) in eval mode.

    Statistics: `state_mean`/`state_std` arguments, else as `resolve_state_stats`; the source is kept in
    `config.state_stats_source`. Missing fields get the edbeeching defaults (return_scale 1000, context =
    config.max_length or 20); `config.env_name` is `env_name`, else the config's, else the public name's.
    Which environment fits the model (sizes, default target return) is the RL domain's check,
    `envs.mujoco.check_model`; rollouts check the env objects they are given.
    """
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    p = Path(id_or_path)
    if p.exists() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: not a model folder (no config.json)")

    def fail(e: Exception):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return FileNotFoundError(f"cannot load Decision Transformer {str(id_or_path)!r}: {first}")

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # public configs carry GPT-2's bos/eos ids (50256) for a model with no vocabulary
    try:  # the config first: statistics and sizes are checked before any weight is read
        cfg = DecisionTransformerConfig.from_pretrained(str(id_or_path))
    except (OSError, ValueError) as e:
        raise fail(e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if state_mean is not None or state_std is not None:
        if state_mean is None or state_std is None:
            raise ValueError("pass both state_mean and state_std")
        mean, std, source = [float(x) for x in state_mean], [float(x) for x in state_std], "arguments"
    else:
        mean, std, source = resolve_state_stats(id_or_path, cfg, state_stats)
    if len(mean) != cfg.state_dim or len(std) != cfg.state_dim:
        raise ValueError(f"{id_or_path}: state_mean/state_std ({source}) have {len(mean)}/{len(std)} values, "
                         f"the model's state_dim is {cfg.state_dim}")
    if not all(np.isfinite(mean)) or not all(np.isfinite(std)) or min(std) <= 0:
        raise ValueError(f"{id_or_path}: state statistics ({source}) must be finite with std > 0")
    cfg.state_mean, cfg.state_std, cfg.state_stats_source = mean, std, source
    public = public_checkpoint_name(id_or_path)
    cfg.env_name = env_name or getattr(cfg, "env_name", None) or (public.split("-")[0] if public else None)
    if getattr(cfg, "return_scale", None) is None:
        cfg.return_scale = DEFAULT_SCALE
    if getattr(cfg, "context_length", None) is None:
        cfg.context_length = int(getattr(cfg, "max_length", None) or 20)  # v5 drops max_length: K=20
    try:
        # float32 whatever the file holds (agents may ship half-precision weights): transformers 5 would
        # otherwise keep a float16 file's dtype; rollouts then run in ROLLOUT_DTYPE as always
        model = DecisionTransformerModel.from_pretrained(str(id_or_path), config=cfg, dtype=torch.float32)
    except OSError as e:
        raise fail(e) from None
    return model.to(device).eval()


def rollout_model(model):
    """The model in the rollout precision: itself if already float64, else a float64 copy (the caller's
    model, e.g. one still being trained, keeps its dtype)."""
    if next(model.parameters()).dtype == ROLLOUT_DTYPE:
        return model.eval()
    return copy.deepcopy(model).to(ROLLOUT_DTYPE).eval()


def check_spaces(config: Any, envs: list[Any]) -> None:
    """One clear error when an env's observation or action size is not the model's."""
    for env in envs:
        obs, act = tuple(env.observation_space.shape), tuple(env.action_space.shape)
        if obs != (config.state_dim,) or act != (config.act_dim,):
            raise ValueError(f"env observation/action size {obs}/{act} does not match the model's "
                             f"state_dim={config.state_dim}/act_dim={config.act_dim}")


def env_action(action: torch.Tensor) -> torch.Tensor:
    """Round predicted actions to float32: below that quantum the kernels' summation order cannot show."""
    return action.to(ACTION_DTYPE)


# ----------------------------------------------------------------------------- reference rollout


def window_inputs(states, actions, rtg, timesteps, context: int):
    """Last `context` steps of one history, left-padded with zeros and mask 0 (HF DT example `get_action`).

    states (T, obs_dim) already normalised, actions (T, act_dim) with zeros for the current step,
    rtg (T,), timesteps (T,) -> dict of batch-1 model inputs, each (1, context, ...).
    """
    states, actions = states[-context:], actions[-context:]
    rtg, timesteps = rtg[-context:], timesteps[-context:]
    pad = context - states.shape[0]
    dev = states.device

    def left(x, value=0):
        shape = (pad,) + tuple(x.shape[1:])
        return torch.cat([torch.full(shape, value, dtype=x.dtype, device=dev), x], 0).unsqueeze(0)

    mask = torch.cat([torch.zeros(pad, dtype=torch.long, device=dev), torch.ones(states.shape[0], dtype=torch.long,
                                                                                   device=dev)])
    return {
        "states": left(states),
        "actions": left(actions),
        "rewards": torch.zeros(1, context, 1, dtype=states.dtype, device=dev),  # unused by the model
        "returns_to_go": left(rtg).unsqueeze(-1),
        "timesteps": left(timesteps),
        "attention_mask": mask.unsqueeze(0),
    }


@torch.no_grad()
def rollout_sliding_window(model, env, target_return: float | None = None, context: int | None = None,
                           episodes: int = 1, seed: int = 0, device: str | torch.device = "cpu",
                           max_steps: int | None = None) -> list[float]:
    """Episode returns with the HF-example evaluator: every env step re-runs the last K steps, no cache.

    `env` is a gymnasium env; states are normalised with the config's mean/std,
    rtg starts at target_return/scale and drops by r/scale each step, the current action is zero,
    and the window is left-padded with attention_mask 0. `max_steps` shortens episodes (default 1000).
    Runs in float64 with float32 actions (module docstring).
    """
    model = rollout_model(model).to(device)
    cfg = model.config
    obs_dim, act_dim = cfg.state_dim, cfg.act_dim
    check_spaces(cfg, [env])
    mean, std, scale = model_stats(model)
    context = int(context or getattr(cfg, "context_length", None) or getattr(cfg, "max_length", 20))
    target = float(target_return if target_return is not None else cfg.target_return)
    horizon = int(max_steps or cfg.max_ep_len)
    dtype = ROLLOUT_DTYPE
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        states = torch.zeros(horizon + 1, obs_dim, dtype=dtype, device=device)  # normalised states
        actions = torch.zeros(horizon, act_dim, dtype=dtype, device=device)
        rtg = torch.zeros(horizon + 1, dtype=dtype, device=device)
        timesteps = torch.arange(horizon + 1, device=device).clamp(max=cfg.max_ep_len - 1)
        states[0] = normalize_state(torch.as_tensor(obs, dtype=dtype, device=device), mean, std)
        rtg[0] = initial_rtg(target, scale)
        ep_ret = 0.0
        for t in range(horizon):
            inp = window_inputs(states[: t + 1], actions[: t + 1], rtg[: t + 1], timesteps[: t + 1], context)
            action = env_action(model(**inp).action_preds[0, -1])
            actions[t] = action
            obs, r, term, trunc, _ = env.step(action.cpu().numpy())
            ep_ret += float(r)
            states[t + 1] = normalize_state(torch.as_tensor(obs, dtype=dtype, device=device), mean, std)
            rtg[t + 1] = update_rtg(float(rtg[t]), r, scale)
            if term or trunc:
                break
        returns.append(ep_ret)
    return returns


@torch.no_grad()
def rollout_sliding_window_batch(model, envs: list[Any], target_return: float | None = None,
                                 context: int | None = None, seeds: Sequence[int] = (0,),
                                 device: str | torch.device = "cpu", max_steps: int | None = None) -> list[float]:
    """`rollout_sliding_window` for one episode per env, all in lock-step (env i reset with seeds[i]): the
    same returns as one call per episode (float64 model, float32 actions; tests/test_dt_adapter.py), in one
    model call per env step instead of one per episode and step. `context` below the trained K is the
    short-window reference of the memory protocol (eval/rl.py --window-steps)."""
    if len(seeds) != len(envs):
        raise ValueError(f"{len(seeds)} seeds for {len(envs)} environments")
    model = rollout_model(model).to(device)
    cfg = model.config
    check_spaces(cfg, envs)
    mean, std, scale = model_stats(model)
    context = int(context or getattr(cfg, "context_length", None) or getattr(cfg, "max_length", 20))
    target = float(target_return if target_return is not None else cfg.target_return)
    horizon, n, dtype = int(max_steps or cfg.max_ep_len), len(envs), ROLLOUT_DTYPE
    states = torch.zeros(n, horizon + 1, cfg.state_dim, dtype=dtype, device=device)
    actions = torch.zeros(n, horizon, cfg.act_dim, dtype=dtype, device=device)
    rtg = np.zeros((n, horizon + 1))
    timesteps = torch.arange(horizon + 1, device=device).clamp(max=cfg.max_ep_len - 1)
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])
    states[:, 0] = normalize_state(torch.as_tensor(obs, dtype=dtype, device=device), mean, std)
    rtg[:, 0] = initial_rtg(target, scale)
    returns, alive = np.zeros(n), np.ones(n, dtype=bool)
    for t in range(horizon):
        lo = max(0, t + 1 - context)
        width = t + 1 - lo
        pad = context - width
        mask = torch.cat([torch.zeros(n, pad, dtype=torch.long, device=device),
                          torch.ones(n, width, dtype=torch.long, device=device)], 1)

        def left(x, pad=pad):  # (n, width, ...) -> (n, context, ...), zeros on the left (as window_inputs)
            return torch.cat([torch.zeros((n, pad, *x.shape[2:]), dtype=x.dtype, device=device), x], 1)

        rtg_t = torch.as_tensor(rtg[:, lo: t + 1], dtype=dtype, device=device)
        inp = {"states": left(states[:, lo: t + 1]), "actions": left(actions[:, lo: t + 1]),
               "rewards": torch.zeros(n, context, 1, dtype=dtype, device=device),
               "returns_to_go": left(rtg_t).unsqueeze(-1),
               "timesteps": left(timesteps[lo: t + 1].expand(n, width)), "attention_mask": mask}
        action = env_action(model(**inp).action_preds[:, -1])
        actions[:, t] = action
        action_np = action.cpu().numpy()
        for i, env in enumerate(envs):
            if not alive[i]:
                continue
            o, r, term, trunc, _ = env.step(action_np[i])
            returns[i] += float(r)
            states[i, t + 1] = normalize_state(torch.as_tensor(o, dtype=dtype, device=device), mean, std)
            rtg[i, t + 1] = update_rtg(float(rtg[i, t]), r, scale)
            alive[i] = not (term or trunc)
        if not alive.any():
            break
    return returns.tolist()


# ----------------------------------------------------------------------------- cached rollout


@dataclass
class RolloutResult:
    """One lock-step batch of episodes under one memory policy."""

    returns: list[float]  # episode returns (env reward sums)
    kept_fractions: list[float]  # per episode: mean over updates of the cache's kept fraction
    lengths: list[int]  # env steps per episode
    memory: KVMemory  # the batch's memory; `memory.history` holds the evictions when record=True


class DecisionTransformerAdapter(Adapter):
    family: ClassVar[str] = "decision_transformer"
    model_types: ClassVar[tuple[str, ...]] = ("decision_transformer",)

    @classmethod
    def from_pretrained(cls, id_or_path: str, device: str = "cpu", env_name: str | None = None,
                        state_stats: str | os.PathLike | None = None) -> Any:
        return cls(load_dt(id_or_path, env_name=env_name, device=device, state_stats=state_stats))

    def embed(
        self, rtg: torch.Tensor, state: torch.Tensor, prev_action: torch.Tensor | None, timestep: torch.Tensor
    ) -> torch.Tensor:
        """Tokens of one env step: (a_{t-1}, R_t, s_t), or (R_0, s_0) at t = 0, in the model's dtype.

        rtg (batch,), state (batch, state_dim) normalised, prev_action (batch, act_dim), timestep (batch,)
        -> (batch, 2 or 3, hidden)
        """
        m = self.model
        dtype = next(m.parameters()).dtype
        time = m.embed_timestep(timestep)  # (batch, hidden)
        tokens = [m.embed_return(rtg.to(dtype)[:, None]) + time, m.embed_state(state.to(dtype)) + time]
        if prev_action is not None:
            prev_time = m.embed_timestep((timestep - 1).clamp(min=0))
            tokens.insert(0, m.embed_action(prev_action.to(dtype)) + prev_time)
        return m.embed_ln(torch.stack(tokens, dim=1))

    def act(self, memory: KVMemory, tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Feed one step's tokens (batch, n, hidden); returns the predicted actions (batch, act_dim).

        Finished episodes (alive False) feed padding that nobody attends to.
        """
        valid = alive[:, None].expand(-1, tokens.shape[1]).to(self.device)

        def forward(start: int, end: int, positions: torch.Tensor) -> torch.Tensor:
            hidden = self.model.encoder(
                inputs_embeds=tokens[:, start:end],
                position_ids=torch.zeros_like(positions),  # the DT's time lives in embed_timestep
                past_key_values=memory.cache,
                use_cache=True,
            ).last_hidden_state
            return hidden[:, -1]

        hidden = self.feed(memory, tokens.shape[1], forward, valid, max_chunk=tokens.shape[1])
        return self.model.predict_action(hidden)

    @torch.no_grad()
    def rollout(
        self,
        envs: list[Any],
        policy_factory: Any,
        target_return: float,
        update_interval: int,
        seed: int | Sequence[int] = 0,
        max_steps: int | None = None,
        record: bool = False,
    ) -> RolloutResult:
        """Run one episode per env in lock-step with a persistent cache; env i is reset with seed + i, or
        with seed[i] when a list is given (an episode's seed never depends on which batch it ran in).

        The model runs in float64 (cast once, in place) and the envs get float32 actions, so an episode's
        return does not depend on its batch-mates or the thread count. The memory (with its eviction
        history if `record`) is in the result.
        """
        if next(self.model.parameters()).dtype != ROLLOUT_DTYPE:
            self.model.to(ROLLOUT_DTYPE)
        cfg = self.model.config
        mean, std, scale = model_stats(self.model)
        horizon = int(max_steps or cfg.max_ep_len)
        memory = self.new_memory(policy_factory(), update_interval=update_interval, record=record)
        n = len(envs)
        check_spaces(cfg, envs)
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(x) for x in seed]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} environments")
        obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)])
        rtg = np.full(n, initial_rtg(target_return, scale))  # float64, one per episode
        returns = np.zeros(n)
        lengths = np.zeros(n, dtype=np.int64)
        alive = torch.ones(n, dtype=torch.bool)
        action = None
        for t in range(horizon):
            state = normalize_state(torch.as_tensor(obs, dtype=ROLLOUT_DTYPE, device=self.device), mean, std)
            timestep = torch.full((n,), min(t, cfg.max_ep_len - 1), dtype=torch.long, device=self.device)
            rtg_t = torch.as_tensor(rtg, dtype=ROLLOUT_DTYPE, device=self.device)
            action = env_action(self.act(memory, self.embed(rtg_t, state, action, timestep), alive))
            action_np = action.cpu().numpy()
            for i, env in enumerate(envs):
                if not alive[i]:
                    continue
                obs_i, r, term, trunc, _ = env.step(action_np[i])
                obs[i] = obs_i
                returns[i] += r
                lengths[i] += 1
                rtg[i] = update_rtg(float(rtg[i]), r, scale)
                if term or trunc:
                    alive[i] = False
            if not alive.any():
                break
        return RolloutResult(returns.tolist(), memory.kept_fraction().tolist(), lengths.tolist(), memory)
