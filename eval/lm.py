"""Language (source domain): synthetic long-context tasks on a causal LM under every memory policy.

CLI: `namm-transfer eval lm`. Per policy it reports accuracy per task and the kept-cache fraction with
paired bootstrap CIs (prompts resampled within tasks), and writes the language row of the result
tables. Examples, model loading and answering live in `tasks/language.py`, shared with evolution.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tasks import synthetic
from tasks.language import DEFAULT_LM, answer_batch, load_lm, make_examples
from transfer.runner import RunOptions, add_run_arguments, evaluate_policies

# The tasks the shipped LM solves with its full cache (see its PROVENANCE.md); all of them:
# niah_single,niah_multikey,mqar,vt,fwe,passage (any HF causal LM can be evaluated on every task).
DEFAULT_TASKS = "niah_single,vt,fwe"
HELDOUT_SEED = 20261127  # evolution and training use other seeds


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score per task, their mean, and the mean kept fraction."""
    per_task: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        per_task[row["task"]].append(row["score"])
    task_means = {t: sum(v) / len(v) for t, v in per_task.items()}
    return {
        "score": sum(task_means.values()) / len(task_means),
        "per_task": task_means,
        "kept_fraction": sum(r["kept_fraction"] for r in rows) / len(rows),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_LM), help="HF causal LM id or path (default: the shipped tiny LM)")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated synthetic tasks, from: {', '.join(synthetic.TASKS)}")
    p.add_argument("--limit", "--n", dest="limit", type=int, default=16, help="examples per task")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED, help="example seed (held out from evolution)")
    add_run_arguments(p, batch_size=8, out="runs/lm")


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    options = RunOptions.from_args(args)
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.length < 16:
        raise ValueError(f"--length must be at least 16 tokens, got {args.length}")
    start = time.time()
    adapter, tokenizer = load_lm(args.model, options.resolved_device())
    examples = make_examples(args.tasks, args.limit, args.length, args.seed)
    config = {"domain": "lm", "model": args.model, "tasks": args.tasks, "n": args.limit, "length": args.length,
              "seed": args.seed}
    results = evaluate_policies(
        examples,
        lambda factory, batch: answer_batch(adapter, tokenizer, factory, batch, options.update_interval),
        summarize, Path(args.out) / f"len{args.length}", config, options,
    )
    from eval.tables import print_domain_table

    print_domain_table("Language (synthetic long-context tasks)", results, time.time() - start, options.header())
    return results
