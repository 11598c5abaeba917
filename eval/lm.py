"""Language (source domain): synthetic long-context tasks and the long-context benchmarks (LongBench,
InfiniteBench, ChouBun, read from local files with `--data`) on a causal LM under every memory policy.

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

from tasks import longbench, synthetic
from tasks.language import (  # noqa: F401  (make_examples: eval/reproduce.py imports it from here)
    DEFAULT_LM,
    answer_batch,
    context_limit,
    encode_benchmark_examples,
    load_lm,
    make_examples,
    make_task_examples,
    resolve_chat,
)
from transfer.options import positive_int
from transfer.runner import RunOptions, add_run_arguments, evaluate_policies

# The tasks the shipped LM solves with its full cache (see its PROVENANCE.md); all of them:
# niah_single,niah_multikey,mqar,vt,fwe,passage (any HF causal LM can be evaluated on every task).
DEFAULT_TASKS = "niah_single,vt,fwe"
HELDOUT_SEED = 20261127  # evolution and training use other seeds


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score per task, their mean, the mean over the tasks of each benchmark (LongBench's average is
    the mean over its tasks), and the mean kept fraction."""
    per_task: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        per_task[row["task"]].append(row["score"])
    task_means = {t: sum(v) / len(v) for t, v in per_task.items()}
    per_bench: dict[str, list[float]] = defaultdict(list)
    for task, mean in task_means.items():
        per_bench[task.partition("/")[0] if "/" in task else "synthetic"].append(mean)
    return {
        "score": sum(task_means.values()) / len(task_means),
        "per_task": task_means,
        "per_benchmark": {b: sum(v) / len(v) for b, v in per_bench.items()},
        "kept_fraction": sum(r["kept_fraction"] for r in rows) / len(rows),
    }


def add_benchmark_arguments(p: argparse.ArgumentParser) -> None:
    """--data, --max-length, --chat-template: how benchmark tasks (`longbench/<task>`, ...) are read and prompted."""
    p.add_argument("--data", default=None,
                   help="folder with the benchmark files in their public layouts (LongBench data/<task>.jsonl, "
                        "InfiniteBench <task>.jsonl, ChouBun config/ + data/; also looked up in its LongBench/, "
                        "InfiniteBench/, ChouBun/ subfolders), or longbench=DIR,infinitebench=DIR,choubun=DIR")
    p.add_argument("--max-length", type=int, default=0,
                   help="benchmark prompts longer than this many tokens keep their first and last halves "
                        "(LongBench's model2maxlen); 0: the model's context minus the task's generation length "
                        "(no cropping under dynamic RoPE scaling, as the reference)")
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="wrap benchmark prompts in the tokenizer's chat template (not on LongBench's few-shot and "
                        "code tasks); auto: when the tokenizer has one")


def tasks_help() -> str:
    bench = "; ".join(f"{b}/<{', '.join(t)}>" for b, t in longbench.BENCHMARKS.items())
    return f"comma-separated tasks: synthetic ({', '.join(synthetic.TASKS)}) and benchmark tasks {bench}"


def check_tasks(tasks: str, data: str | None) -> dict[str, Path]:
    """Every task name known and every benchmark task given a --data folder, before any model loads."""
    names = [t.strip() for t in tasks.split(",")]
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks {tasks!r} names a task twice")
    folders = longbench.parse_data(data)
    for name in names:
        if longbench.is_benchmark_task(name):
            bench, _ = longbench.split_task(name)
            if bench not in folders:
                raise ValueError(f"task {name} needs --data (a folder with the {bench} files, or {bench}=DIR)")
        elif name not in synthetic.TASKS:
            raise ValueError(f"unknown task {name!r}; synthetic tasks: {', '.join(synthetic.TASKS)}; "
                             "benchmark tasks are written longbench/<task>, infinitebench/<task>, choubun/<task>")
    return folders


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_LM), help="HF causal LM id or path (default: the shipped tiny LM)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=tasks_help())
    p.add_argument("--limit", "--n", dest="limit", type=positive_int, default=16, help="examples per task")
    p.add_argument("--length", type=positive_int, default=2048,
                   help="synthetic prompt length in tokens (at most the model's positions)")
    p.add_argument("--allow-extrapolation", action="store_true",
                   help="allow --length beyond the model's max_position_embeddings")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED, help="example seed (held out from evolution)")
    add_benchmark_arguments(p)
    add_run_arguments(p, batch_size=8, out="runs/lm")


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    options = RunOptions.from_args(args)
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.length < 16:
        raise ValueError(f"--length must be at least 16 tokens, got {args.length}")
    max_length = getattr(args, "max_length", 0) or 0
    if max_length < 0 or max_length == 1:
        raise ValueError(f"--max-length must be 0 (the model's context) or at least 2 tokens, got {max_length}")
    data = check_tasks(args.tasks, getattr(args, "data", None))
    start = time.time()
    examples = make_task_examples(args.tasks, args.limit, args.length, args.seed, data)  # files read before the model
    benchmark = [ex for ex in examples if isinstance(ex, longbench.LongExample)]
    adapter, tokenizer = load_lm(args.model, options.resolved_device())
    positions = context_limit(adapter.model.config)
    if positions and args.length > positions and not getattr(args, "allow_extrapolation", False) and any(
            not isinstance(ex, longbench.LongExample) for ex in examples):
        raise ValueError(f"--length {args.length} exceeds the model's {positions} positions (max_position_embeddings);"
                         f" use --length <= {positions}, or --allow-extrapolation to run anyway")
    config = {"domain": "lm", "model": args.model, "tasks": args.tasks, "n": args.limit, "length": args.length,
              "seed": args.seed}
    out = Path(args.out) / f"len{args.length}"
    if benchmark:
        from tasks.metrics import metric_tokenizers

        chat = resolve_chat(tokenizer, getattr(args, "chat_template", "auto"))
        context = context_limit(adapter.model.config)
        encode_benchmark_examples(benchmark, tokenizer, max_length or None, chat, context)
        config.update(max_length=max_length or None, context=context, chat_template=chat,
                      examples=longbench.fingerprint(benchmark), metric_tokenizers=metric_tokenizers())
        out = Path(args.out) / f"tasks-{longbench.short_hash(config)}"
    results = evaluate_policies(
        examples,
        lambda factory, batch: answer_batch(adapter, tokenizer, factory, batch, options.update_interval),
        summarize, out, config, options,
    )
    from eval.tables import print_domain_table

    title = "Language (long-context tasks)" if benchmark else "Language (synthetic long-context tasks)"
    print_domain_table(title, results, time.time() - start, options.header())
    if benchmark:
        print_benchmark_averages(results)
    return results


def print_benchmark_averages(results: dict[str, dict[str, Any]]) -> None:
    """One line per policy: each benchmark's average over its tasks (LongBench: mean of the task scores)."""
    for label, m in results.items():
        per = m.get("per_benchmark") or {}
        if per:
            print(f"{label}: " + ", ".join(f"{b} average {100 * v:.2f}" for b, v in per.items()))
