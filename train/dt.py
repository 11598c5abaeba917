"""Train a small Decision Transformer (HF `DecisionTransformerModel`, GPT-2 backbone) on an offline dataset.

    namm-transfer train dt --data artifacts/rl/data/hopper-medium-v5.hdf5 --out artifacts/rl/dt-hopper \
        --context 64 --steps 3000
    namm-transfer train dt --data mujoco/hopper/medium-v0 --out runs/dt-hopper   # local Minari id (or folder)
    namm-transfer train dt --data artifacts/rl/data/hopper-medium-v5.hdf5 --out runs/dt-hopper-k20 \
        --context 20 --target-rule data-max --seed 1     # the public checkpoints' architecture
    namm-transfer train dt --data artifacts/rl/data/hopper-medium-v5.hdf5 --out runs/dt-hopper-pos \
        --obs pos --context 200                          # memory-dependent variant: positions only, long context

Follows the DT paper / CORL recipe: returns-to-go divided by `return_scale` (1000), states normalised with
the dataset mean/std, timestep embeddings, tanh actions (hidden 128, 3 layers, 1 head by default: the public
edbeeching checkpoints' sizes; they use K=20), trajectories sampled in proportion to their length,
AdamW with linear warmup, grad-norm clip 0.25, MSE on the predicted actions. The context is long (K=64 steps
= 192 tokens by default) so that KV-cache eviction has something to work with.

The saved folder loads with `DecisionTransformerModel.from_pretrained(dir)`; its config also carries
`state_mean`, `state_std` (lists, edbeeching format), `return_scale`, `target_return`, `env_name`,
`env_version`, `context_length` and `obs_variant` ("full", or "pos": velocities removed from the
observation, `envs.mujoco.OBS_VARIANTS`; the dataset is cut at load time and evaluation wraps the env the
same way). Return target (`config.target_return`, what evaluation conditions on unless told otherwise):
`--target-return R` if given, else by `--target-rule`: "paper" = the DT paper's per-env constant (3600 /
12000 / 5000), "data-max" = the highest return of a complete episode in the training data (after the
observation cut, which changes no return), rounded to the nearest 10. Only the trainer lives here: loading
and running a DT (statistics, return-to-go, the sliding-window evaluator) is `adapters/decision_transformer.py`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from adapters.decision_transformer import load_dt, normalize_state, rollout_sliding_window_batch
from envs.d4rl import Dataset, d4rl_normalized_score, normalized_score, select_observations
from envs.minari_data import load_dataset
from envs.mujoco import check_model, check_obs, get_spec
from train.options import TARGET_RULES, DTConfig, dt_parser  # noqa: F401  (re-exported)
from transfer.options import Parser

# ----------------------------------------------------------------------------- preprocessing


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted suffix sums: rtg[t] = sum_{t' >= t} r[t']."""
    return np.cumsum(rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)


# ----------------------------------------------------------------------------- batches


class TrajectorySampler:
    """Length-weighted windows of K steps from a Dataset, built with index arithmetic (no per-token loops)."""

    def __init__(self, data: Dataset, context: int, scale: float, max_ep_len: int, seed: int):
        self.k, self.max_ep_len = context, max_ep_len
        self.mean, self.std = data.state_stats()
        self.obs = normalize_state(np.concatenate([e.observations for e in data.episodes]), self.mean, self.std)
        self.act = np.concatenate([e.actions for e in data.episodes])
        self.rtg = np.concatenate([returns_to_go(e.rewards) for e in data.episodes]) / scale
        lengths = data.lengths
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.lengths = lengths
        self.t = np.concatenate([np.arange(n) for n in lengths])
        self.p = lengths / lengths.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> dict[str, torch.Tensor]:
        ep = self.rng.choice(len(self.lengths), size=batch, p=self.p)
        si = (self.rng.random(batch) * self.lengths[ep]).astype(np.int64)  # start inside the episode
        n_valid = np.minimum(self.k, self.lengths[ep] - si)  # (batch,)
        # left padding: slot j holds step si + j - (K - n_valid)
        j = np.arange(self.k)[None, :]  # (1, K)
        offs = j - (self.k - n_valid)[:, None]  # (batch, K)
        valid = offs >= 0
        flat = self.starts[ep][:, None] + si[:, None] + np.where(valid, offs, 0)  # (batch, K)
        mask = valid.astype(np.int64)
        obs = self.obs[flat] * valid[..., None]
        act = self.act[flat] * valid[..., None]
        rtg = self.rtg[flat] * valid
        ts = np.minimum(self.t[flat], self.max_ep_len - 1) * valid
        return {
            "states": torch.from_numpy(obs.astype(np.float32)),
            "actions": torch.from_numpy(act.astype(np.float32)),
            "rewards": torch.zeros(batch, self.k, 1),
            "returns_to_go": torch.from_numpy(rtg.astype(np.float32))[..., None],
            "timesteps": torch.from_numpy(ts.astype(np.int64)),
            "attention_mask": torch.from_numpy(mask),
        }


