"""Evolve a NAMM with CMA-ES on a causal LM: the reference recipe (docs/namm-spec.md, sections 5 and 11).

- CMA-ES (the maintained `cma` package: active covariance update, elite half, c_m = 1) over the 4172
  flat BAM parameters, mean starting at 0, sigma0 = 0.065; the *mean* is the solution.
- Generation 0 of the first stage is the reference's statistics pass: all-zero parameters keep every
  token, and the per-bin EMA statistics collected there are frozen for every later stage and for eval.
- Fitness of a member = mean over the stage's tasks of (its score / the full-cache score on the same
  prompts); prompts are drawn fresh every generation.
- Stages chain: stage k starts from stage k-1's mean. A checkpoint is written after every generation
  (CMA state + log + the current mean as a NAMM in our format); rerunning the command resumes, and a
  resumed run reproduces an uninterrupted one exactly; a rerun with other options (anything but
  --device, --out, --max-minutes) is refused, naming them, unless --overwrite starts over. The CMA
  state holds cma's full covariance (about 280 MB at 4172 parameters once it is materialised), so keep
  `--out` on a roomy disk.
- Members are spread over processes/GPUs with accelerate (`accelerate launch -m transfer.cli evolve`):
  every process runs the same CMA-ES (same seeds, same gathered fitness), so their states stay
  identical and only the main process writes.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.language import DEFAULT_LM, answer_batch, load_lm, make_examples
from train.options import PRESETS  # noqa: F401  (the presets live with the options, without torch)
from train.options import add_evolve_arguments as add_arguments  # noqa: F401  (the CLI uses it)
from transfer.atomic import write_atomic, write_json_atomic
from transfer.checkpoint import save_namm
from transfer.namm import NAMMConfig, NormStats, param_size
from transfer.policies.full import FullCache
from transfer.policies.namm import NAMMPolicy
from transfer.rundir import DirLock, config_diff, model_id
from transfer.runner import process_device, process_state

NAMM_CONFIG = NAMMConfig()  # the geometry evolved: the released BAM's (docs/namm-spec.md, section 9)
# Where and how fast a run goes; every other option changes the evolved NAMM (the model enters by content).
_NOT_IN_KEY = ("device", "out", "max_minutes", "model")
_RUN_FILES = ("evolution.pkl", "log.json", "fitness.png", "config.json")

@dataclass
class EvolveConfig:
    model: str = str(DEFAULT_LM)
    stages: list[str] = field(default_factory=lambda: ["mqar"])
    generations: list[int] = field(default_factory=lambda: [3])
    popsize: int = 32
    sigma0: float = 0.065
    prompts: int = 16  # per task per generation
    length: int = 1024
    update_interval: int = 256
    batch_size: int = 16
    seed: int = 1337
    device: str = "cpu"
    out: str = "runs/evolve"
    max_minutes: float | None = None  # stop cleanly (checkpointed) after this much wall time; rerun to resume


def _stage_fitness(
    adapter: Any, tokenizer: Any, policy_factory: Any, examples: list, cfg: EvolveConfig
) -> tuple[dict[str, float], float]:
    """Mean score per task and mean kept fraction of one policy on the generation's prompts."""
    rows = []
    for start in range(0, len(examples), cfg.batch_size):
        batch = examples[start : start + cfg.batch_size]
        rows += answer_batch(adapter, tokenizer, policy_factory, batch, cfg.update_interval)
    per_task: dict[str, list[float]] = {}
    for row in rows:
        per_task.setdefault(row["task"], []).append(row["score"])
    kept = float(np.mean([r["kept_fraction"] for r in rows]))
    return {t: float(np.mean(v)) for t, v in per_task.items()}, kept


def _relative(scores: dict[str, float], full: dict[str, float]) -> float:
    """The reference fitness: mean over tasks of score / full-cache score on the same prompts."""
    return float(np.mean([scores[t] / max(full[t], 1e-3) for t in full]))


def run_key(cfg: EvolveConfig) -> dict[str, Any]:
    """What a rerun must match to resume: every result-changing option, the model by its content."""
    key = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    return {**key, "model_id": model_id(cfg.model)}


def _stored_key(stored: dict[str, Any]) -> dict[str, Any]:
    key = {k: v for k, v in stored.items() if k not in _NOT_IN_KEY}
    if "model_id" not in key:  # written before the key held the model's content
        key["model_id"] = model_id(stored.get("model"))
    return key


