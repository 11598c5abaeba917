"""Held-out accuracy of a source LM per task and length, full cache vs a budgeted policy (default: 25 % recency).

Runs the suite's own path (`load_lm` + `answer_batch` of tasks/language.py, i.e. the adapter's chunked
prefill under `adapter.new_memory(make_policy(...))`), so the numbers mean what `eval lm` measures.
Examples are `tasks.synthetic.make_examples(task, n, length, seed)` with a seed disjoint from training
(numpy streams of `make_training_sequence`), from evolution and from `eval.lm.HELDOUT_SEED`; every policy
sees the same prompts, so full - policy differences are paired.

    python -m train.lm_heldout --model artifacts/lm/<name> --out runs/heldout.json
    python -m train.lm_heldout --merge a.json b.json --out merged.json --markdown table.md
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

HELDOUT_TRAIN_SEED = 7_700_001  # not eval.lm.HELDOUT_SEED (20261127), not evolution's 1337 + 100_003 k + gen


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95 % CI (lo, hi): Wilson for 0/1 scores (sane at 0 and 1), else normal, clipped to [0, 1]."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if np.isin(x, (0.0, 1.0)).all():
        z = 1.96
        centre = (m + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return m, max(0.0, centre - half), min(1.0, centre + half)
    half = 1.96 * x.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
    return m, max(0.0, m - half), min(1.0, m + half)  # scores live in [0, 1]


def run_cells(model: str, tasks: list[str], lengths: list[int], policies: list[str], n: int, seed: int,
              budget: float, device: str, batch_size: int, update_interval: int,
              dump: Path | None = None) -> list[dict]:
    """One row per (task, length, policy, example): score, prediction, answer, chance, kept fraction.

    With `dump`, the rows so far are rewritten there after every cell (a run cut short keeps them).
    """
    import torch

    from tasks.language import answer_batch, load_lm
    from tasks.synthetic import make_examples
    from transfer.policies import make_policy

    adapter, tokenizer = load_lm(model, device)
    print(f"{model}: {next(adapter.model.parameters()).dtype} on {device}", flush=True)
    rows = []
    for length in lengths:
        for task in tasks:
            exs = make_examples(task, n, length, seed=seed)
            chance = {e.id: e.chance for e in exs}
            for pol in policies:
                factory = (lambda: make_policy("full")) if pol == "full" else (
                    lambda p=pol: make_policy(p, budget=budget))
                t0 = time.time()
                for i in range(0, n, batch_size):
                    with torch.no_grad():
                        out = answer_batch(adapter, tokenizer, factory, exs[i:i + batch_size], update_interval)
                    for r in out:
                        rows.append({**r, "length": length, "policy": pol, "chance": chance[r["id"]]})
                cell = [r["score"] for r in rows if r["task"] == task and r["length"] == length and r["policy"] == pol]
                print(f"{task}@{length} {pol}: {np.mean(cell):.3f} (n={len(cell)}, {time.time() - t0:.1f}s)",
                      flush=True)
                if dump is not None:
                    dump.write_text(json.dumps({"meta": {"partial": True}, "rows": rows}))
    return rows


def summarize(rows: list[dict], baseline: str = "full") -> dict:
    """Per (task, length, policy): mean, CI, chance, n; and the paired baseline - policy difference."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["task"], r["length"], r["policy"]), []).append(r)
    out = {}
    for (task, length, pol), rs in sorted(cells.items()):
        m, lo, hi = mean_ci([r["score"] for r in rs])
        rec = {"task": task, "length": length, "policy": pol, "n": len(rs), "score": m, "ci95": [lo, hi],
               "chance": float(np.mean([r["chance"] for r in rs])),
               "kept_fraction": float(np.mean([r["kept_fraction"] for r in rs]))}
        base = {r["id"]: r["score"] for r in cells.get((task, length, baseline), [])}
        if pol != baseline and base:
            diffs = np.asarray([base[r["id"]] - r["score"] for r in rs if r["id"] in base])
            half = 1.96 * diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            rec.update({"drop_vs_" + baseline: float(diffs.mean()), "drop_ci95": [diffs.mean() - half,
                                                                                   diffs.mean() + half]})
        out[f"{task}@{length}/{pol}"] = rec
    return out


def _fmt(v: float, ci: list[float]) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(summary: dict, policies: list[str]) -> str:
    """Table: one row per task and length, score [95 % CI] per policy, the paired drop [95 % CI], chance."""
    keys = sorted({(v["task"], v["length"]) for v in summary.values()})
    other = [p for p in policies if p != "full"]
    head = "| task | length | n | full | " + " | ".join(f"{p} | drop (full - {p})" for p in other) + " | chance |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for task, length in keys:
        full = summary.get(f"{task}@{length}/full")
        cols = [task, str(length), str(full["n"] if full else ""),
                _fmt(full["score"], full["ci95"]) if full else ""]
        for p in other:
            v = summary.get(f"{task}@{length}/{p}")
            cols += [_fmt(v["score"], v["ci95"]) if v else "",
                     _fmt(v["drop_vs_full"], v["drop_ci95"]) if v and "drop_vs_full" in v else ""]
        chance = (full or summary[f"{task}@{length}/{other[0]}"])["chance"]
        lines.append("| " + " | ".join(cols + [f"{chance:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF causal LM dir")
    p.add_argument("--tasks", nargs="+", default=None, help="default: every task in tasks.synthetic.TASKS")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--policies", nargs="+", default=["full", "recency"])
    p.add_argument("--budget", type=float, default=0.25, help="kept fraction for the budgeted policies")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=HELDOUT_TRAIN_SEED)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--update-interval", type=int, default=256)
    p.add_argument("--merge", nargs="+", default=None, help="merge these row files instead of evaluating")
    p.add_argument("--out", required=True, help="JSON with rows + summary")
    p.add_argument("--markdown", default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(Path(f).read_text())["rows"]]
        meta = json.loads(Path(args.merge[0]).read_text())["meta"]
    else:
        from tasks.synthetic import TASKS

        tasks = args.tasks or list(TASKS)
        t0 = time.time()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        rows = run_cells(args.model, tasks, args.lengths, args.policies, args.n, args.seed, args.budget,
                         args.device, args.batch_size, args.update_interval, dump=Path(args.out))
        meta = {k: v for k, v in vars(args).items() if k not in ("merge", "out", "markdown")}
        meta["tasks"], meta["seconds"] = tasks, round(time.time() - t0, 1)
    summary = summarize(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}))
    table = markdown(summary, sorted({r["policy"] for r in rows}, key=lambda x: x != "full"))
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return summary


if __name__ == "__main__":
    main()
