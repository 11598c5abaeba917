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
- The whole population goes through the LM together (`train/population.py`): members are stacked along
  the batch, one NAMM per block of rows, `--batch-size` rows (members x prompts) per forward. Each
  generation is two kinds of pass: the full cache on the generation's prompts, and the CMA mean that
  sampled the generation together with its members (`mean_fitness` in the log is that mean's).
- Members are spread over processes/GPUs with accelerate (`accelerate launch -m transfer.cli evolve`):
  every process runs the same CMA-ES (same seeds, same gathered fitness), so their states stay
  identical and only the main process writes.
- `--seeds A B C` runs one evolution per seed in `--out`/seed-A, ... (each resumable, each with its own
  curve) and draws `fitness_seeds.png` over all of them; `--measure-noise K` measures instead how noisy
  the fitness is (`noise.json`, see `measure_noise`).
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.language import DEFAULT_LM, load_lm, make_examples
from train.options import PRESETS  # noqa: F401  (the presets live with the options, without torch)
from train.options import add_evolve_arguments as add_arguments  # noqa: F401  (the CLI uses it)
from train.population import answer_groups
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
_RUN_FILES = ("evolution.pkl", "log.json", "norm.json", "fitness.png", "config.json")
SEED_DIR = "seed-{}"  # --seeds: one run folder per evolution seed under --out

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
    batch_size: int = 16  # rows (members x prompts) per forward pass
    seed: int = 1337
    device: str = "cpu"
    out: str = "runs/evolve"
    max_minutes: float | None = None  # stop cleanly (checkpointed) after this much wall time; rerun to resume


def _summary(rows: list[dict[str, Any]]) -> tuple[dict[str, float], float]:
    """Mean score per task and mean kept fraction of one policy's answered rows."""
    per_task: dict[str, list[float]] = {}
    for row in rows:
        per_task.setdefault(row["task"], []).append(row["score"])
    kept = float(np.mean([r["kept_fraction"] for r in rows]))
    return {t: float(np.mean(v)) for t, v in per_task.items()}, kept


def _evaluate(adapter: Any, tokenizer: Any, factories: list[Any], examples: list, cfg: EvolveConfig,
              ) -> list[tuple[dict[str, float], float]]:
    """(mean score per task, mean kept fraction) of each policy on the same examples, in batched passes."""
    groups = [(factory, examples) for factory in factories]
    return [_summary(rows) for rows in answer_groups(adapter, tokenizer, groups, cfg.update_interval,
                                                     cfg.batch_size)]


def _stage_fitness(
    adapter: Any, tokenizer: Any, policy_factory: Any, examples: list, cfg: EvolveConfig
) -> tuple[dict[str, float], float]:
    """Mean score per task and mean kept fraction of one policy on the generation's prompts."""
    return _evaluate(adapter, tokenizer, [policy_factory], examples, cfg)[0]


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
    if not (out / "evolution.pkl").exists() and not _replayable(out):
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
    for folder in [out / "namm", *out.glob("namm-stage*")]:
        if folder.is_dir():
            shutil.rmtree(folder)


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


def _member(theta: np.ndarray, norm: NormStats) -> Any:
    """A policy factory for one CMA-ES candidate (a float64 vector from cma)."""
    t = torch.tensor(theta, dtype=torch.float32)
    return lambda: _namm(t, norm)


def _norm_stats(adapter: Any, tokenizer: Any, cfg: EvolveConfig) -> NormStats:
    """The reference's iteration 0: full-cache statistics with all-zero parameters on stage-1 prompts."""
    examples = make_examples(cfg.stages[0], cfg.prompts, cfg.length, cfg.seed - 1)
    stats_policy = NAMMPolicy(theta=torch.zeros(param_size(NAMM_CONFIG)), config=NAMM_CONFIG, collect_norm=True)
    _stage_fitness(adapter, tokenizer, lambda: stats_policy, examples, cfg)
    return stats_policy.norm


def _evolve(cfg: EvolveConfig, state: Any) -> Path:

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
    elif _replayable(out):
        ckpt = replay(cfg, json.loads((out / "log.json").read_text()), _read_norm(out / "norm.json"))
        if state.is_main_process:
            print(f"resuming {out} by replaying its log (no evolution.pkl): stage {ckpt['stage'] + 1}, "
                  f"generation {ckpt['generation']}")
    elif state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", {**asdict(cfg), "model_id": run_key(cfg)["model_id"]})

    if ckpt["norm"] is None:
        ckpt["norm"] = _norm_stats(adapter, tokenizer, cfg)
    norm: NormStats = ckpt["norm"]

    computed = 0  # generations this call: at least one is computed whatever the budget, so every call progresses
    while ckpt["stage"] < len(cfg.stages):
        stage, tasks = ckpt["stage"], cfg.stages[ckpt["stage"]]
        if ckpt["es"] is None:
            ckpt["es"] = _new_strategy(cfg, stage, ckpt.get("mean_prev", np.zeros(n_params)))
        es = ckpt["es"]
        while ckpt["generation"] < cfg.generations[stage]:
            if computed and cfg.max_minutes is not None and time.time() - started > 60 * cfg.max_minutes:
                if state.is_main_process:
                    print(f"time budget of {cfg.max_minutes} min reached; rerun the same command to resume")
                state.wait_for_everyone()
                return out / "namm"
            gen = ckpt["generation"]
            t0 = time.time()
            sampler_mean, members = _ask(ckpt, cfg, stage, gen)
            examples = make_examples(tasks, cfg.prompts, cfg.length, cfg.seed + 100_003 * (stage + 1) + gen)
            full, _ = _stage_fitness(adapter, tokenizer, FullCache, examples, cfg)
            thetas = [sampler_mean, *members]  # 0: the CMA mean, then the members; all in batched passes
            with state.split_between_processes(list(range(len(thetas)))) as share:
                factories = [_member(thetas[i], norm) for i in share]
                local = [(i, _relative(scores, full), kept) for i, (scores, kept)
                         in zip(share, _evaluate(adapter, tokenizer, factories, examples, cfg))]
            if state.num_processes > 1:
                from accelerate.utils import gather_object

                local = gather_object(local)
            results = sorted(local)
            (_, mean_fit, mean_kept), rest = results[0], results[1:]
            fitness = [f for _, f, _ in rest]
            kept = [k for _, _, k in rest]
            es.tell(members, [-f for f in fitness])  # cma minimises
            mean_theta = torch.tensor(es.mean, dtype=torch.float32)
            entry = {
                "stage": stage + 1, "tasks": tasks, "generation": gen + 1, "best_fitness": max(fitness),
                "mean_member_fitness": float(np.mean(fitness)), "mean_fitness": mean_fit,
                "mean_kept_fraction": mean_kept, "member_kept_fraction": float(np.mean(kept)),
                "member_fitness": fitness, "full_cache_scores": full, "sigma": float(es.sigma),
                "seconds": time.time() - t0,
            }
            ckpt["log"].append(entry)
            ckpt["generation"] = gen + 1
            computed += 1
            if state.is_main_process:
                if len(ckpt["log"]) == 1:
                    _write_norm(out / "norm.json", norm)
                print(
                    f"stage {stage + 1} gen {gen + 1}/{cfg.generations[stage]}  best {entry['best_fitness']:.3f}  "
                    f"members {entry['mean_member_fitness']:.3f}  mean {entry['mean_fitness']:.3f}  "
                    f"kept {100 * mean_kept:.1f}%  sigma {es.sigma:.4f}  {entry['seconds']:.1f}s",
                    flush=True,
                )
                _save(out, ckpt, mean_theta, norm, cfg)
        _end_stage(ckpt, stage)
        if state.is_main_process:
            stage_mean = torch.tensor(ckpt["mean_prev"], dtype=torch.float32)
            _save(out, ckpt, stage_mean, norm, cfg, plot=False)  # the log did not change
            save_namm(out / f"namm-stage{stage + 1}", stage_mean, norm, NAMM_CONFIG,
                      provenance={"made_by": "namm-transfer evolve", "config": asdict(cfg), "stage": stage + 1})
    state.wait_for_everyone()
    return out / "namm"


def _new_strategy(cfg: EvolveConfig, stage: int, x0: np.ndarray) -> Any:
    import cma

    return cma.CMAEvolutionStrategy(x0, cfg.sigma0, {"popsize": cfg.popsize, "seed": cfg.seed + stage, "verbose": -9})


def _ask(ckpt: dict, cfg: EvolveConfig, stage: int, gen: int) -> tuple[np.ndarray, list]:
    """One generation's sampling mean and members, identical on every process, on resume and on replay."""
    es = ckpt["es"]
    np.random.seed(cfg.seed + 7919 * stage + gen)
    sampler_mean = np.array(es.mean, dtype=np.float64)  # the mean that samples this generation
    starts = ckpt.setdefault("stage_start", [])  # each stage's starting mean, as CMA-ES holds it
    if len(starts) == stage:
        starts.append(sampler_mean)
    return sampler_mean, es.ask()


def _end_stage(ckpt: dict, stage: int) -> None:
    ckpt["mean_prev"] = np.asarray(ckpt["es"].mean)
    ckpt["stage"], ckpt["generation"], ckpt["es"] = stage + 1, 0, None


def replay(cfg: EvolveConfig, log: list[dict], norm: NormStats) -> dict[str, Any]:
    """The checkpoint an evolution had after the generations in `log`, rebuilt without any LM call.

    CMA-ES is deterministic given its samples and their fitness: each generation's samples come from a
    seeded draw (`_ask`) and `log.json` holds every member's fitness, so telling the strategy the logged
    fitness again reproduces its state exactly. This is how a run resumes where `evolution.pkl` (the full
    covariance: ~280 MB for 4172 parameters) cannot be carried, e.g. from a GPU machine's 64 MiB of output.
    """
    n_params = param_size(NAMM_CONFIG)
    ckpt: dict[str, Any] = {"stage": 0, "generation": 0, "es": None, "norm": norm, "log": []}
    for entry in log:
        stage, gen = entry["stage"] - 1, entry["generation"] - 1
        if (stage, gen) != (ckpt["stage"], ckpt["generation"]):
            raise ValueError(f"log.json: generation {entry['generation']} of stage {entry['stage']} is out of order")
        if ckpt["es"] is None:
            ckpt["es"] = _new_strategy(cfg, stage, ckpt.get("mean_prev", np.zeros(n_params)))
        _, members = _ask(ckpt, cfg, stage, gen)
        if len(members) != len(entry["member_fitness"]):
            raise ValueError(f"log.json: {len(entry['member_fitness'])} fitness values for {len(members)} members")
        ckpt["es"].tell(members, [-f for f in entry["member_fitness"]])
        ckpt["log"].append(entry)
        ckpt["generation"] = gen + 1
        if ckpt["generation"] == cfg.generations[stage]:
            _end_stage(ckpt, stage)
    return ckpt


def _replayable(out: Path) -> bool:
    return (out / "log.json").is_file() and (out / "norm.json").is_file()


def _write_norm(path: Path, norm: NormStats) -> None:
    """The frozen statistics in full precision (the NAMM checkpoint stores float32): replay needs them exact."""
    write_json_atomic(path, {"mean": norm.mean.double().tolist(), "var": norm.var.double().tolist(),
                             "count": int(norm.count)})


def _read_norm(path: Path) -> NormStats:
    d = json.loads(path.read_text())
    return NormStats(torch.tensor(d["mean"], dtype=torch.float64), torch.tensor(d["var"], dtype=torch.float64),
                     int(d["count"]))


def _save(out: Path, ckpt: dict, theta: torch.Tensor, norm: NormStats, cfg: EvolveConfig, plot: bool = True) -> None:
    """Checkpoint (atomic), the current mean as a NAMM, the log and the fitness curve."""
    write_atomic(out / "evolution.pkl", pickle.dumps(ckpt))
    provenance = {"made_by": "namm-transfer evolve", "config": asdict(cfg), "generations_done": len(ckpt["log"])}
    save_namm(out / "namm", theta, norm, NAMM_CONFIG, provenance=provenance)
    write_json_atomic(out / "log.json", ckpt["log"])
    if plot:
        plot_fitness(ckpt["log"], out / "fitness.png")


def plot_fitness(log: list[dict], path: Path) -> None:
    """Fitness (best member, member mean, CMA mean) and the mean's kept fraction per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not log:
        return
    x = np.arange(1, len(log) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(x, [e["best_fitness"] for e in log], label="best member")
    ax1.plot(x, [e["mean_member_fitness"] for e in log], label="member average")
    ax1.plot(x, [e["mean_fitness"] for e in log], label="CMA mean that sampled the generation", lw=2)
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
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_seeds(root: Path) -> Path | None:
    """One overlay of every seed's run under `root` (seed-*/log.json): CMA mean and best member per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    logs = {}
    for log_file in sorted(root.glob("seed-*/log.json")):
        log = json.loads(log_file.read_text())
        if log:
            logs[log_file.parent.name] = log
    if not logs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, log) in enumerate(logs.items()):
        x = np.arange(1, len(log) + 1)
        ax.plot(x, [e["mean_fitness"] for e in log], color=f"C{i}", lw=2, label=f"{name}: CMA mean")
        ax.plot(x, [e["best_fitness"] for e in log], color=f"C{i}", lw=0.8, ls="--", label=f"{name}: best member")
    longest = max(logs.values(), key=len)
    for i in range(1, len(longest)):
        if longest[i]["stage"] != longest[i - 1]["stage"]:
            ax.axvline(i + 0.5, color="k", alpha=0.2)
    ax.axhline(1.0, color="gray", ls=":", label="full cache")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation (all stages)")
    ax.set_ylabel("fitness = score / full-cache score")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = root / "fitness_seeds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- fitness noise


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's correlation)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None  # a constant ranking has no correlation
    return float(np.corrcoef(ra, rb)[0, 1])