def check_resume(cfg: EvolveConfig) -> None:
    """Refuse to resume an evolution made with other options (a one-line error naming them)."""
    out = Path(cfg.out)
    if not (out / "evolution.pkl").exists():
        return  # nothing to resume; a config.json alone (a run that died before its first checkpoint) is replaced
    try:
        stored = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{out}: holds an evolution without a readable config.json ({e}); "
                         "pass --overwrite to start over") from None
    diff = config_diff(_stored_key(stored), run_key(cfg))
    if diff:
        raise ValueError(f"{out} holds an evolution with other options ({diff}); "
                         "pass --overwrite to start over, or choose another --out")


def _clear(out: Path) -> None:
    """--overwrite: remove a previous evolution's files (and nothing else in --out)."""
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    if (out / "namm").is_dir():
        shutil.rmtree(out / "namm")


def evolve(cfg: EvolveConfig, overwrite: bool = False) -> Path:
    """Run (or resume) every stage; returns the directory of the final NAMM. overwrite: start over."""
    state = process_state()
    out = Path(cfg.out)
    if not overwrite:
        check_resume(cfg)  # every process reads the same files: all refuse together
    lock = DirLock(out, "evolve run") if state.is_main_process else None
    if lock is not None:
        lock.acquire()
    try:
        if overwrite and state.is_main_process:
            _clear(out)
        state.wait_for_everyone()  # no process reads a checkpoint that --overwrite is removing
        return _evolve(cfg, state)
    finally:
        if lock is not None:
            lock.release()


def _namm(theta: torch.Tensor, norm: NormStats) -> NAMMPolicy:
    return NAMMPolicy(theta=theta, norm=norm, config=NAMM_CONFIG)


def _evolve(cfg: EvolveConfig, state: Any) -> Path:
    import cma

    started = time.time()
    out = Path(cfg.out)
    ckpt_file = out / "evolution.pkl"
    n_params = param_size(NAMM_CONFIG)
    device = process_device(cfg.device)
    adapter, tokenizer = load_lm(cfg.model, device)
    torch.manual_seed(cfg.seed)

    ckpt: dict[str, Any] = {"stage": 0, "generation": 0, "es": None, "norm": None, "log": []}
    if ckpt_file.exists():
        ckpt = pickle.loads(ckpt_file.read_bytes())
        if ckpt["es"] is not None:  # unpickling binds cma's sampler to a copy of numpy's global RNG
            ckpt["es"].opts["randn"] = ckpt["es"].sm.randn = np.random.randn
        if state.is_main_process:
            print(f"resuming {out}: stage {ckpt['stage'] + 1}, generation {ckpt['generation']}")
    elif state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", {**asdict(cfg), "model_id": run_key(cfg)["model_id"]})

    if ckpt["norm"] is None:  # the reference's iteration 0: full-cache statistics with all-zero parameters
        examples = make_examples(cfg.stages[0], cfg.prompts, cfg.length, cfg.seed - 1)
        stats_policy = NAMMPolicy(theta=torch.zeros(n_params), config=NAMM_CONFIG, collect_norm=True)
        _stage_fitness(adapter, tokenizer, lambda: stats_policy, examples, cfg)
        ckpt["norm"] = stats_policy.norm
    norm: NormStats = ckpt["norm"]

    while ckpt["stage"] < len(cfg.stages):
        stage, tasks = ckpt["stage"], cfg.stages[ckpt["stage"]]
        if ckpt["es"] is None:
            x0 = ckpt.get("mean_prev", np.zeros(n_params))
            ckpt["es"] = cma.CMAEvolutionStrategy(
                x0, cfg.sigma0, {"popsize": cfg.popsize, "seed": cfg.seed + stage, "verbose": -9}
            )
        es = ckpt["es"]
        while ckpt["generation"] < cfg.generations[stage]:
            if cfg.max_minutes is not None and time.time() - started > 60 * cfg.max_minutes:
                if state.is_main_process:
                    print(f"time budget of {cfg.max_minutes} min reached; rerun the same command to resume")
                state.wait_for_everyone()
                return out / "namm"
            gen = ckpt["generation"]
            t0 = time.time()
            np.random.seed(cfg.seed + 7919 * stage + gen)  # identical samples on every process and on resume
            members = es.ask()
            examples = make_examples(tasks, cfg.prompts, cfg.length, cfg.seed + 100_003 * (stage + 1) + gen)
            full, _ = _stage_fitness(adapter, tokenizer, FullCache, examples, cfg)
            mine = list(range(len(members)))
            with state.split_between_processes(mine) as share:
                local = []
                for i in share:
                    theta = torch.tensor(members[i], dtype=torch.float32)
                    scores, kept = _stage_fitness(
                        adapter, tokenizer, lambda t=theta: _namm(t, norm), examples, cfg
                    )
                    local.append((i, _relative(scores, full), kept))
            if state.num_processes > 1:
                from accelerate.utils import gather_object

                local = gather_object(local)
            results = sorted(local)
            fitness = [f for _, f, _ in results]
            kept = [k for _, _, k in results]
            es.tell(members, [-f for f in fitness])  # cma minimises
            mean_theta = torch.tensor(es.mean, dtype=torch.float32)
            mean_scores, mean_kept = _stage_fitness(
                adapter, tokenizer, lambda t=mean_theta: _namm(t, norm), examples, cfg
            )
            entry = {
                "stage": stage + 1, "tasks": tasks, "generation": gen + 1, "best_fitness": max(fitness),
                "mean_member_fitness": float(np.mean(fitness)), "mean_fitness": _relative(mean_scores, full),
                "mean_kept_fraction": mean_kept, "member_kept_fraction": float(np.mean(kept)),
                "full_cache_scores": full, "sigma": float(es.sigma), "seconds": time.time() - t0,
            }
            ckpt["log"].append(entry)
            ckpt["generation"] = gen + 1
            if state.is_main_process:
                print(
                    f"stage {stage + 1} gen {gen + 1}/{cfg.generations[stage]}  best {entry['best_fitness']:.3f}  "
                    f"members {entry['mean_member_fitness']:.3f}  mean {entry['mean_fitness']:.3f}  "
                    f"kept {100 * mean_kept:.1f}%  sigma {es.sigma:.4f}  {entry['seconds']:.1f}s",
                    flush=True,
                )
                _save(out, ckpt, mean_theta, norm, cfg)
        ckpt["mean_prev"] = np.asarray(es.mean)
        ckpt["stage"], ckpt["generation"], ckpt["es"] = stage + 1, 0, None
        if state.is_main_process:
            _save(out, ckpt, torch.tensor(ckpt["mean_prev"], dtype=torch.float32), norm, cfg)
    state.wait_for_everyone()
    return out / "namm"


