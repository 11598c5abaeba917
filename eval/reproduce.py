"""`namm-transfer reproduce`: every domain on the embedded defaults -> one report directory.

Runs language, offline RL and video QA with the full cache, the NAMM (threshold 0 and budget mode),
and H2O / L2 at the NAMM's measured memory ('match') and at a sweep of budgets; finished runs are
reused, so a second call only rebuilds the report. The report holds the cross-domain table (Markdown,
CSV, LaTeX), per-domain tables, score-versus-kept-cache curves, eviction maps, the paper's numbers in
columns labelled as the paper's (n/a until copied from the paper), and the configs and versions used.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.tables import fmt, to_csv, to_latex, to_markdown
from transfer.rundir import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
PAPER = json.loads((ROOT / "eval" / "paper_numbers.json").read_text())
SWEEP = "0.25,0.5,0.75"

# Command-line arguments of each domain's evaluator, per preset (parsed by the domain's own parser).
PRESETS: dict[str, dict[str, list[str]]] = {
    "quick": {
        "lm": ["--tasks", "niah_single,vt,fwe", "--n", "8", "--length", "2048", "--batch-size", "8"],
        "rl": ["--episodes", "3", "--max-steps", "300"],
        "video": ["--limit", "12"],
    },
    "full": {
        "lm": ["--tasks", "niah_single,vt,fwe,niah_multikey,mqar,passage", "--n", "32", "--length", "2048"],
        "rl": ["--episodes", "10", "--max-steps", "1000"],
        "video": [],
    },
}
MAIN_ROWS = ["full", "namm", "h2o@match", "l2@match"]


def _domain_args(module: Any, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def config_argv(config: dict[str, Any], domain: str) -> list[str]:
    """A --config file's options for one domain ({"model": "x", "max-steps": 5}) as command-line arguments."""
    argv: list[str] = []
    for key, value in config.get(domain, {}).items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def run_domains(
    preset: str, out: Path, namm: str | None, domains: list[str], config: dict[str, Any] | None = None
) -> dict[str, dict[str, dict]]:
    """{domain: {policy label: metrics}}; RL metrics are averaged over environments."""
    policies = f"full,namm,h2o,l2,namm@{SWEEP.replace(',', ',namm@')}"
    common = ["--policies", policies, "--budget", f"match,{SWEEP}"] + (["--namm", namm] if namm else [])
    results: dict[str, dict[str, dict]] = {}
    for domain in domains:
        module = __import__(f"eval.{domain}", fromlist=["run"])
        argv = [*PRESETS[preset][domain], *common, *config_argv(config or {}, domain)]
        argv += ["--out", str(out / "runs" / domain)]
        t0 = time.time()
        res = module.run(_domain_args(module, argv))
        if domain == "rl":
            res = average_envs(res)
        results[domain] = res
        print(f"[reproduce] {domain}: {time.time() - t0:.0f} s", flush=True)
    return results


