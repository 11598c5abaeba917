"""`namm-transfer reproduce`: every domain on the embedded defaults -> one report directory.

Runs language, offline RL and video QA with the full cache, the NAMM (threshold 0 and budget mode),
the random-parameter NAMM controls, a NAMM that keeps the attention sinks, and H2O / L2 at the NAMM's
measured memory ('match') and at a sweep of budgets, every policy under one protected set. Finished
runs are reused, so a second call only rebuilds the report. The report (see its README.md) holds the
cross-domain table with paired bootstrap CIs, the evolved NAMM's comparisons (controls, H2O, L2, the full
cache) with verdicts that follow the CIs, per-domain tables, score-versus-kept-cache curves with error
bars, eviction maps, and the configs, versions and commit it was made at.
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

from eval.tables import fmt, fmt_ci, fmt_delta, fmt_seeds, main_rows, to_csv, to_latex, to_markdown
from transfer.atomic import read_json, write_json_atomic
from transfer.log import duration, line
from transfer.options import positive_float
from transfer.stats import PairedBootstrap, verdict

ROOT = Path(__file__).resolve().parents[1]
PAPER = json.loads((ROOT / "eval" / "paper_numbers.json").read_text())
DOMAINS = ("lm", "rl", "rl-memory", "video")
DEFAULT_DOMAINS = "lm,rl,video"
# A domain is one evaluator module; `rl-memory` is eval/rl.py under the memory protocol (its own preset below).
MODULES = {"rl-memory": "rl"}
SWEEP = "0.25,0.5,0.75"
SINK = 4  # tokens the sink-protected NAMM keeps at the start (StreamingLLM's default)

# The RL memory protocol (issue 18): the long-context DT (K = 200 steps) trained on position-only observations
# (velocities removed, so the past must be remembered). Memory matters there when the full cache beats short
# sliding windows of 8 / 16 / 32 steps; the policies then run at the NAMM's memory and at token budgets of the
# windows' sizes (3 tokens a step: R, s, a), with the cache compressed every 48 tokens (16 steps; a multiple of
# the NAMM's STFT hop) instead of 256 so that a budget is what the policy holds, and only the newest step's
# 3 tokens protected (the language default of 32 would exceed the smallest budget). Set before any result.
_RL_MEMORY: dict[str, Any] = {"model": "artifacts/rl/dt-{env}-pos-k200", "window_steps": "8,16,32",
                              "budget": "match,24t,48t,96t", "update_interval": 48, "protect_recent": 3}

# Options of each domain's evaluator, per preset (its parser's defaults for everything else).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {  # a smoke test on a 2-core CPU: small n, wide CIs
        "lm": {"tasks": "niah_single,vt,fwe", "limit": 8, "length": 2048, "batch_size": 8},
        "rl": {"episodes": 3, "max_steps": 300},
        # 5 test videos of 64 frames read at 32 (1152 video tokens, 25 questions, letters balanced)
        "video": {"synthetic_videos": 5, "synthetic_lengths": "64", "frames": 32},
        "rl-memory": {**_RL_MEMORY, "env": "hopper", "episodes": 3, "max_steps": 300},
    },
    "full": {
        "lm": {"tasks": "niah_single,vt,fwe,niah_multikey,mqar,passage", "limit": 100, "length": 2048},
        "rl": {"episodes": 20, "max_steps": 1000},
        "video": {},  # the long-video test split: 100 videos of 64-128 frames at 128 frames, 500 questions
        "rl-memory": {**_RL_MEMORY, "episodes": 20, "max_steps": 1000},
    },
}
_QUICK = f"full,namm,namm-sink,namm-random,h2o,l2,namm@{SWEEP.replace(',', ',namm@')}"
# recency@0.25 in every preset: the memory-matters check (full minus a 25 % recency cache) of every domain
POLICIES = {"quick": _QUICK + ",recency@0.25", "full": _QUICK + ",snapkv,streaming,recency,random"}
BUDGETS = {"quick": "match", "full": f"match,{SWEEP}"}
BASELINES = ["h2o@match", "snapkv@match", "l2@match", "streaming@match", "recency@match", "random@match"]
MAIN_ROWS = ["full", "namm", "namm-random@match", *BASELINES]
COMPARED = ["full", "namm-random@match", *BASELINES, "namm-sink"]


def domain_parser(domain: str) -> tuple[Any, argparse.ArgumentParser]:
    module = __import__(f"eval.{MODULES.get(domain, domain)}", fromlist=["run"])
    parser = argparse.ArgumentParser(prog=f"namm-transfer eval {domain}")
    module.add_arguments(parser)
    return module, parser


def domain_options(parser: argparse.ArgumentParser, options: dict[str, Any], where: str) -> argparse.Namespace:
    """The evaluator's defaults overridden by `options` ({"update-interval": 512} or {"update_interval": 512}),
    as the evaluator's own Namespace: no argv strings; an unknown key is one error naming it."""
    args = parser.parse_args([])
    dests = {opt.lstrip("-").replace("-", "_"): action.dest for action in parser._actions
             for opt in action.option_strings}
    actions = {action.dest: action for action in parser._actions}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in dests:
            raise ValueError(f"{where}: unknown option {key!r} for `{parser.prog}` (see its --help)")
        action = actions[dests[name]]
        if action.type is not None and value is not None:  # the same checks as on the command line
            try:
                value = action.type(str(value))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"{where}: option {key!r}: {err}") from None
        setattr(args, action.dest, value)
    return args


