"""The loop every domain evaluation shares: policies x examples, resumable, with matched budgets.

A domain evaluator (eval/lm.py, eval/rl.py, eval/video.py) adds the shared options with
`add_run_arguments`, supplies its examples and a function that evaluates one batch of them under one
policy, and calls `evaluate_policies`. This module builds the policies (one protected set for all of
them, random-NAMM controls, budgets matched to the NAMM's measured memory), runs the NAMM first when
baselines are to be matched to it, skips finished work, shows progress, writes run directories
(config, predictions.jsonl, metrics.json) and attaches paired bootstrap CIs (transfer/stats.py).

Rows returned by `evaluate_batch` hold `id`, `score`, `kept_fraction`, and optionally `stratum` (a task
or environment: units are resampled within it) and `unit` (the resampling unit when several rows share
one input, e.g. the questions of one video).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transfer.atomic import write_json_atomic
from transfer.log import LOG_FILE, track
from transfer.options import (  # noqa: F401  (add_run_arguments is re-exported: domains import it from here)
    DEFAULT_CONTROLS,
    DEFAULT_PROTECT_RECENT,
    DEFAULT_PROTECT_SINK,
    DEFAULT_UPDATE_INTERVAL,
    add_run_arguments,
)
from transfer.rundir import RunDir, code_fingerprint, model_id, slug
from transfer.stats import PairedBootstrap, units_of

REFERENCE = "full"
STOPPED_EARLY = 3  # exit status of a command that stopped at --max-minutes (rerun it to resume)


class TimeBudgetReached(Exception):
    """--max-minutes passed: the rows so far are saved and the same command resumes from them."""

    def __init__(self, minutes: float) -> None:
        super().__init__(f"time budget of {minutes:g} min reached; rerun the same command to resume")
COST_FILE = "cost.json"  # per run: wall seconds and peak memory (machine-dependent, so not in metrics.json)


@dataclass(frozen=True)
class PolicySpec:
    """A policy name with its budget (tokens int, kept fraction float, 'match' or None) and control seed."""

    name: str
    budget: float | int | str | None = None
    seed: int | None = None

    @property
    def label(self) -> str:
        label = self.name if self.seed is None else f"{self.name}:s{self.seed}"
        if self.budget is None:
            return label
        budget = f"{self.budget}t" if isinstance(self.budget, int) else self.budget
        return f"{label}@{budget}"

    @property
    def group(self) -> str:
        return control_group(self.label)


def control_group(label: str) -> str:
    """The label without its control seed ('namm-random:s3@match' -> 'namm-random@match'): the controls of
    one budget form one row of a table."""
    return re.sub(r":s\d+(?=@|$)", "", label)


def parse_budget(text: str) -> float | int | str:
    """'match', a kept fraction in (0, 1], or a token count written '512t'; anything else is an error."""
    text = text.strip()
    if text == "match":
        return text
    if re.fullmatch(r"\d+t", text):
        tokens = int(text[:-1])
        if tokens < 1:
            raise ValueError(f"budget {text!r}: a token budget must be at least 1t")
        return tokens
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise ValueError(f"budget {text!r}: use a kept fraction in (0, 1], a token count such as 512t, or 'match'")
    return value


def parse_policies(names: str, budgets: str | None = None, controls: int = DEFAULT_CONTROLS) -> list[PolicySpec]:
    """'full,h2o,l2,namm,namm-random' x budgets '0.25,0.5' or 'match' -> specs.

    Budgeted policies get every budget; full and namm none (`namm@0.5` sets one: budget mode);
    `namm-random` becomes `controls` seeds. The NAMM without budget runs first so that 'match' can
    read its kept fractions.
    """
    if controls < 1:
        raise ValueError(f"--controls must be at least 1, got {controls}")
    from transfer.policies import POLICIES  # here: the policies import torch, `--help` must not

    budget_list = [parse_budget(b) for b in (budgets or "match").split(",")]
    specs = []
    for item in names.split(","):
        name, _, explicit = item.strip().partition("@")
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(POLICIES)}")
        rule = POLICIES[name].budget_rule
        if explicit and rule == "none":
            raise ValueError(f"policy {name!r} takes no budget")
        own = [parse_budget(explicit)] if explicit else (budget_list if rule == "required" else [None])
        seeds = range(controls) if name == "namm-random" else [None]
        specs.extend(PolicySpec(name, b, s) for b in own for s in seeds)
    if len({s.label for s in specs}) != len(specs):
        raise ValueError(f"--policies {names!r} names a policy twice")
    return sorted(specs, key=lambda s: (s.name != "namm" or s.budget is not None, s.name != REFERENCE))


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class RunOptions:
    """The shared options as one object: what `evaluate_policies` needs besides the domain's callbacks."""

    policies: str = "full,h2o,l2,namm,namm-random"
    budget: str = "match"
    controls: int = DEFAULT_CONTROLS
    protect_recent: int = DEFAULT_PROTECT_RECENT
    protect_sink: int = DEFAULT_PROTECT_SINK
    namm: str | None = None
    namm_precision: str = "fp32"
    update_interval: int = DEFAULT_UPDATE_INTERVAL
    batch_size: int = 8
    device: str | None = None
    overwrite: bool = False
    max_minutes: float | None = None  # wall-time cap from `started`, checked after every batch
    started: float = field(default_factory=time.time, compare=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        """The first call on a Namespace fixes its start time, so --max-minutes bounds the whole command (every
        environment of `eval rl`, not each one)."""
        if getattr(args, "started", None) is None:
            args.started = time.time()
        options = cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)})
        options.check()
        return options

    def check(self) -> None:
        """Every option checked before any run directory is written (one-line errors)."""
        from transfer.memory import check_update_interval

        check_update_interval(self.update_interval)
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.protect_recent < 0 or self.protect_sink < 0:
            raise ValueError("--protect-recent and --protect-sink must be >= 0")
        self.specs()

    def specs(self) -> list[PolicySpec]:
        return parse_policies(self.policies, self.budget, self.controls)

    @property
    def deadline(self) -> float | None:
        return None if self.max_minutes is None else self.started + 60 * self.max_minutes

    def resolved_device(self) -> str:
        import torch

        return process_device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def protection(self) -> dict[str, int]:
        return {"protect_recent": self.protect_recent, "protect_sink": self.protect_sink}

    def header(self) -> str:
        """What every table built from these options states in its header."""
        return (f"protected: newest {self.protect_recent} and first {self.protect_sink} tokens for every policy; "
                f"update every {self.update_interval} tokens")