def average_envs(per_env: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Mean score and kept fraction over environments, keeping per-environment scores as `per_task`."""
    labels = next(iter(per_env.values())).keys()
    out = {}
    for label in labels:
        rows = {env: res[label] for env, res in per_env.items() if label in res}
        kept = [m["kept_fraction"] for m in rows.values() if m.get("kept_fraction") is not None]
        out[label] = {
            "score": float(np.mean([m["score"] for m in rows.values()])),
            "kept_fraction": float(np.mean(kept)) if kept else None,
            "per_task": {env: m["score"] for env, m in rows.items()},
        }
    return out


# ----------------------------------------------------------------------------------------------- tables
def cross_domain_table(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    header = ["policy"]
    for domain in results:
        header += [f"{domain} score", f"{domain} kept %", f"{domain} paper score"]
    rows = []
    for label in MAIN_ROWS:
        row = [label]
        for domain, res in results.items():
            m = res.get(label, {})
            row += [fmt(m.get("score")), fmt(m.get("kept_fraction"), pct=True), paper_cell(domain, label)]
        rows.append(row)
    return header, rows


def paper_cell(domain: str, label: str) -> str:
    """The paper's headline number for this row, or n/a (never estimated)."""
    table = PAPER.get(domain, {})
    row = table.get("rows", {}).get(label.split("@")[0], {})
    values = [v for k, v in row.items() if k != "cache size" and v is not None]
    return fmt(values[0]) if values else "n/a"


def domain_table(domain: str, res: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Paper layout: rows = policies; columns = tasks/environments, average, kept %, paper columns."""
    subs = sorted({k for m in res.values() for k in m.get("per_task", {})})
    paper_cols = [c for c in PAPER.get(domain, {}).get("columns", [])]
    header = ["policy", *subs, "avg", "kept %", *[f"paper {c}" for c in paper_cols]]
    rows = []
    for label, m in res.items():
        prow = PAPER.get(domain, {}).get("rows", {}).get(label, {})
        rows.append([label, *[fmt(m.get("per_task", {}).get(s)) for s in subs], fmt(m.get("score")),
                     fmt(m.get("kept_fraction"), pct=True), *[fmt(prow.get(c)) for c in paper_cols]])
    return header, rows


def write_table(path: Path, header: list[str], rows: list[list[str]], caption: str = "") -> None:
    path.with_suffix(".md").write_text((caption + "\n\n" if caption else "") + to_markdown(header, rows))
    path.with_suffix(".csv").write_text(to_csv(header, rows))
    path.with_suffix(".tex").write_text(to_latex(header, rows))


# ----------------------------------------------------------------------------------------------- plots
def plot_curves(results: dict[str, dict[str, dict]], path: Path) -> None:
    """Score versus kept-cache % per domain: a line per policy over its budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.8), squeeze=False)
    styles = {"namm": ("C3", "o"), "h2o": ("C0", "s"), "l2": ("C2", "^"), "recency": ("C4", "v"),
              "streaming": ("C5", "D"), "random": ("C7", "x")}
    for ax, (domain, res) in zip(axes[0], results.items()):
        groups: dict[str, list[tuple[float, float]]] = {}
        for label, m in res.items():
            name = label.split("@")[0]
            if m.get("kept_fraction") is None or name == "full":
                continue
            groups.setdefault(name, []).append((100 * m["kept_fraction"], m["score"]))
        for name, pts in groups.items():
            pts.sort()
            color, marker = styles.get(name, ("k", "."))
            ax.plot(*zip(*pts), marker=marker, color=color, label=name)
        if "namm" in res:
            ax.scatter([100 * res["namm"]["kept_fraction"]], [res["namm"]["score"]], marker="*", s=220,
                       color="C3", zorder=5, edgecolor="k", label="namm (threshold 0)")
        if "full" in res:
            ax.axhline(res["full"]["score"], color="gray", ls="--", label="full cache")
        ax.set_title(domain)
        ax.set_xlabel("kept cache %")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eviction_map(history: list[tuple[int, torch.Tensor]], n_tokens: int, title: str, path: Path) -> None:
    """Which tokens each layer kept over time: rows = updates, columns = token index, colour = share of heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({layer for layer, _ in history})
    shown = layers if len(layers) <= 4 else [layers[i] for i in np.linspace(0, len(layers) - 1, 4).astype(int)]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.5 + 1.3 * len(shown)), squeeze=False)
    for ax, layer in zip(axes[:, 0], shown):
        updates = [slots for lay, slots in history if lay == layer]
        grid = np.full((len(updates), n_tokens), np.nan)
        for u, slots in enumerate(updates):
            s = slots[0].cpu()  # (kv_heads, n_keep), first sequence of the batch
            seen = int(s.max()) + 1
            grid[u, :seen] = 0.0
            counts = torch.zeros(n_tokens)
            counts.index_add_(0, s[s >= 0].flatten(), torch.ones(int((s >= 0).sum())))
            grid[u, :seen] = (counts[:seen] / s.shape[0]).numpy()
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        ax.set_ylabel(f"layer {layer}\nupdate")
    axes[-1, 0].set_xlabel("token index (order fed)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of KV heads keeping the token")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eviction_examples(out: Path, namm: str | None, domains: list[str]) -> list[str]:
    """One recorded NAMM run per domain -> eviction_<domain>.png; returns the files written."""
    from transfer.policies import make_policy

    written = []
    if "lm" in domains:
        from eval.lm import DEFAULT_LM, load_lm, make_examples

        adapter, tok = load_lm(DEFAULT_LM)
        ex = make_examples("niah_single", 1, 2048, 7)[0]
        enc = tok([ex.prompt], return_tensors="pt")
        memory = adapter.new_memory(make_policy("namm", namm=namm), update_interval=256, record=True)
        adapter.generate(memory, enc.input_ids, enc.attention_mask, 8)
        eviction_map(memory.history, memory.n_fed, f"NAMM on the source LM (niah_single, {memory.n_fed} tokens)",
                     out / "eviction_lm.png")
        written.append("eviction_lm.png")
    if "rl" in domains:
        from adapters.decision_transformer import DecisionTransformerAdapter
        from envs.mujoco import make_env
        from eval.rl import default_model

        adapter = DecisionTransformerAdapter.from_pretrained(str(default_model("hopper")), env_name="hopper")
        adapter.rollout([make_env("hopper")], lambda: make_policy("namm", namm=namm),
                        float(adapter.model.config.target_return), 96, max_steps=300, record=True)
        memory = adapter.last_memory
        eviction_map(memory.history, memory.n_fed, "NAMM on the Decision Transformer (hopper; tokens R,s,a)",
                     out / "eviction_rl.png")
        written.append("eviction_rl.png")
    if "video" in domains:
        from eval.video import eviction_history

        history, n_tokens = eviction_history(namm)
        eviction_map(history, n_tokens, "NAMM on the video model (video tokens, then question)",
                     out / "eviction_video.png")
        written.append("eviction_video.png")
    return written


def update_readme(report: Path, preset: str) -> None:
    """Copy the report to docs/report/ and replace the README's results section with its table and curves."""
    import shutil

    docs = ROOT / "docs" / "report"
    docs.mkdir(parents=True, exist_ok=True)
    for file in report.iterdir():
        if file.suffix in (".md", ".csv", ".tex", ".png", ".json"):
            shutil.copy2(file, docs / file.name)
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} section to update")
    section = (
        f"{start}\nFrom `namm-transfer reproduce --preset {preset}` (config and versions: "
        "[docs/report/config.json](docs/report/config.json); per-domain tables in docs/report/). Scores: "
        "language = mean exact-match over tasks, RL = D4RL-normalised return averaged over the three "
        "environments, video = accuracy on the synthetic set. `h2o@match`/`l2@match` run at the NAMM's "
        "measured kept fraction.\n\n" + (report / "cross_domain.md").read_text()
        + "\n![score versus kept cache](docs/report/score_vs_kept.png)\n" + end
    )
    readme.write_text(text[: text.index(start)] + section + text[text.index(end) + len(end):])