def domain_args(preset: str, out: Path, namm: str | None, domain: str, config: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> tuple[Any, argparse.Namespace]:
    """(evaluator module, its Namespace): the preset, then the common options, then the --config section."""
    module, parser = domain_parser(domain)
    options = {"policies": POLICIES[preset], "budget": BUDGETS[preset], **PRESETS[preset][domain], "namm": namm,
               **(extra or {}), **(config or {}).get(domain, {}), "out": str(out / "runs" / domain)}
    return module, domain_options(parser, options, f"--config {domain}")


def run_domains(preset: str, out: Path, namm: str | None, domains: list[str], config: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, dict[str, dict]]:
    """{domain: {policy label: metrics}}: every domain through its own evaluator, one shape of result."""
    results: dict[str, dict[str, dict]] = {}
    started = time.time()
    for i, domain in enumerate(domains, 1):
        module, args = domain_args(preset, out, namm, domain, config, extra)
        args.started = started  # one --max-minutes for the whole command (transfer/runner.py RunOptions)
        t0 = time.time()
        line(f"reproduce: domain {i} of {len(domains)}, {domain}, started")
        results[domain] = module.run(args)
        line(f"reproduce: domain {i} of {len(domains)}, {domain}, finished in {duration(time.time() - t0)}")
    return results


# ----------------------------------------------------------------------------------------------- tables
def cross_domain_table(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """Rows: the main policies; per domain: score [95 % CI], difference to full [CI], kept %, n."""
    header = ["policy"]
    for domain in results:
        header += [f"{domain} score [95% CI]", f"{domain} vs full", f"{domain} kept %"]
    rows = []
    for label in MAIN_ROWS:
        if not any(label in res for res in results.values()):
            continue
        row = [label + (" (mean of seeds)" if label.startswith("namm-random") else "")]
        for res in results.values():
            m = res.get(label, {})
            row += [fmt_ci(m), fmt_delta(m) if label != "full" else "", fmt(m.get("kept_fraction"), pct=True)]
        rows.append(row)
    return header, rows


def comparisons(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """The evolved NAMM against every comparison row, domain by domain: paired difference and verdict."""
    header = ["domain", "namm minus", "difference [95% CI]", "verdict", "namm kept %", "other kept %", "n"]
    rows = []
    for domain, res in results.items():
        units = {label: [tuple(u) for u in res[label]["units"]] for label in ["namm", *COMPARED]
                 if res.get(label, {}).get("units")}
        if "namm" not in units:
            continue
        table = PairedBootstrap(units)
        for other in COMPARED:
            if other in units:
                diff = table.diff("namm", other)
                rows.append([domain, other, f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]", verdict(diff),
                             fmt(res["namm"].get("kept_fraction"), pct=True),
                             fmt(res[other].get("kept_fraction"), pct=True), str(table.n_units)])
    return header, rows


def controls_table(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """The random-NAMM controls: the evolved NAMM's score beside each seed's and their mean and range."""
    header = ["domain", "control", "evolved namm", "controls: mean (range, seeds)", "pooled [95% CI]", "kept %"]
    rows = []
    for domain, res in results.items():
        for label, m in res.items():
            if m.get("seed_scores"):
                rows.append([domain, label, fmt_ci(res.get("namm", {})), fmt_seeds(m), fmt_ci(m),
                             fmt(m.get("kept_fraction"), pct=True)])
    return header, rows


def domain_table(domain: str, res: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Rows = policies; columns = tasks/environments, score [CI], difference to full [CI], kept %, n, and the
    paper's numbers only where a verified one exists (eval/paper_numbers.json)."""
    labels = main_rows(res)
    subs = sorted({k for label in labels for k in res[label].get("per_task", {})})
    paper = paper_columns(domain)
    header = ["policy", *subs, "score [95% CI]", "vs full [95% CI]", "kept %", "n", *[f"paper {c}" for c in paper]]
    rows = []
    for label in labels:
        m = res[label]
        prow = PAPER.get(domain, {}).get("rows", {}).get(label.split("@")[0], {})
        rows.append([label, *[fmt(m.get("per_task", {}).get(s)) for s in subs], fmt_ci(m), fmt_delta(m),
                     fmt(m.get("kept_fraction"), pct=True), fmt(m.get("n")), *[fmt(prow.get(c)) for c in paper]])
    return header, rows


def paper_columns(domain: str) -> list[str]:
    """The paper's columns that hold at least one verified number (none: no paper column at all)."""
    table = PAPER.get(domain, {})
    return [c for c in table.get("columns", []) if any(r.get(c) is not None for r in table.get("rows", {}).values())]


def raw_csv(results: dict[str, dict[str, dict]]) -> str:
    """Every label of every domain with its raw numbers (no formatting), for plots and other tools."""
    header = ["domain", "policy", "score", "ci_low", "ci_high", "delta_full", "delta_low", "delta_high",
              "kept_fraction", "n_units", "n_rows"]
    rows = []
    for domain, res in results.items():
        for label, m in res.items():
            ci, dci = m.get("ci") or (None, None), m.get("delta_ci") or (None, None)
            rows.append([domain, label, m.get("score"), *ci, m.get("delta"), *dci, m.get("kept_fraction"),
                         m.get("n"), m.get("n_rows")])
    return to_csv(header, [["" if v is None else v for v in row] for row in rows])


def write_table(path: Path, header: list[str], rows: list[list[str]], caption: str = "") -> None:
    path.with_suffix(".md").write_text((caption + "\n\n" if caption else "") + to_markdown(header, rows))
    path.with_suffix(".csv").write_text(to_csv(header, rows))
    path.with_suffix(".tex").write_text(to_latex(header, rows))


# ----------------------------------------------------------------------------------------------- plots
def plot_curves(results: dict[str, dict[str, dict]], path: Path) -> None:
    """Score versus kept-cache % per domain: a line per policy over its budgets, 95 % CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.8), squeeze=False)
    styles = {"namm": ("C3", "o"), "h2o": ("C0", "s"), "l2": ("C2", "^"), "recency": ("C4", "v"),
              "streaming": ("C5", "D"), "random": ("C7", "x"), "namm-random": ("C8", "P"), "namm-sink": ("C1", "*")}
    for ax, (domain, res) in zip(axes[0], results.items()):
        groups: dict[str, list[tuple[float, float, float, float]]] = {}
        for label in main_rows(res):
            m = res[label]
            name = label.split("@")[0]
            if m.get("kept_fraction") is None or name == "full" or m.get("score") is None:
                continue
            lo, hi = m.get("ci") or (m["score"], m["score"])
            groups.setdefault(name, []).append((100 * m["kept_fraction"], m["score"], m["score"] - lo, hi - m["score"]))
        for name, pts in groups.items():
            pts.sort()
            x, y, el, eh = zip(*pts)
            color, marker = styles.get(name, ("k", "."))
            ax.errorbar(x, y, yerr=[el, eh], marker=marker, color=color, label=name, capsize=3)
        if "full" in res and res["full"].get("ci"):
            lo, hi = res["full"]["ci"]
            ax.axhline(res["full"]["score"], color="gray", ls="--", label="full cache")
            ax.axhspan(lo, hi, color="gray", alpha=0.15)
        n = res.get("full", {}).get("n")
        ax.set_title(f"{domain} (n = {n})" if n else domain)
        ax.set_xlabel("kept cache %")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eviction_map(history: list[tuple[int, Any]], n_tokens: int, title: str, path: Path) -> None:
    """Which tokens each layer kept over time: rows = updates, columns = token index, colour = share of heads.

    Evicted tokens are black, so a single evicted token shows; a second panel zooms on the first tokens
    (where attention sinks live)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    layers = sorted({layer for layer, _ in history})
    shown = layers if len(layers) <= 4 else [layers[i] for i in np.linspace(0, len(layers) - 1, 4).astype(int)]
    zoom = min(64, n_tokens)
    fig, axes = plt.subplots(len(shown), 2, figsize=(12, 1.5 + 1.3 * len(shown)), squeeze=False,
                             gridspec_kw={"width_ratios": [4, 1]})
    cmap = plt.get_cmap("viridis").with_extremes(under="black", bad="white")  # evicted, not seen yet
    im = None
    for row, layer in enumerate(shown):
        updates = [slots for lay, slots in history if lay == layer]
        grid = np.full((len(updates), n_tokens), np.nan)
        for u, slots in enumerate(updates):
            s = slots[0].cpu()  # (kv_heads, n_keep), first sequence of the batch; -1 = not valid
            seen = int(s.max()) + 1
            counts = torch.zeros(n_tokens)
            counts.index_add_(0, s[s >= 0].flatten(), torch.ones(int((s >= 0).sum())))
            share = (counts[:seen] / s.shape[0]).numpy()
            grid[u, :seen] = np.where(share > 0, share, -1.0)  # -1: evicted by every head
        for col, (data, label) in enumerate(((grid, "token index (order fed)"), (grid[:, :zoom], f"first {zoom}"))):
            ax = axes[row, col]
            im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap=cmap,
                           vmin=1e-6, vmax=1)
            ax.set_yticks(range(0, len(updates), max(1, len(updates) // 4)))
            if row == len(shown) - 1:
                ax.set_xlabel(label)
        axes[row, 0].set_ylabel(f"layer {layer}\nupdate")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of KV heads keeping the token (black: evicted)")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eviction_examples(out: Path, namm: str | None, domains: list[str]) -> list[str]:
    """One recorded NAMM run per domain -> eviction_<domain>.png; returns the files written."""
    from transfer.policies import make_policy
    from transfer.runner import DEFAULT_PROTECT_RECENT, DEFAULT_UPDATE_INTERVAL

    protect = {"protect_recent": DEFAULT_PROTECT_RECENT}
    written = []
    if "lm" in domains:
        from tasks.language import DEFAULT_LM, load_lm, make_examples

        adapter, tok = load_lm(DEFAULT_LM)
        ex = make_examples("niah_single", 1, 2048, 7)[0]
        enc = tok([ex.prompt], return_tensors="pt")
        memory = adapter.new_memory(make_policy("namm", namm=namm, **protect), update_interval=DEFAULT_UPDATE_INTERVAL,
                                    record=True)
        adapter.generate(memory, enc.input_ids, enc.attention_mask, 8)
        eviction_map(memory.history, memory.n_fed, f"NAMM on the source LM (niah_single, {memory.n_fed} tokens)",
                     out / "eviction_lm.png")
        written.append("eviction_lm.png")
    if "rl" in domains:
        from adapters.decision_transformer import DecisionTransformerAdapter
        from envs.mujoco import make_env
        from eval.rl import default_model

        adapter = DecisionTransformerAdapter.from_pretrained(str(default_model("hopper")), env_name="hopper")
        result = adapter.rollout([make_env("hopper")], lambda: make_policy("namm", namm=namm, **protect),
                                 float(adapter.model.config.target_return), DEFAULT_UPDATE_INTERVAL, max_steps=300,
                                 record=True)
        eviction_map(result.memory.history, result.memory.n_fed,
                     "NAMM on the Decision Transformer (hopper; tokens R,s,a)", out / "eviction_rl.png")
        written.append("eviction_rl.png")
    if "video" in domains:
        from eval.video import eviction_history

        history, n_tokens = eviction_history(namm, update_interval=DEFAULT_UPDATE_INTERVAL)
        eviction_map(history, n_tokens, "NAMM on the video model (video tokens, then question)",
                     out / "eviction_video.png")
        written.append("eviction_video.png")
    return written


# ----------------------------------------------------------------------------------------------- report
def findings(results: dict[str, dict[str, dict]]) -> list[str]:
    """One sentence per domain, worded by the CIs: a claim only where the paired CI excludes zero."""
    lines = []
    _, rows = comparisons(results)
    for domain in results:
        mine = {r[1]: r for r in rows if r[0] == domain}
        if not mine:
            continue
        parts = []
        for other, name in (("full", "the full cache"), ("namm-random@match", "the random-NAMM controls"),
                            ("h2o@match", "H2O"), ("snapkv@match", "SnapKV"), ("l2@match", "L2"),
                            ("streaming@match", "StreamingLLM"), ("recency@match", "recency"),
                            ("random@match", "random eviction")):
            if other in mine:
                word = {"better": "above", "worse": "below", "within noise": "within noise of"}[mine[other][3]]
                parts.append(f"{word} {name} ({mine[other][2]})")
        kept = results[domain]["namm"].get("kept_fraction")
        lines.append(f"- **{domain}** (n = {next(iter(mine.values()))[6]} units; the NAMM keeps "
                     f"{fmt(kept, pct=True)} %): the evolved NAMM is " + "; ".join(parts) + ".")
    return lines


TOKEN_FIELDS = ("prompt_tokens", "context_tokens", "tokens")  # per-row token counts a domain may record


def run_costs(out: Path, domains: list[str]) -> list[dict[str, Any]]:
    """One record per policy run that computed examples in this output folder: where, policy, seconds per
    example, peak accelerator memory, kept fraction and tokens per example (from the rows, if recorded)."""
    from transfer.runner import COST_FILE

    records = []
    for domain in domains:
        for cost_file in sorted((out / "runs" / domain).rglob(COST_FILE)):
            run = cost_file.parent
            cost = read_json(cost_file, "cost file", dict)
            metrics = read_json(run / "metrics.json", "metrics", dict) if (run / "metrics.json").exists() else {}
            tokens = []
            if (run / "predictions.jsonl").exists():
                for text in (run / "predictions.jsonl").read_text().splitlines():
                    row = json.loads(text)
                    tokens += [row[f] for f in TOKEN_FIELDS if isinstance(row.get(f), (int, float))][:1]
            records.append({
                "domain": domain, "where": str(run.parent.relative_to(out / "runs" / domain)),
                "policy": metrics.get("policy", run.name), **cost,
                "kept_fraction": metrics.get("kept_fraction"),
                "tokens_per_example": sum(tokens) / len(tokens) if tokens else None,
            })
    return records


def costs_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per domain (all its runs) then per run: what the computation cost on this machine."""
    header = ["domain", "where", "policy", "examples", "s / example", "peak memory GiB", "kept %", "tokens / example"]
    rows = []
    for domain in dict.fromkeys(r["domain"] for r in records):
        mine = [r for r in records if r["domain"] == domain]
        seconds, examples = sum(r["seconds"] for r in mine), sum(r["examples_computed"] for r in mine)
        peaks = [r["peak_memory_gib"] for r in mine if r["peak_memory_gib"] is not None]
        rows.append([f"**{domain}**", f"{len(mine)} runs, {duration(seconds)}", "all", str(examples),
                     f"{seconds / max(examples, 1):.3f}", f"{max(peaks):.2f}" if peaks else "", "", ""])
        for r in mine:
            rows.append([domain, "." if r["where"] == "." else r["where"], r["policy"], str(r["examples_computed"]),
                         f"{r['seconds_per_example']:.3f}",
                         "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}",
                         fmt(r["kept_fraction"], pct=True) if r["kept_fraction"] is not None else "",
                         "" if r["tokens_per_example"] is None else f"{r['tokens_per_example']:.0f}"])
    return header, rows


def memory_and_sinks(results: dict[str, dict[str, dict]]) -> list[str]:
    """Per domain: does the task need its memory (full cache minus a 25 % recency cache), and the sink study
    (the reference NAMM minus the NAMM that keeps the first SINK tokens), paired CIs, worded by them."""
    lines = []
    for domain, res in results.items():
        parts = []
        windows = [(int(k.removeprefix("sliding window K=")), k) for k in res if k.startswith("sliding window K=")]
        for a, b, name in (("full", "recency@0.25", "memory matters? full cache minus 25 % recency"),
                           *[("full", k, f"memory matters? full cache minus a {n}-step window") for n, k in
                             sorted(windows)],
                           ("namm", "namm-sink", f"sink study: NAMM minus NAMM keeping the first {SINK} tokens")):
            if not (res.get(a, {}).get("units") and res.get(b, {}).get("units")):
                continue
            table = PairedBootstrap({x: [tuple(u) for u in res[x]["units"]] for x in (a, b)})
            d = table.diff(a, b)
            kept = "/".join(fmt(res[x].get("kept_fraction"), pct=True) for x in (a, b))
            parts.append(f"{name}: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}], {verdict(d)} "
                         f"(kept {kept} %, n = {table.n_units})")
        if parts:
            lines.append(f"- **{domain}**: " + "; ".join(parts) + ".")
    return lines


def versions() -> dict[str, Any]:
    import torch
    import transformers

    from transfer.rundir import code_fingerprint

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "code": code_fingerprint()}


def write_index(report: Path, figures: list[str], header: str, meta: dict[str, Any]) -> None:
    """report/README.md: every table and figure with one line on what it shows."""
    lines = [
        "# namm-transfer report", "",
        f"Made by `namm-transfer reproduce --preset {meta['preset']}` at commit `{meta['versions']['git_commit']}`"
        + (" (with uncommitted changes)" if meta["versions"]["git_dirty"] else "")
        + f", code fingerprint `{meta['versions']['code']}`; options and versions in [config.json](config.json).",
        "", f"Every table: {header}. Scores carry a paired bootstrap 95 % CI over the evaluation units "
        "(prompts within tasks, episodes within environments, videos); a difference is a claim only where its CI "
        "excludes zero.", "",
        "| file | what it shows |", "|---|---|",
        "| [cross_domain.md](cross_domain.md) (.csv, .tex) | the main policies in every domain: score, difference to "
        "the full cache, kept cache |",
        "| [comparisons.md](comparisons.md) | the evolved NAMM minus each comparison (full, random-NAMM controls, H2O, "
        "L2, NAMM with sinks) with paired CIs and verdicts |",
        "| [controls.md](controls.md) | the random-parameter NAMM controls seed by seed against the evolved NAMM |",
        *[f"| [table_{d}.md](table_{d}.md) | {d}: every policy and budget, per task/environment |"
          for d in meta["domains"]],
        "| [results.csv](results.csv) | raw numbers of every row (score, CI, difference, kept fraction, n) |",
        "| [results.json](results.json) | everything above, with the bootstrap units |",
        *(["| [costs.md](costs.md) (.json) | what each run cost on the machine that ran it: seconds per example, "
           "peak accelerator memory, tokens per example (machine-dependent, unlike the tables above) |"]
          if (report / "costs.md").exists() else []),
        *[f"| [{f}]({f}) | {FIGURES.get(f, '')} |" for f in figures],
    ]
    (report / "README.md").write_text("\n".join(lines) + "\n")


FIGURES = {
    "score_vs_kept.png": "score against kept cache per domain, 95 % CI error bars, full cache as a band",
    "eviction_lm.png": "which tokens the NAMM keeps on one language prompt, layer by layer (black: evicted)",
    "eviction_rl.png": "the same on one hopper episode of the Decision Transformer",
    "eviction_video.png": "the same on one synthetic test video of the long-video model",
}


def update_readme(report: Path, preset: str) -> None:
    """Copy the report to docs/report/ and replace the README's results section with its tables."""
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
        f"{start}\nFrom `namm-transfer reproduce --preset {preset}` ([report index](docs/report/README.md); "
        "config, versions and commit in [docs/report/config.json](docs/report/config.json)). Scores: "
        "language = mean exact-match over tasks, RL = D4RL-normalised return averaged over the environments, "
        "video = accuracy on the synthetic long-video test set; `@match` rows run at the NAMM's measured kept "
        "fraction; "
        "`namm-random` is the mean of random-parameter NAMMs at the evolved NAMM's scale.\n\n"
        + (report / "cross_domain.md").read_text() + "\n" + (report / "findings.md").read_text()
        + "\n![score versus kept cache](docs/report/score_vs_kept.png)\n" + end
    )
    readme.write_text(text[: text.index(start)] + section + text[text.index(end) + len(end):])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: a smoke test on a CPU in minutes (small n, wide CIs); full: the statistics a "
                        "claim needs (GPU recommended)")
    p.add_argument("--domains", default=DEFAULT_DOMAINS,
                   help=f"comma-separated subset of {','.join(DOMAINS)} (rl-memory: the long-context DT on "
                        "position-only observations, full cache against short windows, then every policy)")
    p.add_argument("--namm", default=None, help="NAMM checkpoint (default: the shipped one)")
    p.add_argument("--controls", type=int, default=5, help="random-parameter NAMM controls per domain")
    p.add_argument("--config", default=None,
                   help="JSON file of per-domain evaluator options overriding the preset, e.g. real models and "
                        "benchmarks for a GPU user (see eval/configs/paper-gpu.json)")
    p.add_argument("--out", default="runs/reproduce", help="runs and report go here; finished runs are reused")
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop after the batch that passes this wall time (no report yet); rerun to resume "
                        "(exit status 3 says it stopped early)")
    p.add_argument("--update-readme", action="store_true",
                   help="also copy the report to docs/report/ and put its table in README.md")


def load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    file = Path(path)
    config = read_json(file, "--config file", dict)
    unknown = set(config) - set(DOMAINS) - {k for k in config if k.startswith("_")}
    if unknown:
        raise ValueError(f"--config {file}: unknown domain(s) {sorted(unknown)}; use {', '.join(DOMAINS)}")
    return config


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = Path(args.out)
    report = out / "report"
    domains = [d.strip() for d in args.domains.split(",")]
    if set(domains) - set(DOMAINS):
        raise ValueError(f"--domains: unknown {sorted(set(domains) - set(DOMAINS))}; use {', '.join(DOMAINS)}")
    config = load_config(args.config)
    for domain in domains:  # every option checked before any run starts
        _, parser = domain_parser(domain)
        domain_options(parser, config.get(domain, {}), f"--config {args.config} [{domain}]")
    extra = {"controls": args.controls, "max_minutes": args.max_minutes}
    results = run_domains(args.preset, out, args.namm, domains, config, extra)
    report.mkdir(parents=True, exist_ok=True)
    from transfer.runner import RunOptions

    headers = {d: RunOptions.from_args(domain_args(args.preset, out, args.namm, d, config, extra)[1]).header()
               for d in domains}  # each domain's own schedule (a --config may set its update interval)
    same = len(set(headers.values())) == 1
    header = headers[domains[0]] if same else "; ".join(f"{d}: {h}" for d, h in headers.items())
    write_table(report / "cross_domain", *cross_domain_table(results), f"Protection and schedule: {header}.")
    write_table(report / "comparisons", *comparisons(results), "The evolved NAMM minus each row, paired bootstrap.")
    write_table(report / "controls", *controls_table(results), "Random-parameter NAMMs at the evolved NAMM's scale.")
    for domain, res in results.items():
        write_table(report / f"table_{domain}", *domain_table(domain, res), f"{domain}. {headers[domain]}.")
    (report / "findings.md").write_text("\n".join(findings(results) + memory_and_sinks(results)) + "\n")
    (report / "results.csv").write_text(raw_csv(results))
    plot_curves(results, report / "score_vs_kept.png")
    figures = ["score_vs_kept.png", *eviction_examples(report, args.namm, domains)]
    meta = {"preset": args.preset, "domains": domains, "namm": args.namm, "controls": args.controls,
            "config_file": config, "domain_options": {d: PRESETS[args.preset][d] for d in domains},
            "policies": POLICIES[args.preset], "budgets": BUDGETS[args.preset], "protection": header,
            "versions": versions(), "seconds": time.time() - t0}
    costs = run_costs(out, domains)
    if costs:  # machine-dependent, unlike every other table: what each run cost where it ran
        device = ", ".join(sorted({str(c["device"]) for c in costs}))
        write_table(report / "costs", *costs_table(costs), f"Cost of the runs computed in {out} on: {device}. "
                    "Wall time per example of each policy run and the peak accelerator memory since it started "
                    "(model weights included); runs reused from an earlier call keep the cost of the call that "
                    "computed them.")
        write_json_atomic(report / "costs.json", costs)
    write_json_atomic(report / "config.json", meta)
    write_json_atomic(report / "results.json", results)
    write_index(report, figures, header, meta)
    if args.update_readme:
        update_readme(report, args.preset)
    print((report / "cross_domain.md").read_text())
    print((report / "findings.md").read_text())
    line(f"report: {report / 'README.md'} ({duration(time.time() - t0)})")
    return 0
