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


def print_domain_table(title: str, results: dict[str, dict[str, Any]], seconds: float | None = None) -> None:
    """Console table: policy, score, kept-cache %, plus per-task scores when present."""
    table = Table(title=title)
    sub = sorted({k for m in results.values() for k in m.get("per_task", {})})
    for i, key in enumerate(["policy", "score", "kept %", *sub]):
        table.add_column(key, justify="left" if i == 0 else "right", no_wrap=True)
    for label, m in results.items():
        per = m.get("per_task", {})
        cells = [fmt(m.get("score")), fmt(m.get("kept_fraction"), pct=True), *[fmt(per.get(k)) for k in sub]]
        table.add_row(label, *cells)
    width = max(len(label) for label in results) + sum(max(len(k), 6) + 3 for k in ["score", "kept %", *sub]) + 4
    console = Console(width=max(width, len(title) + 4))
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