def versions() -> dict[str, Any]:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "git_commit": commit}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: CPU in under 10 minutes; full: more examples/episodes (GPU recommended)")
    p.add_argument("--domains", default="lm,rl,video", help="comma-separated subset of lm,rl,video")
    p.add_argument("--namm", default=None, help="NAMM checkpoint (default: the shipped one)")
    p.add_argument("--config", default=None,
                   help="JSON file of per-domain evaluator options overriding the preset, e.g. real models and "
                        "benchmarks for a GPU user (see eval/configs/paper-gpu.json)")
    p.add_argument("--out", default="runs/reproduce", help="runs and report go here; finished runs are reused")
    p.add_argument("--update-readme", action="store_true",
                   help="also copy the report's tables and curves to docs/report/ and put the table in README.md")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = Path(args.out)
    report = out / "report"
    domains = [d.strip() for d in args.domains.split(",")]
    if set(domains) - {"lm", "rl", "video"}:
        raise ValueError(f"--domains: unknown {sorted(set(domains) - {'lm', 'rl', 'video'})}; use lm, rl, video")
    config = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        config = json.loads(path.read_text())
        unknown = set(config) - {"lm", "rl", "video"} - {k for k in config if k.startswith("_")}
        if unknown:
            raise ValueError(f"--config {path}: unknown domain(s) {sorted(unknown)}; use lm, rl, video")
    report.mkdir(parents=True, exist_ok=True)
    results = run_domains(args.preset, out, args.namm, domains, config)
    note = "Columns `paper ...` hold numbers copied from the paper ({}); n/a = not copied yet, never estimated."
    write_table(report / "cross_domain", *cross_domain_table(results),
                note.format("; ".join(PAPER[d]["table"] for d in results if d in PAPER)))
    for domain, res in results.items():
        write_table(report / f"table_{domain}", *domain_table(domain, res), note.format(PAPER[domain]["table"]))
    plot_curves(results, report / "score_vs_kept.png")
    figures = ["score_vs_kept.png", *eviction_examples(report, args.namm, domains)]
    write_json_atomic(report / "config.json", {"preset": args.preset, "domains": domains, "namm": args.namm,
                                               "config_file": config,
                                               "domain_args": PRESETS[args.preset], "versions": versions(),
                                               "seconds": time.time() - t0})
    write_json_atomic(report / "results.json", results)
    if args.update_readme:
        update_readme(report, args.preset)
    print((report / "cross_domain.md").read_text())
    print(f"report: {report} (tables .md/.csv/.tex, {', '.join(figures)}); {time.time() - t0:.0f} s")
    return 0
