"""Tables from run results: one row per policy; Markdown, CSV and LaTeX, plus a console view.

Paper numbers only ever appear in columns labelled as the paper's (see eval/paper_numbers.json).
"""

from __future__ import annotations

import csv
import io
from typing import Any

from rich.console import Console
from rich.table import Table


def fmt(value: Any, pct: bool = False) -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if pct else f"{value:.3f}"
    return str(value)


def fmt_ci(m: dict[str, Any]) -> str:
    """'0.917 [0.833, 1.000]': the score with its 95 % bootstrap CI (plain score if no CI)."""
    if m.get("ci") is None:
        return fmt(m.get("score"))
    lo, hi = m["ci"]
    return f"{m['score']:.3f} [{lo:.3f}, {hi:.3f}]"


def fmt_delta(m: dict[str, Any]) -> str:
    """'+0.083 [-0.042, +0.208]': the paired difference to the full cache with its 95 % CI."""
    if m.get("delta_ci") is None:
        return "n/a"
    lo, hi = m["delta_ci"]
    return f"{m['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def fmt_seeds(m: dict[str, Any]) -> str:
    """Mean and range of the control seeds' scores, e.g. '0.52 (0.22-0.92, 5 seeds)'."""
    scores = m.get("seed_scores")
    if not scores:
        return ""
    return f"{sum(scores) / len(scores):.3f} ({min(scores):.3f}-{max(scores):.3f}, {len(scores)} seeds)"


def main_rows(results: dict[str, dict[str, Any]]) -> list[str]:
    """Rows a table shows: every label except single control seeds (their pooled row stands for them)."""
    return [label for label in results if ":s" not in label]


def print_domain_table(title: str, results: dict[str, dict[str, Any]], seconds: float | None = None,
                       header: str = "") -> None:
    """Console table: policy, score [95 % CI], difference to full [CI], kept-cache %, per-task scores, n."""
    table = Table(title=title, caption=header or None)
    labels = main_rows(results)
    sub = sorted({k for label in labels for k in results[label].get("per_task", {})})
    columns = ["policy", "score [95% CI]", "vs full [95% CI]", "kept %", *sub, "n"]
    for i, key in enumerate(columns):
        table.add_column(key, justify="left" if i == 0 else "right", no_wrap=True)
    for label in labels:
        m = results[label]
        per = m.get("per_task", {})
        cells = [fmt_ci(m), fmt_delta(m), fmt(m.get("kept_fraction"), pct=True), *[fmt(per.get(k)) for k in sub],
                 fmt(m.get("n"))]
        table.add_row(label, *cells)
    width = max(len(label) for label in labels) + 60 + sum(max(len(k), 6) + 3 for k in sub) + 10
    console = Console(width=max(width, len(title) + 4, len(header) + 4))
    console.print(table)
    if seconds is not None:
        console.print(f"[dim]{seconds:.1f} s[/dim]")


def to_markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def to_latex(header: list[str], rows: list[list[Any]]) -> str:
    def esc(x: Any) -> str:
        return str(x).replace("_", r"\_").replace("%", r"\%").replace("@", r"@")

    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(map(esc, header)) + r" \\",
             r"\midrule"]
    lines += [" & ".join(esc(c) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
