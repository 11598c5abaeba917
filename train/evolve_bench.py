"""How much faster a CMA-ES population goes through the LM stacked along the batch than member by member.

    python -m train.evolve_bench --model artifacts/lm/llama-8k-recall --tasks passage --members 8 \
        --prompts 4 --length 4096 --rows 32 128 512 --device cuda

Members are generation 1's population of `evolve` (sigma0 around zero, normalisation statistics from
the statistics pass). Member by member = `--prompts` rows per forward; stacked = each `--rows` value.
Prints sequences (members x prompts) per second and how many answers differ from member by member (none
on fp32; a bf16 LM may flip a near-tie when the batch's cache layout changes, as any batch change can).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tasks.language import load_lm, make_examples
from train.evolve import NAMM_CONFIG, EvolveConfig, _namm, _norm_stats
from train.population import answer_groups
from transfer.namm import param_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default="passage")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2, help="per task")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--update-interval", type=int, default=128)
    p.add_argument("--rows", type=int, nargs="+", default=[8], help="rows per stacked forward to try")
    p.add_argument("--sigma0", type=float, default=0.065)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    adapter, tokenizer = load_lm(args.model, args.device)
    cfg = EvolveConfig(model=args.model, stages=[args.tasks], prompts=args.prompts, length=args.length,
                       update_interval=args.update_interval, batch_size=max(args.rows), device=args.device)
    norm = _norm_stats(adapter, tokenizer, cfg)
    rng = np.random.default_rng(0)
    thetas = [torch.tensor(rng.normal(0, args.sigma0, param_size(NAMM_CONFIG)), dtype=torch.float32)
              for _ in range(args.members)]
    examples = make_examples(args.tasks, args.prompts, args.length, seed=1)
    groups = [(lambda t=t: _namm(t, norm), examples) for t in thetas]
    n_seq = len(groups) * len(examples)

    def timed(rows: int) -> tuple[float, list]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        out = answer_groups(adapter, tokenizer, groups, args.update_interval, rows)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.time() - t0, [r for g in out for r in g]

    timed(len(examples))  # warm-up (kernels, allocator)
    base_s, base = timed(len(examples))
    print(f"member by member ({len(examples)} rows per forward): {n_seq / base_s:.2f} sequences/s ({base_s:.1f} s)")
    for rows in args.rows:
        s, out = timed(rows)
        differ = sum(a["prediction"] != b["prediction"] for a, b in zip(out, base))
        kept = max(abs(a["kept_fraction"] - b["kept_fraction"]) for a, b in zip(out, base))
        same = f"{differ} of {n_seq} answers differ, kept fractions differ by up to {kept:.2g}"
        print(f"stacked, {rows} rows per forward: {n_seq / s:.2f} sequences/s ({s:.1f} s), "
              f"speed-up {base_s / s:.2f}x, {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