def noise_summary(rel: np.ndarray, tasks: list[str]) -> dict[str, Any]:
    """What CMA-ES sees of the fitness on one task set. rel (draws, members, tasks): score / full-cache score.

    noise: a fixed member's fitness over fresh prompt draws; spread: members' fitness on one draw;
    signal: the members' true spread (the variance of their draw-means less the noise's share);
    rank_correlation: Spearman of the members' fitness between two draws (1: the ranking is all signal,
    0: all noise), averaged over pairs of draws.
    """
    fit = rel.mean(-1)  # (draws, members)
    k = fit.shape[0]
    noise_var = fit.var(0, ddof=1).mean()
    signal_var = max(0.0, float(fit.mean(0).var(ddof=1) - noise_var / k))
    pairs = [_spearman(fit[i], fit[j]) for i in range(k) for j in range(i + 1, k)]
    pairs = [c for c in pairs if c is not None]
    return {
        "tasks": tasks,
        "member0_fitness": [float(f) for f in fit[:, 0]],
        "member0_std": float(fit[:, 0].std(ddof=1)),
        "noise_std": float(np.sqrt(noise_var)),
        "population_spread_std": float(fit.std(1, ddof=1).mean()),
        "signal_std": float(np.sqrt(signal_var)),
        "rank_correlation": float(np.mean(pairs)) if pairs else None,
        "per_task_noise_std": {t: float(rel[:, :, i].std(0, ddof=1).mean()) for i, t in enumerate(tasks)},
    }


