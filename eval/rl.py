"""Offline RL: Decision Transformer agents in MuJoCo under every memory policy.

CLI: `namm-transfer eval rl`. Protocol (documented in the README): one persistent KV cache per episode
(tokens a_{t-1}, R_t, s_t), the policy runs every `update_interval` tokens, the target return is the DT
paper's for the environment unless given; the native sliding-window evaluator (recompute the last K
steps, no cache) is reported as the reference row. Scores are D4RL-normalised with D4RL's reference
returns; episodes of one policy run in lock-step (vectorised) with a shared batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from adapters.decision_transformer import (
    ROLLOUT_DTYPE,
    DecisionTransformerAdapter,
    rollout_sliding_window_batch,
    stats_digest,
)
from envs.d4rl import d4rl_normalized_score
from envs.mujoco import check_model, get_spec, make_env
from eval.options import DEFAULT_ENVS  # noqa: F401  (the options, defaults included, import no torch)
from eval.options import add_rl_arguments as add_arguments  # noqa: F401  (reproduce and the CLI use it)
from transfer.rundir import RunDir, slug
from transfer.runner import (
    RunOptions,
    add_reference_row,
    attach_stats,
    evaluate_policies,
    pool_strata,
    run_key,
)

ROOT = Path(__file__).resolve().parents[1]


def default_model(env: str) -> Path:
    return ROOT / "artifacts" / "rl" / f"dt-{get_spec(env).name}"


class Episode:
    def __init__(self, env: str, index: int) -> None:
        self.id, self.env, self.index = f"{env}-{index}", env, index


def summarize(env: str):
    def fn(rows: list[dict[str, Any]]) -> dict[str, Any]:
        returns = np.array([r["return"] for r in rows])
        norm = np.asarray(d4rl_normalized_score(env, returns), dtype=float)
        return {
            "score": float(norm.mean()), "score_std": float(norm.std()), "return": float(returns.mean()),
            "return_std": float(returns.std()), "kept_fraction": float(np.mean([r["kept_fraction"] for r in rows])),
            "seconds": float(sum(r["seconds"] for r in rows)),
        }

    return fn


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every environment (and training seed), then one result per policy pooled over them (environments
    are strata; the episodes of every training seed are units of their environment's stratum)."""
    seeds = parse_steps(args.train_seeds, "--train-seeds", minimum=0) if getattr(args, "train_seeds", None) else []
    per_env = {}
    for env in args.env.split(","):
        name = get_spec(env).name
        if seeds:
            from eval.tables import print_domain_table

            per_env[name] = pool_seeds({s: evaluate_env(name, args, s) for s in seeds})
            print_domain_table(f"Offline RL: {name}, training seeds {args.train_seeds} pooled (D4RL-normalised score)",
                               per_env[name], header=RunOptions.from_args(args).header())
        else:
            per_env[name] = evaluate_env(name, args)
    return per_env[next(iter(per_env))] if len(per_env) == 1 else pool_strata(per_env)


def parse_steps(text: str, option: str, minimum: int = 1) -> list[int]:
    """'8,16,32' -> [8, 16, 32] (distinct integers >= minimum); anything else is one error naming `option`."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum or len(set(values)) != len(values):
        raise ValueError(f"{option} {text!r}: give distinct comma-separated integers >= {minimum}, e.g. 8,16,32")
    return values


def pool_seeds(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One environment's results over several training seeds -> one result per label: every seed's episodes are
    units of one stratum (ids prefixed `s<seed>/`), so each policy is paired with the others on the same
    (seed, episode) pairs; `per_task` holds each seed's own score."""
    labels = [label for label in next(iter(per_seed.values()))
              if all(label in r for r in per_seed.values()) and all(r[label].get("units") for r in per_seed.values())
              and "seed_scores" not in next(iter(per_seed.values()))[label]]
    results: dict[str, dict[str, Any]] = {}
    units: dict[str, list] = {}
    for label in labels:
        parts = {s: r[label] for s, r in per_seed.items()}
        kept = [m.get("kept_fraction") for m in parts.values()]
        results[label] = {"policy": label, "per_task": {f"seed {s}": m.get("score") for s, m in parts.items()},
                          "kept_fraction": None if None in kept else sum(kept) / len(kept),
                          "train_seeds": sorted(parts)}
        units[label] = [(u[0], f"s{s}/{u[1]}", f"s{s}/{u[2]}", u[3]) for s, m in parts.items() for u in m["units"]]
    return attach_stats(results, units)


