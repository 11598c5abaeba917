"""The loop every domain evaluation shares: policies x examples, resumable, with matched budgets.

A domain evaluator (eval/lm.py, eval/rl.py, eval/video.py) supplies the examples and a function that
evaluates one batch of them under one policy; this module builds the policies, runs the NAMM first
when baselines are to be matched to its memory, skips finished work, shows progress and writes run
directories (config, predictions.jsonl, metrics.json).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from transfer.policies import make_policy
from transfer.rundir import RunDir, fingerprint, slug


@dataclass(frozen=True)
class PolicySpec:
    """A policy name with its budget: tokens (int), a kept fraction (float), 'match' or None."""

    name: str
    budget: float | int | str | None = None

    @property
    def label(self) -> str:
        if self.budget is None:
            return self.name
        return f"{self.name}@{self.budget}"


def parse_policies(names: str, budgets: str | None = None) -> list[PolicySpec]:
    """'full,h2o,l2,namm' x budgets '0.25,0.5' or 'match' -> specs (budgets apply to budgeted policies).

    full and namm take no budget by default; `namm@0.5` style sets one explicitly (budget mode).
    """
    from transfer.policies import BUDGETED, POLICIES

    budget_list: list[Any] = [_parse_budget(b) for b in (budgets or "match").split(",")]
    specs = []
    for item in names.split(","):
        name, _, explicit = item.strip().partition("@")
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(POLICIES)}")
        if explicit:
            specs.append(PolicySpec(name, _parse_budget(explicit)))
        elif name in BUDGETED:
            specs.extend(PolicySpec(name, b) for b in budget_list)
        else:
            specs.append(PolicySpec(name))
    # The NAMM runs first so that 'match' budgets can read its kept fractions.
    return sorted(specs, key=lambda s: (s.name != "namm" or s.budget is not None, s.name != "full"))


def _parse_budget(text: str) -> float | int | str:
    text = text.strip()
    if text == "match":
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"budget must be a token count, a fraction in (0, 1] or 'match', got {text!r}") from None
    if value <= 0:
        raise ValueError(f"budget must be positive, got {text!r}")
    return value if value <= 1 else int(value)


def run_examples(
    run: RunDir,
    examples: Sequence[Any],
    evaluate_batch: Callable[[list[Any]], list[dict[str, Any]]],
    batch_size: int = 1,
    description: str = "",
) -> list[dict[str, Any]]:
    """Evaluate the examples not yet in run's predictions, batch by batch; returns all rows in order.

    Each example needs an `id`; `evaluate_batch` returns one row (with that id) per example. Under
    `accelerate launch` the unfinished examples are split between the processes, the rows gathered,
    and only the main process writes.
    """
    state = process_state()
    done = {row["id"]: row for row in run.predictions()}
    todo = [ex for ex in examples if ex.id not in done]
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        with state.split_between_processes(todo) as mine:
            local = [row for start in range(0, len(mine), batch_size)
                     for row in evaluate_batch(list(mine[start : start + batch_size]))]
        for row in gather_object(local):
            if row["id"] not in done and state.is_main_process:
                run.add_prediction(row)
            done[row["id"]] = row
        state.wait_for_everyone()
        return [done[ex.id] for ex in examples]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task(description or run.path.name, total=len(examples), completed=len(examples) - len(todo))
        for start in range(0, len(todo), batch_size):
            for row in evaluate_batch(list(todo[start : start + batch_size])):
                run.add_prediction(row)
                done[row["id"]] = row
            progress.advance(bar, min(batch_size, len(todo) - start))
    return [done[ex.id] for ex in examples]


def process_state() -> Any:
    """accelerate's process state; on a machine without CUDA, processes talk over gloo on the CPU."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_device(requested: str) -> str:
    """Each process of `accelerate launch` takes its own GPU; otherwise the requested device."""
    state = process_state()
    if state.num_processes > 1 and requested.startswith("cuda"):
        return str(state.device)
    return requested


def build_policy(spec: PolicySpec, namm: str | None, matched: float | None, namm_precision: str = "fp32") -> Any:
    """The policy object for one batch; `matched` is the NAMM's kept fraction on that batch."""
    budget = spec.budget
    if budget == "match":
        if matched is None:
            raise ValueError(f"{spec.label}: no NAMM run to match; include 'namm' in the policies")
        budget = float(min(max(matched, 1e-3), 1.0))
    kwargs = {"precision": namm_precision} if spec.name == "namm" else {}
    return make_policy(spec.name, budget=budget, namm=namm, **kwargs)


def evaluate_policies(
    specs: Sequence[PolicySpec],
    examples: Sequence[Any],
    evaluate_batch: Callable[[Any, list[Any]], list[dict[str, Any]]],
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
    out_dir: str | Path,
    config: dict[str, Any],
    namm: str | None = None,
    batch_size: int = 1,
    namm_precision: str = "fp32",
) -> dict[str, dict[str, Any]]:
    """Run every policy over the examples; returns {policy label: metrics} and writes run dirs.

    evaluate_batch(policy_factory, batch) gets a zero-argument factory so each sequence/episode gets
    a fresh policy; rows must hold `id` and `kept_fraction`.
    """
    from transfer.policies.namm import DEFAULT_NAMM

    results: dict[str, dict[str, Any]] = {}
    namm_kept: dict[str, float] = {}
    # Weights fingerprints: a retrained model or NAMM is a different run, never a finished one.
    config = {**config, "model_sha": fingerprint(config.get("model")), "namm": namm,
              "namm_sha": fingerprint(namm or DEFAULT_NAMM)}
    if namm_precision != "fp32":  # recorded only when set, so runs made before the option stay reusable
        config["namm_precision"] = namm_precision
    for spec in specs:
        run = RunDir(Path(out_dir) / slug(spec.label), {**config, "policy": asdict(spec)})
        if run.finished():
            metrics, rows = run.metrics(), run.predictions()
        else:

            def batch_fn(batch: list[Any], spec: PolicySpec = spec, kept: dict = namm_kept) -> list[dict[str, Any]]:
                matched = None
                values = [kept[ex.id] for ex in batch if ex.id in kept and math.isfinite(kept[ex.id])]
                if spec.budget == "match" and values:  # failed examples (NaN) have no fraction to match
                    matched = sum(values) / len(values)
                rows = evaluate_batch(lambda: build_policy(spec, namm, matched, namm_precision), batch)
                for row in rows:
                    row["policy"] = spec.label
                return rows

            label = f"{config.get('domain', '')} {spec.label}"
            rows = run_examples(run, examples, batch_fn, batch_size, description=label)
            metrics = {**summarize(rows), "policy": spec.label, "n_examples": len(rows)}
            if _is_main():
                run.write_metrics(metrics)
        results[spec.label] = metrics
        if spec.name == "namm" and spec.budget is None:
            namm_kept = {row["id"]: row["kept_fraction"] for row in rows}
    return results


def _is_main() -> bool:
    return process_state().is_main_process