# ------------------------------------------------------------------------------------------ running
def run_examples(
    run: RunDir,
    examples: Sequence[Any],
    evaluate_batch: Callable[[list[Any]], list[dict[str, Any]]],
    batch_size: int = 1,
    description: str = "",
    step: tuple[int, int] | None = None,
    deadline: tuple[float, float] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the examples not yet in run's predictions, batch by batch; returns all rows in order.

    Each example needs an `id`; `evaluate_batch` returns one row (with that id) per example. Progress
    (transfer/log.py): bars on a terminal, plain lines with elapsed time and ETA otherwise, and the
    run's own `log.txt`; `step=(i, n)` says this is run i of n (the overall progress and its ETA).
    `deadline=(time, minutes)`: past that time.time(), stop after the current batch (TimeBudgetReached;
    the rows so far are saved, so rerunning resumes).
    Under `accelerate launch` the unfinished examples are split between the processes, the rows
    gathered, and only the main process writes.
    """
    state = process_state()
    done = {row["id"]: row for row in run.completed()}
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
    if not todo:
        return [done[ex.id] for ex in examples]
    log_file = run.path / LOG_FILE if run.writer else None
    with track(description or run.path.name, len(examples), len(examples) - len(todo), step, log_file) as progress:
        for start in range(0, len(todo), batch_size):
            for row in evaluate_batch(list(todo[start : start + batch_size])):
                run.add_prediction(row)
                done[row["id"]] = row
            progress.advance(min(batch_size, len(todo) - start), computed=min(start + batch_size, len(todo)))
            if deadline is not None and time.time() > deadline[0] and start + batch_size < len(todo):
                raise TimeBudgetReached(deadline[1])
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


def build_policy(spec: PolicySpec, options: RunOptions, matched: float | None) -> Any:
    """The policy object for one batch; `matched` is the NAMM's kept fraction on that batch."""
    budget = spec.budget
    if budget == "match":
        if matched is None:
            raise ValueError(f"{spec.label}: no NAMM run to match; include 'namm' in the policies")
        budget = float(min(max(matched, 1e-3), 1.0))
    kwargs: dict[str, Any] = dict(options.protection)
    if spec.name.startswith("namm"):
        kwargs["precision"] = options.namm_precision
    if spec.seed is not None:
        kwargs["seed"] = spec.seed
    from transfer.policies import make_policy

    return make_policy(spec.name, budget=budget, namm=options.namm, **kwargs)


def run_key(config: dict[str, Any], options: RunOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run key, info): the key holds every option that changes results (the code as a fingerprint of its
    sources, the model and NAMM by content so a copied runs/ folder still matches, the protection, the
    update interval, the batch size); paths go into `info`, beside the key, never into it."""
    from transfer.checkpoint import resolve_namm

    namm_path = resolve_namm(options.namm)
    info = {"model_path": str(config.get("model")), "namm_path": str(namm_path)}
    key = {**config, "model": model_id(config.get("model")), "namm": model_id(namm_path), "code": code_fingerprint(),
           "update_interval": options.update_interval, "batch_size": options.batch_size, **options.protection}
    if options.namm_precision != "fp32":
        key["namm_precision"] = options.namm_precision
    return key, info


class RunCost:
    """Wall time and peak accelerator memory of one policy run, written to the run's `cost.json`.

    Kept out of metrics.json on purpose: costs depend on the machine and its load, results must not, so
    tables stay byte-identical across machines while `reproduce` still reports what each run cost
    (report/costs.md). The peak is `torch.cuda.max_memory_allocated` since the run started (None on the
    CPU); seconds cover only the examples computed in this call (a resumed run counts its own part).
    """

    def __init__(self, run_path: Path, computed: int, writer: bool = True) -> None:
        self.path, self.computed, self.writer = Path(run_path) / COST_FILE, computed, writer

    def __enter__(self) -> RunCost:
        import time

        import torch

        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        import time

        import torch

        if exc_type is not None or not self.writer or self.computed <= 0:
            return
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        device = torch.cuda.get_device_name() if self.cuda else "cpu"
        write_json_atomic(self.path, {"seconds": round(seconds, 3), "examples_computed": self.computed,
                                      "seconds_per_example": round(seconds / self.computed, 4),
                                      "peak_memory_gib": None if peak is None else round(peak, 3),
                                      "device": device})


def evaluate_policies(
    examples: Sequence[Any],
    evaluate_batch: Callable[[Callable[[], Any], list[Any]], list[dict[str, Any]]],
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
    out_dir: str | Path,
    config: dict[str, Any],
    options: RunOptions,
    units: Callable[[list[dict[str, Any]]], list[tuple[str, str, str, float]]] = units_of,
) -> dict[str, dict[str, Any]]:
    """Run every policy over the examples; returns {policy label: metrics} and writes run dirs.

    evaluate_batch(policy_factory, batch) gets a zero-argument factory so each sequence/episode gets
    a fresh policy. Metrics hold the domain's summary plus `score`, `n` (units) and the paired
    bootstrap CI (`ci`, and `delta`/`delta_ci` against the full cache) over the same units for all
    policies, and `units` for tables that pool several runs (e.g. environments). `units(rows)` turns a
    run's rows into bootstrap units (default: one per row, `stratum`/`unit` fields if present).
    """
    results: dict[str, dict[str, Any]] = {}
    all_rows: dict[str, list[dict[str, Any]]] = {}
    namm_kept: dict[str, float] = {}
    config, info = run_key(config, options)
    specs = options.specs()
    computed = False  # a capped call computes at least one batch, so rerunning it always makes progress
    for step, spec in enumerate(specs, 1):
        run = RunDir(Path(out_dir) / slug(spec.label), {**config, "policy": asdict(spec)},
                     overwrite=options.overwrite, writer=_is_main(), info=info)
        if run.finished():
            metrics, rows = run.metrics(), run.predictions()
        else:
            if computed and options.deadline is not None and time.time() > options.deadline:
                raise TimeBudgetReached(options.max_minutes)
            computed = True

            def batch_fn(batch: list[Any], spec: PolicySpec = spec, kept: dict = namm_kept) -> list[dict[str, Any]]:
                matched = None
                values = [kept[ex.id] for ex in batch if ex.id in kept and math.isfinite(kept[ex.id])]
                if spec.budget == "match" and values:  # failed examples (NaN) have no fraction to match
                    matched = sum(values) / len(values)
                rows = evaluate_batch(lambda: build_policy(spec, options, matched), batch)
                for row in rows:
                    row["policy"] = spec.label
                return rows

            label = " ".join(str(p) for p in (config.get("domain"), config.get("env"), spec.label) if p)
            with run, RunCost(run.path, len(examples) - len(run.completed()), run.writer):
                deadline = None if options.deadline is None else (options.deadline, options.max_minutes)
                rows = run_examples(run, examples, batch_fn, options.batch_size, description=label,
                                    step=(step, len(specs)), deadline=deadline)
                metrics = {**summarize(rows), "policy": spec.label, "n_examples": len(rows)}
                run.finish(metrics)
        results[spec.label] = metrics
        all_rows[spec.label] = rows
        if spec.name == "namm" and spec.budget is None:
            namm_kept = {row["id"]: row["kept_fraction"] for row in rows}
    return attach_stats(results, {label: units(rows) for label, rows in all_rows.items()})


def pool_controls(results: dict[str, dict[str, Any]], units: dict[str, list]) -> None:
    """Add one row per control group (e.g. `namm-random@match`): per-row mean over the seeds, seed scores."""
    groups: dict[str, list[str]] = {}
    for label in results:
        if control_group(label) != label:
            groups.setdefault(control_group(label), []).append(label)
    for group, labels in groups.items():
        rows: dict[tuple, list[float]] = {}
        for label in labels:
            for stratum, unit, row_id, value in units[label]:
                rows.setdefault((stratum, unit, row_id), []).append(value)
        units[group] = [(*key, sum(v) / len(v)) for key, v in rows.items() if len(v) == len(labels)]
        kept = [results[label].get("kept_fraction") for label in labels]
        tasks = [results[label].get("per_task", {}) for label in labels]
        results[group] = {
            "policy": group, "seeds": labels,  # seed_scores: filled in by attach_stats
            "kept_fraction": sum(kept) / len(kept) if None not in kept else None,
            "per_task": {t: sum(p[t] for p in tasks) / len(tasks) for t in tasks[0] if all(t in p for p in tasks)},
        }


def attach_stats(results: dict[str, dict[str, Any]], units: dict[str, list]) -> dict[str, dict[str, Any]]:
    """Pool the controls, then give every label its score, n, 95 % CI and paired difference to full."""
    units = dict(units)
    pool_controls(results, units)
    usable = {label: u for label, u in units.items() if u}
    if not usable:
        return results
    table = PairedBootstrap(usable)
    for label in usable:
        m = results[label]
        m.update(score=table.score(label), ci=table.ci(label), n=table.n_units, n_rows=table.n_rows,
                 units=[list(u) for u in units[label]])
        if REFERENCE in usable:
            delta, lo, hi = table.diff(label, REFERENCE)
            m.update(delta=delta, delta_ci=(lo, hi))
    for m in results.values():
        if "seeds" in m:  # a control group: each seed's own score on the paired rows, for the range
            m["seed_scores"] = [results[label]["score"] for label in m["seeds"]]
    return results


def pool_strata(per_stratum: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Several evaluations (e.g. one per environment) -> one result per label, each evaluation a stratum.

    The score is the mean over strata (units resampled within each), the kept fraction the mean of the
    strata's, and `per_task` the strata's own scores, so every domain returns one table of the same shape.
    """
    labels = [label for label in next(iter(per_stratum.values())) if all(label in r for r in per_stratum.values())]
    results: dict[str, dict[str, Any]] = {}
    units: dict[str, list] = {}
    for label in labels:
        parts = {name: r[label] for name, r in per_stratum.items()}
        if "seed_scores" in next(iter(parts.values())):
            continue  # a pooled control row: attach_stats pools the seeds again, over every stratum
        kept = [m.get("kept_fraction") for m in parts.values()]
        results[label] = {
            "policy": label, "per_task": {name: m.get("score") for name, m in parts.items()},
            "kept_fraction": None if None in kept else sum(kept) / len(kept),
        }
        if all(m.get("units") for m in parts.values()):
            units[label] = [(name, *u[1:]) for name, m in parts.items() for u in m["units"]]
    return attach_stats(results, units)


def add_reference_row(results: dict[str, dict[str, Any]], label: str, metrics: dict[str, Any],
                      rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Put a row evaluated outside the policy loop (e.g. a no-cache baseline) first and redo the paired stats."""
    units = {lab: [tuple(u) for u in m["units"]] for lab, m in results.items() if m.get("units")}
    units[label] = units_of(rows)
    return attach_stats({label: metrics, **results}, units)


def _is_main() -> bool:
    return process_state().is_main_process