def evaluate_env(env: str, args: argparse.Namespace, train_seed: int | None = None) -> dict[str, dict[str, Any]]:
    """Every policy on one environment (one training seed's model); prints and returns {policy label: metrics}."""
    from eval.tables import print_domain_table

    options = RunOptions.from_args(args)
    if args.episodes < 1 or args.max_steps < 1:
        raise ValueError("--episodes and --max-steps must be at least 1")
    windows = parse_steps(args.window_steps, "--window-steps") if getattr(args, "window_steps", None) else []
    start = time.time()
    fields = {"env": env, "seed": train_seed}
    if args.model and train_seed is not None and "{seed}" not in args.model:
        raise ValueError("--train-seeds needs '{seed}' in --model (e.g. runs/dt-{env}-s{seed})")
    model_path = args.model.format(**fields) if args.model else str(default_model(env))
    stats_file = args.state_stats.format(**fields) if getattr(args, "state_stats", None) else None
    adapter = DecisionTransformerAdapter.from_pretrained(model_path, device=options.resolved_device(), env_name=env,
                                                         state_stats=stats_file)
    check_model(adapter.model.config, env)  # sizes (per observation variant); the DT paper's target if none
    cfg = adapter.model.config
    obs = cfg.obs_variant
    target = args.target_return if args.target_return is not None else float(cfg.target_return)
    episodes = [Episode(env, i) for i in range(args.episodes)]
    config = {
        "domain": "rl", "env": env, "version": args.version, "model": model_path, "target_return": target,
        "max_steps": args.max_steps, "seed": args.seed,
        "episodes": args.episodes, "context_length": int(cfg.context_length),
        # results depend on both: float64 rollouts (adapters/decision_transformer.py) and the statistics used
        "rollout_dtype": str(ROLLOUT_DTYPE).removeprefix("torch."), "state_stats": stats_digest(adapter.model),
    }
    if obs != "full":  # only then: the keys of earlier full-observation runs stay valid
        config["obs_variant"] = obs

    def evaluate_batch(policy_factory: Any, batch: list[Episode]) -> list[dict[str, Any]]:
        t0 = time.time()
        envs = [make_env(env, args.version, obs=obs) for _ in batch]
        result = adapter.rollout(
            envs, policy_factory, target, options.update_interval, seed=[args.seed + ep.index for ep in batch],
            max_steps=args.max_steps,
        )
        seconds = (time.time() - t0) / len(batch)
        return [
            {"id": ep.id, "return": ret, "score": float(d4rl_normalized_score(env, ret)), "kept_fraction": k,
             "steps": n, "seconds": seconds}
            for ep, ret, k, n in zip(batch, result.returns, result.kept_fractions, result.lengths)
        ]

    out = Path(args.out) / env / ("" if train_seed is None else f"s{train_seed}")
    results = evaluate_policies(episodes, evaluate_batch, summarize(env), out, config, options)
    if not args.no_window:
        for k in [None, *windows]:  # the trained context first, then the short windows of the memory protocol
            label = "sliding window (no cache)" if k is None else f"sliding window K={k}"
            window, rows = sliding_window(adapter, env, episodes, target, config, out, args, k)
            results = add_reference_row(results, label, window, rows)
    title = f"Offline RL: {env}" + (f" ({obs} observations)" if obs != "full" else "") + (
        f", training seed {train_seed}" if train_seed is not None else "")
    print_domain_table(f"{title} (D4RL-normalised score)", results, time.time() - start, options.header())
    return results


def sliding_window(adapter: Any, env: str, episodes: list[Episode], target: float, config: dict, out: Path,
                   args: argparse.Namespace, context: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A reference row: HF's evaluator re-running the last K steps each env step (K = `context`, default the
    model's trained context), no cache; the episodes of a batch run in lock-step (same returns as one by one)."""
    key, info = run_key(config, RunOptions.from_args(args))
    name = "sliding-window" if context is None else f"sliding-window-k{context}"
    key = {**key, "policy": "sliding-window"} | ({} if context is None else {"window_steps": context})
    run = RunDir(out / slug(name), key, overwrite=args.overwrite, info=info)
    if run.finished():
        return run.metrics(), run.predictions()
    with run:
        return _sliding_window_rows(run, adapter, env, episodes, target, args, context)


def _sliding_window_rows(run: RunDir, adapter: Any, env: str, episodes: list[Episode], target: float,
                         args: argparse.Namespace, context: int | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    done = {row["id"]: row for row in run.completed()}
    todo = [ep for ep in episodes if ep.id not in done]
    obs = adapter.model.config.obs_variant
    size = max(1, int(getattr(args, "batch_size", 1)))
    for start in range(0, len(todo), size):
        batch = todo[start: start + size]
        t0 = time.time()
        rets = rollout_sliding_window_batch(adapter.model, [make_env(env, args.version, obs=obs) for _ in batch],
                                            target, context, [args.seed + ep.index for ep in batch],
                                            device=str(adapter.device), max_steps=args.max_steps)
        for ep, ret in zip(batch, rets):
            done[ep.id] = {"id": ep.id, "return": ret, "score": float(d4rl_normalized_score(env, ret)),
                           "kept_fraction": 1.0, "seconds": (time.time() - t0) / len(batch)}
            run.add_prediction(done[ep.id])
    rows = [done[ep.id] for ep in episodes]
    label = "sliding-window" if context is None else f"sliding-window-k{context}"
    metrics = {**summarize(env)(rows), "policy": label, "kept_fraction": None, "n_examples": len(rows)}
    run.finish(metrics)
    return metrics, rows
