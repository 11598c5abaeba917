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
    rollout_sliding_window,
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
    """Every environment, then one result per policy pooled over them (environments are strata)."""
    per_env = {get_spec(env).name: evaluate_env(get_spec(env).name, args) for env in args.env.split(",")}
    return per_env[next(iter(per_env))] if len(per_env) == 1 else pool_strata(per_env)


def evaluate_env(env: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every policy on one environment; prints and returns {policy label: metrics}."""
    from eval.tables import print_domain_table

    options = RunOptions.from_args(args)
    if args.episodes < 1 or args.max_steps < 1:
        raise ValueError("--episodes and --max-steps must be at least 1")
    start = time.time()
    model_path = args.model.format(env=env) if args.model else str(default_model(env))
    stats_file = args.state_stats.format(env=env) if getattr(args, "state_stats", None) else None
    adapter = DecisionTransformerAdapter.from_pretrained(model_path, device=options.resolved_device(), env_name=env,
                                                         state_stats=stats_file)
    check_model(adapter.model.config, env)  # sizes; the DT paper's target if the config has none
    cfg = adapter.model.config
    target = args.target_return if args.target_return is not None else float(cfg.target_return)
    episodes = [Episode(env, i) for i in range(args.episodes)]
    config = {
        "domain": "rl", "env": env, "version": args.version, "model": model_path, "target_return": target,
        "max_steps": args.max_steps, "seed": args.seed,
        "episodes": args.episodes, "context_length": int(cfg.context_length),
        # results depend on both: float64 rollouts (adapters/decision_transformer.py) and the statistics used
        "rollout_dtype": str(ROLLOUT_DTYPE).removeprefix("torch."), "state_stats": stats_digest(adapter.model),
    }

    def evaluate_batch(policy_factory: Any, batch: list[Episode]) -> list[dict[str, Any]]:
        t0 = time.time()
        envs = [make_env(env, args.version) for _ in batch]
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

    out = Path(args.out) / env
    results = evaluate_policies(episodes, evaluate_batch, summarize(env), out, config, options)
    if not args.no_window:
        window, rows = sliding_window(adapter, env, episodes, target, config, out, args)
        results = add_reference_row(results, "sliding window (no cache)", window, rows)
    print_domain_table(f"Offline RL: {env} (D4RL-normalised score)", results, time.time() - start, options.header())
    return results


def sliding_window(adapter: Any, env: str, episodes: list[Episode], target: float, config: dict, out: Path,
                   args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The reference row: HF's evaluator re-running the last K steps each env step."""
    key, info = run_key(config, RunOptions.from_args(args))
    run = RunDir(out / slug("sliding-window"), {**key, "policy": "sliding-window"}, overwrite=args.overwrite, info=info)
    if run.finished():
        return run.metrics(), run.predictions()
    with run:
        return _sliding_window_rows(run, adapter, env, episodes, target, args)


def _sliding_window_rows(run: RunDir, adapter: Any, env: str, episodes: list[Episode], target: float,
                         args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = []
    for ep in episodes:
        t0 = time.time()
        ret = rollout_sliding_window(adapter.model, make_env(env, args.version), target, episodes=1,
                                     seed=args.seed + ep.index, device=str(adapter.device), max_steps=args.max_steps)[0]
        rows.append({"id": ep.id, "return": ret, "score": float(d4rl_normalized_score(env, ret)),
                     "kept_fraction": 1.0, "seconds": time.time() - t0})
        run.add_prediction(rows[-1])
    metrics = {**summarize(env)(rows), "policy": "sliding-window", "kept_fraction": None, "n_examples": len(rows)}
    run.finish(metrics)
    return metrics, rows
