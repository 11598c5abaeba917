"""Sequences/s of a stacked CMA-ES population pass (`train.population.answer_groups`), new paths against old,
side by side in one run, plus a profile of ONE small pass. Made for the GPU; a time cap keeps it bounded.

    PYTHONPATH=. python bench/population_speed.py --model artifacts/lm/llama-8k-recall --device cuda \
        --length 4096 --rows 320 --max-seconds 420 --json $OUT/population_speed.json
    PYTHONPATH=. python bench/population_speed.py --preset cpu-small      # a minute on a laptop

One pass = `--rows` rows: members x (prompts per task x tasks), each member a generation-1 CMA-ES sample
(sigma0 0.065 around zero, normalisation statistics from the statistics pass), as `train.evolve` runs
them. Measured, each as one timed pass after a short warm-up at --warm-length tokens:

* full cache: `mask` (the slot-mask SDPA path every padded batch took) vs `flash` (the penalised causal
  flash path, `transfer.memory.PENALISED_FLASH`);
* NAMM: `groups` (one update per member, `RowGroups`) vs `stack` (one `NAMMStack` update per layer),
  both with the masked or the flash attention as stated.

Prints sequences/s, the ratios, how many answers and kept fractions differ from the old path (bf16 LMs
may flip near-ties when the kernels change), then torch.profiler tables (top CUDA and CPU ops) of one
pass at --profile-length tokens. Measurements that would start after --max-seconds are skipped; the
JSON is rewritten after each one, so a killed run still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import sync
from tasks.language import load_lm, make_examples
from train.evolve import NAMM_CONFIG, EvolveConfig, _namm, _norm_stats
from train.population import answer_groups
from transfer import memory as memory_module
from transfer.namm import NormStats, param_size
from transfer.policies.full import FullCache

PRESETS = {
    "cpu-small": dict(model="artifacts/lm/tiny-llama-mqar", device="cpu", length=256, rows=32, prompts=1,
                      tasks="niah_single,vt", update_interval=64, warm_length=128, profile_length=128),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--model", default="artifacts/lm/llama-8k-recall")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tasks", default="passage,count")
    p.add_argument("--prompts", type=int, default=4, help="per task; members = rows / (prompts x tasks)")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--rows", type=int, default=320, help="rows per pass (members x prompts)")
    p.add_argument("--update-interval", type=int, default=256)
    p.add_argument("--warm-length", type=int, default=512)
    p.add_argument("--profile-length", type=int, default=512)
    p.add_argument("--skip-old", action="store_true", help="only the new paths (no masked / per-member runs)")
    p.add_argument("--max-seconds", type=float, default=420.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    t_start = time.perf_counter()
    deadline = t_start + args.max_seconds
    result: dict[str, Any] = {"args": vars(args), "runs": {}}

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))

    adapter, tokenizer = load_lm(args.model, args.device)
    n_tasks = len(args.tasks.split(","))
    per_member = args.prompts * n_tasks
    members = max(1, args.rows // per_member)
    cfg = EvolveConfig(model=args.model, stages=[args.tasks.split(",")[0]], prompts=args.prompts, length=args.length,
                       update_interval=args.update_interval, batch_size=args.rows, device=args.device)
    norm = _norm_stats(adapter, tokenizer, cfg) if args.device != "cpu" else NormStats.identity()
    rng = np.random.default_rng(0)
    thetas = [torch.tensor(rng.normal(0, 0.065, param_size(NAMM_CONFIG)), dtype=torch.float32) for _ in range(members)]
    result.update(members=members, rows=members * per_member, model=args.model,
                  device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  torch=torch.__version__)
    print(f"{members} members x {per_member} prompts = {members * per_member} rows per pass, L={args.length}, "
          f"update every {args.update_interval}; model {args.model}; {result['device']}", flush=True)

    def groups(kind: str, length: int) -> list:
        examples = make_examples(args.tasks, args.prompts, length, seed=1)
        if kind == "full":
            return [(FullCache, examples)] * members
        return [(lambda t=t: _namm(t, norm), examples) for t in thetas]

    def run(kind: str, flash: bool, stack: bool, length: int) -> tuple[float, list[dict]]:
        memory_module.PENALISED_FLASH = flash
        sync(args.device)
        t0 = time.perf_counter()
        out = answer_groups(adapter, tokenizer, groups(kind, length), args.update_interval, args.rows, stack=stack)
        sync(args.device)
        return time.perf_counter() - t0, [r for g in out for r in g]

    configs = [("full", "flash", True, False), ("namm", "stack+flash", True, True)]
    if not args.skip_old:
        configs = [("full", "mask", False, False), ("full", "flash", True, False),
                   ("namm", "groups+mask", False, False), ("namm", "groups+flash", True, False),
                   ("namm", "stack+flash", True, True)]
    base: dict[str, list[dict]] = {}
    for kind, label, flash, stack in configs:
        name = f"{kind}/{label}"
        if time.perf_counter() > deadline:
            print(f"{name}: skipped (time cap)", flush=True)
            continue
        run(kind, flash, stack, args.warm_length)  # warm-up: kernels, allocator
        seconds, rows = run(kind, flash, stack, args.length)
        entry = {"seconds": seconds, "seq_per_s": len(rows) / seconds,
                 "kept_fraction": float(np.mean([r["kept_fraction"] for r in rows]))}
        ref = base.setdefault(kind, rows)
        if ref is not rows:
            entry["answers_differ"] = sum(a["prediction"] != b["prediction"] for a, b in zip(rows, ref))
            entry["kept_max_diff"] = max(abs(a["kept_fraction"] - b["kept_fraction"]) for a, b in zip(rows, ref))
        result["runs"][name] = entry
        extra = (f", {entry['answers_differ']} of {len(rows)} answers differ from the first {kind} run, kept "
                 f"fractions by up to {entry['kept_max_diff']:.2g}") if "answers_differ" in entry else ""
        print(f"{name}: {entry['seq_per_s']:.1f} sequences/s ({seconds:.2f} s, kept {entry['kept_fraction']:.3f})"
              f"{extra}", flush=True)
        save()

    runs = result["runs"]

    def ratio(a: str, b: str) -> float | None:
        return runs[a]["seq_per_s"] / runs[b]["seq_per_s"] if a in runs and b in runs else None

    ratios = {"full: flash / mask": ratio("full/flash", "full/mask"),
              "namm: stack+flash / groups+mask": ratio("namm/stack+flash", "namm/groups+mask"),
              "namm: stack+flash / groups+flash": ratio("namm/stack+flash", "namm/groups+flash"),
              "namm: groups+flash / groups+mask": ratio("namm/groups+flash", "namm/groups+mask"),
              "namm / full (new)": ratio("namm/stack+flash", "full/flash")}
    result["ratios"] = {k: v for k, v in ratios.items() if v is not None}
    for k, v in result["ratios"].items():
        print(f"ratio {k}: {v:.2f}x", flush=True)
    save()

    if time.perf_counter() < deadline:  # one small pass under the profiler
        from torch.profiler import ProfilerActivity, profile

        memory_module.PENALISED_FLASH = True
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            run("namm", True, True, args.profile_length)
        table = prof.key_averages()
        if args.device.startswith("cuda"):
            text = table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
            print(f"profile, one NAMM pass at L={args.profile_length}, top CUDA ops:\n{text}", flush=True)
            result["profile_cuda"] = text
        text = table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        print(f"profile, one NAMM pass at L={args.profile_length}, top CPU ops (self):\n{text}", flush=True)
        result["profile_cpu"] = text
    result["wall_s"] = time.perf_counter() - t_start
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