# ----------------------------------------------------------------------------- model I/O




def target_return(cfg: DTConfig, data: Dataset) -> float:
    """The return the model is conditioned on at evaluation: `--target-return`, else `--target-rule`
    (module docstring)."""
    if cfg.target_return is not None:
        return float(cfg.target_return)
    if cfg.target_rule == "data-max":
        return float(round(float(data.returns.max()), -1))
    return get_spec(cfg.env).target_return


def build_model(cfg: DTConfig, state_dim: int, act_dim: int, state_mean, state_std, target: float | None = None):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    spec = get_spec(cfg.env)
    mcfg = DecisionTransformerConfig(
        state_dim=state_dim, act_dim=act_dim, hidden_size=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
        # n_positions only sizes wpe, which DT never uses (it feeds position_ids = 0)
        n_inner=4 * cfg.hidden, activation_function="relu", n_positions=3 * cfg.context,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, max_ep_len=cfg.max_ep_len,
        action_tanh=True, bos_token_id=None, eos_token_id=None,  # no vocabulary: GPT-2's token ids mean nothing
    )
    mcfg.state_mean = [float(x) for x in state_mean]
    mcfg.state_std = [float(x) for x in state_std]
    mcfg.return_scale = float(cfg.return_scale)
    mcfg.target_return = float(target if target is not None else
                               cfg.target_return if cfg.target_return is not None else spec.target_return)
    mcfg.env_name = spec.name
    mcfg.env_version = cfg.version
    mcfg.obs_variant = cfg.obs
    mcfg.context_length = int(cfg.context)
    return DecisionTransformerModel(mcfg)


# ----------------------------------------------------------------------------- training


