"""Decode tokens/s after prefill with a fraction of the cache kept, against the full cache, in one run.

    PYTHONPATH=. python bench/decode_speed.py --preset cpu-small
    PYTHONPATH=. python bench/decode_speed.py --preset gpu-7b        # Llama-3-8B shapes, random bf16 weights

The context is prefilled once per policy (full cache; recency at --kept: decode cost depends only on
how many tokens stay, not on which), then
--steps greedy tokens are decoded with no further eviction (update interval beyond the run), so the
ratio isolates what a smaller cache buys at decode time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adapters.causal_lm import CausalLMAdapter
from bench.common import LLAMA3_8B, LLAMA_CPU_SMALL, random_llama
from transfer.policies.full import FullCache
from transfer.policies.recency import Recency

PRESETS = {
    "cpu-small": dict(config=LLAMA_CPU_SMALL, lengths=[2048], device="cpu", dtype="float32"),
    "gpu-7b": dict(config=LLAMA3_8B, lengths=[8192, 32768], device="cuda", dtype="bfloat16"),
}


def decode_rate(adapter: CausalLMAdapter, policy, ids: torch.Tensor, steps: int, chunk: int) -> tuple[float, int]:
    """Tokens/s of greedy decoding after prefilling ids under the policy; returns (rate, cache tokens)."""
    length = ids.shape[1]
    # one update at the end of the prefill applies the policy; none happens while decoding
    memory = adapter.new_memory(policy, update_interval=length)
    adapter.prefill(memory, ids, chunk_size=chunk)
    token = ids[:, -1:]
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    adapter.prefill(memory, token)  # warm-up step
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        adapter.prefill(memory, token)
    sync()
    return steps / (time.perf_counter() - t0), max(memory.cache_tokens())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--kept", type=float, default=0.25, help="kept fraction for the compressed run")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (KV reads grow with it)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    preset = PRESETS[args.preset]
    device = preset["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-7b needs a CUDA device")
    torch.manual_seed(0)
    model = random_llama(preset["config"], device, getattr(torch, preset["dtype"]))
    adapter = CausalLMAdapter(model)
    rows = []
    print(f"batch {args.batch}; tokens/s = decode steps/s of the whole batch", flush=True)
    print(f"{'length':>7} {'full tok/s':>11} {'kept tok/s':>11} {'speed-up':>9} {'cache full/kept':>16}", flush=True)
    for length in args.lengths or preset["lengths"]:
        ids = torch.randint(0, model.config.vocab_size, (args.batch, length), device=device)
        full, n_full = decode_rate(adapter, FullCache(), ids, args.steps, 512)
        # Recency at the same budget stands in for any policy: decode cost depends only on the cache size.
        kept, n_kept = decode_rate(adapter, Recency(budget=args.kept), ids, args.steps, 512)
        rows.append({"length": length, "batch": args.batch, "full_tok_s": full, "kept_tok_s": kept,
                     "speedup": kept / full, "cache_full": n_full, "cache_kept": n_kept})
        print(f"{length:>7} {full:>11.1f} {kept:>11.1f} {kept / full:>9.2f} {n_full:>8}/{n_kept:<7}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "kept": args.kept, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