def measure_noise(cfg: EvolveConfig, k: int, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate generation 1's population (+ the full cache) on `k` fresh prompt draws; write noise.json.

    Every stage's fitness is a mean over task scores, so one measurement on all tasks of all stages
    gives each stage's numbers (`noise_summary` per stage). The stage-1 starting mean (all zeros) keeps
    every token and scores exactly 1, so the fixed member is generation 1's first member. Draw seeds are
    disjoint from the evolution's. Noise falls as 1/sqrt(prompts): at n prompts per task expect
    noise_std * sqrt(prompts / n).
    """
    import cma

    if k < 2:
        raise ValueError("--measure-noise needs at least 2 draws")
    out = Path(cfg.out)
    path = out / "noise.json"
    key = {**run_key(cfg), "draws": k}
    if path.exists() and not overwrite:
        stored = json.loads(path.read_text())
        diff = config_diff(_stored_key(stored.get("config", {})), key)
        if diff:
            raise ValueError(f"{path} was measured with other options ({diff}); pass --overwrite to measure again")
        return stored
    device = process_device(cfg.device)
    adapter, tokenizer = load_lm(cfg.model, device)
    torch.manual_seed(cfg.seed)
    norm = _norm_stats(adapter, tokenizer, cfg)
    tasks = list(dict.fromkeys(t.strip() for stage in cfg.stages for t in stage.split(",")))
    n_params = param_size(NAMM_CONFIG)
    es = cma.CMAEvolutionStrategy(np.zeros(n_params), cfg.sigma0, {"popsize": cfg.popsize, "seed": cfg.seed,
                                                                    "verbose": -9})
    np.random.seed(cfg.seed)  # generation 1 of stage 1, as `evolve` samples it
    members = es.ask()
    factories = [_member(m, norm) for m in members]
    rel = np.zeros((k, len(members), len(tasks)))
    kept, seconds, full_scores = [], [], []
    for d in range(k):
        t0 = time.time()
        examples = make_examples(",".join(tasks), cfg.prompts, cfg.length, cfg.seed + 9_000_011 + 100_003 * d)
        full, _ = _stage_fitness(adapter, tokenizer, FullCache, examples, cfg)
        for m, (scores, kept_m) in enumerate(_evaluate(adapter, tokenizer, factories, examples, cfg)):
            rel[d, m] = [scores[t] / max(full[t], 1e-3) for t in tasks]
            kept.append(kept_m)
        seconds.append(time.time() - t0)
        full_scores.append(full)
        print(f"noise draw {d + 1}/{k}: member fitness {rel[d].mean(-1).mean():.3f} "
              f"(sd {rel[d].mean(-1).std(ddof=1):.3f}) full {full}  {seconds[-1]:.1f}s", flush=True)
    stages = []
    for stage in cfg.stages:
        idx = [tasks.index(t.strip()) for t in stage.split(",")]
        stages.append(noise_summary(rel[:, :, idx], [tasks[i] for i in idx]))
    result = {
        "config": {**asdict(cfg), "model_id": key["model_id"], "draws": k},
        "draws": k, "members": len(members), "prompts_per_task": cfg.prompts, "length": cfg.length,
        "member_kept_fraction": float(np.mean(kept)), "full_cache_scores": full_scores,
        "seconds_per_draw": seconds, "stages": stages,
        "relative_scores": rel.round(6).tolist(),  # (draws, members, tasks) in the order of `tasks`
        "tasks": tasks,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result


def run(args: argparse.Namespace) -> int:
    preset = dict(PRESETS[args.preset])
    overrides = {
        "stages": args.stages, "generations": args.generations, "popsize": args.popsize, "prompts": args.prompts,
        "length": args.length, "update_interval": args.update_interval, "batch_size": args.batch_size,
    }
    preset.update({k: v for k, v in overrides.items() if v is not None})
    if len(preset["generations"]) != len(preset["stages"]):
        raise ValueError(f"--generations needs one count per stage ({len(preset['stages'])} stages)")
    preset.setdefault("batch_size", 16)
    preset["model"] = args.model or preset.get("model", str(DEFAULT_LM))
    cfg = EvolveConfig(seed=args.seed,
                       device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                       out=args.out, max_minutes=args.max_minutes, **preset)
    main = process_state().is_main_process
    if args.measure_noise is not None:
        result = measure_noise(cfg, args.measure_noise, overwrite=args.overwrite)
        if main:
            for i, st in enumerate(result["stages"], 1):
                print(f"stage {i} ({','.join(st['tasks'])}): one member over {result['draws']} draws: sd "
                      f"{st['member0_std']:.4f}; noise sd {st['noise_std']:.4f}; population spread sd "
                      f"{st['population_spread_std']:.4f}; signal sd {st['signal_std']:.4f}; rank correlation "
                      f"between draws {st['rank_correlation']}")
            print(f"written to {Path(cfg.out) / 'noise.json'}")
        return 0
    if not args.seeds:
        final = evolve(cfg, overwrite=args.overwrite)
        if main:
            print(f"NAMM written to {final}; log and fitness curve in {cfg.out}")
            print(json.dumps(json.loads((Path(cfg.out) / "log.json").read_text())[-1], indent=1))
        return 0
    started = time.time()
    for seed in args.seeds:
        left = None if args.max_minutes is None else args.max_minutes - (time.time() - started) / 60
        if left is not None and left <= 0:
            if main:
                print(f"time budget of {args.max_minutes} min reached before seed {seed}; rerun to resume")
            break
        seed_cfg = replace(cfg, seed=seed, out=str(Path(args.out) / SEED_DIR.format(seed)), max_minutes=left)
        final = evolve(seed_cfg, overwrite=args.overwrite)
        if main:
            print(f"seed {seed}: NAMM written to {final}")
            plot_seeds(Path(args.out))
    if main:
        print(f"curves per seed in {args.out}/seed-*/fitness.png, all seeds in {args.out}/fitness_seeds.png")
    return 0