def _log(msg: str) -> None:
    print(f"[train.dt {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({torch.get_num_threads()} threads)"


def _lr_lambda(cfg: DTConfig):
    return lambda step: min(1.0, (step + 1) / max(1, cfg.warmup))


def write_curve(rows: list[dict], out: Path) -> None:
    """loss.csv (step, loss, lr) and, where matplotlib is installed, loss.png."""
    with open(out / "loss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
        w.writeheader()
        w.writerows(rows)
    try:
        plot_curve(out)
    except ImportError:
        _log("matplotlib missing: wrote loss.csv only (re-plot with plot_curve(dir))")


def plot_curve(out: Path) -> None:
    """loss.png from loss.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(Path(out) / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="per step")
    if len(loss) >= 50:
        ax.plot(steps[49:], np.convolve(loss, np.ones(50) / 50, mode="valid"), lw=1.2, label="mean of 50")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("action MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out) / "loss.png", dpi=100)
    plt.close(fig)


def validate(cfg: DTConfig) -> None:
    """Every option checked before any work, each failure one line (ValueError)."""
    if not cfg.data:
        raise ValueError("--data is required (D4RL hdf5, Minari dataset folder or local Minari id)")
    if cfg.env:
        get_spec(cfg.env)
    check_obs(cfg.obs)
    if cfg.target_rule not in TARGET_RULES:
        raise ValueError(f"--target-rule must be one of {', '.join(TARGET_RULES)}, got {cfg.target_rule!r}")
    for name in ("context", "steps", "batch_size", "hidden", "layers", "heads", "max_ep_len", "log_every",
                 "ckpt_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.hidden % cfg.heads:
        raise ValueError(f"--hidden {cfg.hidden} must be divisible by --heads {cfg.heads}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.return_scale <= 0 or cfg.lr <= 0:
        raise ValueError("--return-scale and --lr must be > 0")
    if cfg.threads < 0 or cfg.eval_episodes < 0 or cfg.eval_max_steps < 1 or cfg.warmup < 0:
        raise ValueError("--threads, --eval-episodes and --warmup must be >= 0, --eval-max-steps >= 1")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    if cfg.eval_episodes:
        from envs.mujoco import check_version

        check_version(cfg.version)


def train(cfg: DTConfig, command: str | None = None) -> dict:
    """Train, save (atomically) and optionally evaluate; resumes from `<out>.partial/resume.pt`."""
    validate(cfg)
    data = load_dataset(cfg.data, env_name=get_spec(cfg.env).name if cfg.env else None,
                        minari_root=cfg.minari_root or None)
    if data.env_name is None:
        raise ValueError(f"--data {cfg.data}: the dataset does not name its environment; pass --env")
    spec = get_spec(data.env_name)
    cfg = replace(cfg, env=spec.name)  # the model config and summary name the dataset's environment
    data = select_observations(data, cfg.obs)
    goal = target_return(cfg, data)  # (`target` below is the batch's actions)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sampler = TrajectorySampler(data, cfg.context, cfg.return_scale, cfg.max_ep_len, cfg.seed)
    model = build_model(cfg, data.obs_dim, data.act_dim, sampler.mean, sampler.std, goal).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    out = Path(cfg.out)
    partial = Path(str(out) + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    resume = partial / "resume.pt"
    rows: list[dict] = []
    step, wall = 0, 0.0
    if resume.exists():
        ck = torch.load(resume, map_location=cfg.device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step, rows, wall = ck["step"], ck["rows"], ck["wall"]
        sampler.rng = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        _log(f"resumed from {resume} at step {step}")
    _log(f"{spec.name}: {len(data)} episodes, {data.num_steps} steps, return {data.returns.mean():.1f}; "
         f"K={cfg.context}, {sum(p.numel() for p in model.parameters())} params, device {cfg.device}")
    model.train()
    t0 = time.time()
    while step < cfg.steps and not (cfg.max_minutes > 0 and wall + time.time() - t0 > 60 * cfg.max_minutes):
        batch = {k: v.to(cfg.device) for k, v in sampler.sample(cfg.batch_size).items()}
        target = batch["actions"].clone()
        pred = model(**batch).action_preds  # (batch, K, act_dim)
        m = batch["attention_mask"].unsqueeze(-1).float()
        loss = (((pred - target) ** 2) * m).sum() / (m.sum() * target.shape[-1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        rows.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = np.mean([r["loss"] for r in rows[-cfg.log_every:]])
            el = wall + time.time() - t0
            _log(f"step {step}/{cfg.steps} loss {recent:.4f} ({el:.0f}s, {step / max(el, 1e-9):.1f} steps/s)")
        if step % cfg.ckpt_every == 0 and step < cfg.steps:
            tmp = resume.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "rows": rows, "wall": wall + time.time() - t0, "rng": sampler.rng,
                        "torch_rng": torch.get_rng_state()}, tmp)
            os.replace(tmp, resume)
    wall += time.time() - t0
    model.eval()
    if cfg.save_dtype == "float16":  # round now, so that the evaluation below scores the weights that ship
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.half().float())
    summary = {"env": spec.name, "data": str(cfg.data), "dataset_episodes": len(data),
               "dataset_steps": data.num_steps, "steps_done": step, "dataset_return_mean": float(data.returns.mean()),
               "dataset_return_max": float(data.returns.max()), "target_return": goal, "obs_variant": cfg.obs,
               "dataset_metadata": {k: v for k, v in data.metadata.items()}, "train_wall_s": round(wall, 1),
               "final_loss_mean_100": float(np.mean([r["loss"] for r in rows[-100:]])),
               "device": _device_name(cfg.device),
               "host": socket.gethostname(), "torch": torch.__version__, "config": asdict(cfg),
               "command": command or "python -m train.dt " + " ".join(sys.argv[1:])}
    if cfg.eval_episodes > 0:
        summary["eval"] = evaluate(model.cpu(), spec.name, cfg.version, cfg.eval_episodes, 100,
                                   cfg.eval_max_steps, data.metadata)
    save_run(model.half() if cfg.save_dtype == "float16" else model, rows, summary, out, partial)
    return summary


def evaluate(model, env_name: str, version: str, episodes: int, seed: int, max_steps: int,
             metadata: dict | None = None) -> dict:
    """Sliding-window returns -> D4RL-normalised and dataset-normalised scores (mean, std)."""
    from envs.mujoco import make_env

    obs = getattr(model.config, "obs_variant", None) or "full"
    envs = [make_env(env_name, version, obs=obs) for _ in range(episodes)]
    t0 = time.time()
    # all episodes in lock-step: the same returns as one rollout_sliding_window call per episode, seeds seed + i
    rets = np.array(rollout_sliding_window_batch(model, envs, seeds=[seed + i for i in range(episodes)],
                                                 max_steps=max_steps))
    for env in envs:
        env.close()
    d4 = d4rl_normalized_score(env_name, rets)
    res = {"episodes": episodes, "seed": seed, "max_steps": max_steps, "target_return": model.config.target_return,
           "obs_variant": obs,
           "return_mean": float(rets.mean()), "return_std": float(rets.std()), "returns": rets.round(2).tolist(),
           "d4rl_score_mean": float(d4.mean()), "d4rl_score_std": float(d4.std()),
           "eval_wall_s": round(time.time() - t0, 1)}
    meta = metadata or {}
    if "random_return" in meta and "expert_return" in meta:
        own = normalized_score(rets, float(meta["random_return"]), float(meta["expert_return"]))
        res.update({"dataset_score_mean": float(own.mean()), "dataset_score_std": float(own.std()),
                    "random_return": float(meta["random_return"]), "expert_return": float(meta["expert_return"])})
    _log(f"eval {env_name}: return {rets.mean():.1f} +- {rets.std():.1f}, D4RL score {d4.mean():.1f}"
         + (f", dataset score {res['dataset_score_mean']:.1f}" if "dataset_score_mean" in res else ""))
    return res


def save_run(model, rows: list[dict], summary: dict, out: Path, partial: Path | None = None) -> None:
    """Model (safetensors) + loss.csv/png + summary.json into a temp dir, then swapped in for `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        write_curve(rows, tmp)
        keep = [f for f in ("PROVENANCE.md",) if (out / f).exists()]
        for f in keep:
            shutil.copy(out / f, tmp / f)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    _log(f"saved {out}")


def parse_args(argv: list[str] | None = None) -> DTConfig:
    return DTConfig(**vars(dt_parser().parse_args(argv)))


def evaluate_dir(path: str | os.PathLike, episodes: int, max_steps: int, seed: int = 100) -> dict:
    """Evaluate a saved run on CPU and record the result in its summary.json (atomically)."""
    path = Path(path)
    model = load_dt(path)
    check_model(model.config)
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if not (path / "loss.png").exists() and (path / "loss.csv").exists():
        plot_curve(path)
    meta = summary.get("dataset_metadata", {})
    res = evaluate(model, model.config.env_name, getattr(model.config, "env_version", "v5"), episodes, seed,
                   max_steps, meta)
    res["eval_host"] = socket.gethostname()
    res["eval_device"] = f"cpu ({torch.get_num_threads()} threads)"
    summary["eval"] = res
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, summary_path)
    write_provenance(path, summary)
    return res


def write_provenance(path: Path, summary: dict) -> None:
    """PROVENANCE.md rendered from summary.json (training command, data, device, metrics)."""
    c, ev, meta = summary.get("config", {}), summary.get("eval", {}), summary.get("dataset_metadata", {})
    lines = [
        f"# Decision Transformer for {summary.get('env')} ({c.get('version', 'v5')}"
        + (f", {c['obs']} observations" if c.get("obs", "full") != "full" else "") + ")", "",
        "Made by `train/dt.py`; every number below comes from `summary.json` in this folder.", "",
        *([summary["note"], ""] if summary.get("note") else []),
        "## Training",
        f"- command: `{summary.get('command')}`",
        f"- data: `{summary.get('data')}` ({summary.get('dataset_episodes')} episodes, "
        f"{summary.get('dataset_steps')} steps, mean return {summary.get('dataset_return_mean', float('nan')):.1f}; "
        f"behaviour policy: {meta.get('behaviour_policy', '?')})",
        f"- model: GPT-2 DT, hidden {c.get('hidden')}, {c.get('layers')} layers, {c.get('heads')} head, "
        f"context K={c.get('context')} steps ({3 * int(c.get('context', 0))} tokens), max_ep_len {c.get('max_ep_len')}",
        f"- optimiser: AdamW lr {c.get('lr')}, wd {c.get('weight_decay')}, warmup {c.get('warmup')}, "
        f"grad clip {c.get('grad_clip')}, batch {c.get('batch_size')}, {summary.get('steps_done')} steps "
        f"(cap {c.get('steps')} steps / {c.get('max_minutes')} min), seed {c.get('seed')}",
        f"- return target {summary.get('target_return')} ("
        + ("--target-return" if c.get("target_return") is not None else f"rule {c.get('target_rule', 'paper')}")
        + f"; best episode return in the data {summary.get('dataset_return_max', float('nan')):.1f})",
        f"- device: {summary.get('device')} on {summary.get('host')}, torch {summary.get('torch')}, "
        f"wall {summary.get('train_wall_s')} s; final loss (mean of last 100 steps) "
        f"{summary.get('final_loss_mean_100', float('nan')):.4f}; curve: loss.csv, loss.png",
    ]
    if ev:
        lines += [
            "", "## Evaluation (`rollout_sliding_window`, no cache, CPU)",
            f"- command: `python -m train.dt eval {path} --episodes {ev['episodes']} --max-steps {ev['max_steps']} "
            f"--seed {ev['seed']}` on {ev.get('eval_host')} ({ev.get('eval_device')}), {ev.get('eval_wall_s')} s",
            f"- target return {ev['target_return']}, env seeds {ev['seed']}..{ev['seed'] + ev['episodes'] - 1}",
            f"- returns: {ev['returns']}",
            f"- return {ev['return_mean']:.1f} +- {ev['return_std']:.1f}",
            f"- D4RL-normalised score (REF_MIN/REF_MAX of d4rl/infos.py): {ev['d4rl_score_mean']:.1f} "
            f"+- {ev['d4rl_score_std']:.1f}",
        ]
        if "dataset_score_mean" in ev:
            lines.append(f"- score normalised by this dataset's own random ({ev['random_return']:.1f}) / expert "
                         f"({ev['expert_return']:.1f}) returns: {ev['dataset_score_mean']:.1f} "
                         f"+- {ev['dataset_score_std']:.1f}")
    tmp = path / "PROVENANCE.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path / "PROVENANCE.md")


def main(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "eval":  # python -m train.dt eval DIR [--episodes N] [--max-steps T] [--seed S]
        p = Parser(prog="namm-transfer train dt eval",
                   description="evaluate a trained DT folder with rollout_sliding_window")
        p.add_argument("dir")
        p.add_argument("--episodes", type=int, default=5)
        p.add_argument("--max-steps", type=int, default=1000)
        p.add_argument("--seed", type=int, default=100)
        a = p.parse_args(args[1:])
        if a.episodes < 1 or a.max_steps < 1:
            raise ValueError(f"--episodes and --max-steps must be >= 1, got {a.episodes} and {a.max_steps}")
        return evaluate_dir(a.dir, a.episodes, a.max_steps, a.seed)
    cfg = parse_args(argv)
    return train(cfg, command="python -m train.dt " + " ".join(args))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # user errors: one line, as `namm-transfer train dt`
        sys.exit(f"error: {err}")