def _save(out: Path, ckpt: dict, theta: torch.Tensor, norm: NormStats, cfg: EvolveConfig) -> None:
    """Checkpoint (atomic), the current mean as a NAMM, the log and the fitness curve."""
    write_atomic(out / "evolution.pkl", pickle.dumps(ckpt))
    provenance = {"made_by": "namm-transfer evolve", "config": asdict(cfg), "generations_done": len(ckpt["log"])}
    save_namm(out / "namm", theta, norm, NAMM_CONFIG, provenance=provenance)
    write_json_atomic(out / "log.json", ckpt["log"])
    plot_fitness(ckpt["log"], out / "fitness.png")


def plot_fitness(log: list[dict], path: Path) -> None:
    """Fitness (best member, member mean, CMA mean) and the mean's kept fraction per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log:
        return
    x = np.arange(1, len(log) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(x, [e["best_fitness"] for e in log], label="best member")
    ax1.plot(x, [e["mean_member_fitness"] for e in log], label="member average")
    ax1.plot(x, [e["mean_fitness"] for e in log], label="CMA mean (the solution)", lw=2)
    ax1.axhline(1.0, color="gray", ls=":", label="full cache")
    ax1.set_xlabel("generation (all stages)")
    ax1.set_ylabel("fitness = score / full-cache score")
    ax1.legend(fontsize=8)
    ax2.plot(x, [100 * e["mean_kept_fraction"] for e in log], color="C3")
    ax2.set_xlabel("generation (all stages)")
    ax2.set_ylabel("kept cache % (CMA mean)")
    for i in range(1, len(log)):
        if log[i]["stage"] != log[i - 1]["stage"]:
            for ax in (ax1, ax2):
                ax.axvline(i + 0.5, color="k", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    preset = dict(PRESETS[args.preset])
    overrides = {
        "stages": args.stages, "generations": args.generations, "popsize": args.popsize, "prompts": args.prompts,
        "length": args.length, "update_interval": args.update_interval,
    }
    preset.update({k: v for k, v in overrides.items() if v is not None})
    if len(preset["generations"]) != len(preset["stages"]):
        raise ValueError(f"--generations needs one count per stage ({len(preset['stages'])} stages)")
    cfg = EvolveConfig(model=args.model, batch_size=args.batch_size, seed=args.seed,
                       device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                       out=args.out, max_minutes=args.max_minutes, **preset)
    final = evolve(cfg, overwrite=args.overwrite)
    if not process_state().is_main_process:
        return 0
    print(f"NAMM written to {final}; log and fitness curve in {cfg.out}")
    print(json.dumps(json.loads((Path(cfg.out) / "log.json").read_text())[-1], indent=1))
    return 0
