"""Decode tokens/s, side by side in one run: our eager dynamic path, our compiled static path, HF's anchor.

    PYTHONPATH=. python bench/decode_speed.py --preset cpu-small          # about a minute on 2 CPU cores
    PYTHONPATH=. python bench/decode_speed.py --preset gpu-7b --batch 1 --json decode_b1.json
    PYTHONPATH=. python bench/decode_speed.py --preset gpu-7b --batch 8 --json decode_b8.json

For each context length L (random tokens, random weights) each policy prefills L tokens once under our
memory (512-token chunks, an update every --update-interval tokens) and is snapshotted; every row then
restores that snapshot and greedily decodes --steps tokens (each token fed back), timed after warm-up
steps, --repeats times (the fastest window counts). The policy keeps running on its schedule, so a timed
window of one update interval holds exactly one update (its cost is in the rate; "in updates" is the
share of the static rows' window spent in it):

    eager full / recency / namm   our `KVMemory` decode (the dynamic path: shapes change every step)
    static full / recency / namm  the compacting static cache (transfer/static_cache.py): capacity = the
                                  policy's budget + one update interval, the step under torch.compile
                                  (--compile-mode; "reduce-overhead" = CUDA graphs, the default on CUDA),
                                  the memory's update run eagerly between steps
    hf static                     transformers' StaticCache + torch.compile of the plain SDPA model, full cache
                                  (the anchor of issue 22)

recency and namm keep --kept of the tokens seen (the NAMM in budget mode, the shipped checkpoint), so their
caches have the same sizes. The ratios printed at the end are issue 22's: the NAMM at 25 % on the compiled
static path against our compiled full cache (target >= 1.6x) and its tokens/s at batch 1 (target >= 100 at
32k on the H200), plus each compiled row against its eager row and against HF's anchor.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch._dynamo

from adapters.causal_lm import CausalLMAdapter
from bench.common import LLAMA3_8B, LLAMA_CPU_SMALL, random_llama, sync
from transfer.memory import KVMemory
from transfer.policies.full import FullCache
from transfer.policies.namm import NAMMPolicy
from transfer.policies.recency import Recency
from transfer.static_cache import attn_implementation, default_capacity

PRESETS = {
    "cpu-small": dict(config=LLAMA_CPU_SMALL, lengths=[1024], device="cpu", dtype="float32", update_interval=64,
                      steps=64, repeats=3, runs="eager-full,eager-namm,static-full,static-namm,hf-static"),
    "gpu-7b": dict(config=LLAMA3_8B, lengths=[8192, 32768], device="cuda", dtype="bfloat16", update_interval=512,
                   steps=512, repeats=1,
                   runs="eager-full,eager-recency,eager-namm,static-full,static-recency,static-namm,hf-static"),
}
CHUNK = 512
WARM_STEPS = 4  # static: the first step runs eagerly (it records each layer's arguments), the second compiles,
# the next ones warm up and record the CUDA graphs (cudagraph trees record on the second compiled call)


def make_policy(name: str, kept: float):
    if name == "full":
        return FullCache()
    if name == "recency":
        return Recency(budget=kept)
    if name == "namm":
        return NAMMPolicy.from_checkpoint(budget=kept)
    raise SystemExit(f"unknown policy {name!r}")


def timed(step, token: torch.Tensor, steps: int, device: str) -> float:
    """Seconds for `steps` greedy steps (each step's argmax fed back), device work included."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = step(token).argmax(-1)
    sync(device)
    return time.perf_counter() - t0


def run_ours(adapter: CausalLMAdapter, memory: KVMemory, snap: dict, token: torch.Tensor, kind: str, args,
             device: str) -> dict:
    """One row on a restored snapshot: the eager dynamic decode or the static one (compiled or not).

    The timed window runs --repeats times from the snapshot; the fastest counts (the CPU is shared). For the
    static rows the memory's updates are also timed on their own (device synced around each), `update_s`.
    """
    memory.restore(snap)
    times, update_s = [], []
    if kind == "eager":
        step = lambda t: adapter.prefill(memory, t[:, None])  # noqa: E731  (the dynamic decode step)
        warm = token
        for _ in range(WARM_STEPS):
            warm = step(warm).argmax(-1)
        for _ in range(args.repeats):
            memory.restore(snap)
            times.append(timed(step, token, args.steps, device))
        cache, capacity = max(memory.cache_tokens()), None
    else:
        capacity = default_capacity(memory, WARM_STEPS + args.steps)
        torch._dynamo.reset()  # every static row compiles for its own shapes (no symbolic capacity), as HF's row
        decoder = adapter.static_decoder(capacity, args.compile_mode)
        t0 = time.perf_counter()
        decoder.load(memory)
        warm = token
        for _ in range(WARM_STEPS):
            warm = decoder.step(warm).argmax(-1)
        sync(device)
        compile_s = time.perf_counter() - t0
        update = decoder._update
        spent = [0.0]

        def timed_update(mem: KVMemory) -> None:
            sync(device)
            t = time.perf_counter()
            update(mem)
            sync(device)
            spent[0] += time.perf_counter() - t

        decoder._update = timed_update
        for _ in range(args.repeats):
            memory.restore(snap)
            decoder.load(memory)
            spent[0] = 0.0
            times.append(timed(decoder.step, token, args.steps, device))
            update_s.append(spent[0])
        cache = max(decoder._fill)  # no sync(): its copy of the cache would only cost memory here
        adapter.__dict__.pop("_static_decoder", None)  # free the buffers before the next row
    best = min(range(len(times)), key=times.__getitem__)
    seconds = times[best]
    row = {"tok_s": args.steps * token.shape[0] / seconds, "steps_s": args.steps / seconds, "cache_end": cache,
           "capacity": capacity, "seconds": times}
    if kind != "eager":
        row["warm_and_compile_s"] = compile_s
        row["update_s"] = update_s[best]
    return row


def run_hf_static(model, ids: torch.Tensor, args, device: str) -> dict:
    """transformers' StaticCache + torch.compile of the plain SDPA model (full cache): the anchor row."""
    from transformers import StaticCache

    b, length = ids.shape
    torch._dynamo.reset()
    total = length + WARM_STEPS + args.repeats * args.steps + 1
    with attn_implementation(model, "sdpa"), torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=total)

        def forward(tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            out = model(input_ids=tokens, position_ids=position.expand(b, 1), cache_position=position,
                        past_key_values=cache, use_cache=True)
            return out.logits[:, -1].float()

        for start in range(0, length, CHUNK):  # eager chunked prefill
            end = min(length, start + CHUNK)
            pos = torch.arange(start, end, device=device)
            logits = model(input_ids=ids[:, start:end], position_ids=pos.expand(b, -1), cache_position=pos,
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
        compiled = torch.compile(forward, mode=args.compile_mode if isinstance(args.compile_mode, str) else None,
                                 fullgraph=True, dynamic=False)
        cudagraphs = args.compile_mode == "reduce-overhead" and device == "cuda"
        counter = [length]

        def step(token: torch.Tensor) -> torch.Tensor:
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            position = torch.tensor([counter[0]], device=device)
            counter[0] += 1
            out = compiled(token[:, None], position)
            return out.clone() if cudagraphs else out

        t0 = time.perf_counter()
        token = logits.argmax(-1)
        for _ in range(WARM_STEPS):
            token = step(token).argmax(-1)
        sync(device)
        compile_s = time.perf_counter() - t0
        # the cache is full-size from the start, so later windows only attend over a few more entries
        seconds = min(timed(step, token, args.steps, device) for _ in range(args.repeats))
    return {"tok_s": args.steps * b / seconds, "steps_s": args.steps / seconds, "cache_end": counter[0],
            "capacity": total, "warm_and_compile_s": compile_s}


def ratio(rows: dict, a: str, b: str) -> float | None:
    return rows[a]["tok_s"] / rows[b]["tok_s"] if a in rows and b in rows else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--kept", type=float, default=0.25, help="kept fraction of the compressed runs")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default: one update interval)")
    p.add_argument("--update-interval", type=int, default=None)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (KV reads grow with it)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--runs", default=None, help="comma list of rows (default: the preset's)")
    p.add_argument("--compile-mode", default=None,
                   help='torch.compile mode of the static rows: "reduce-overhead" (CUDA graphs; default on CUDA), '
                        '"default" (default on the CPU), "none" (eager static path)')
    p.add_argument("--repeats", type=int, default=None,
                   help="timed windows per row, the fastest counts (default: 3 on the shared CPU, 1 on the GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default on the CPU: 1, the CI machine's cores are shared)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    preset = PRESETS[args.preset]
    device = preset["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-7b needs a CUDA device")
    if device == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    args.steps = args.steps or preset["steps"]
    args.repeats = args.repeats or preset["repeats"]
    interval = args.update_interval or preset["update_interval"]
    mode = args.compile_mode or ("reduce-overhead" if device == "cuda" else "default")
    args.compile_mode = False if mode == "none" else (True if mode == "default" else mode)
    runs = (args.runs or preset["runs"]).split(",")
    torch.manual_seed(0)
    model = random_llama(preset["config"], device, getattr(torch, preset["dtype"]))
    adapter = CausalLMAdapter(model)
    print(f"preset {args.preset}, batch {args.batch}, update every {interval}, {args.steps} timed steps, "
          f"compile mode {mode}; tok/s = tokens of the whole batch per second", flush=True)
    print(f"{'length':>7} {'row':<15} {'tok/s':>9} {'cache':>7} {'capacity':>9} {'warm+compile':>13} "
          f"{'in updates':>11}", flush=True)
    results = []
    for length in args.lengths or preset["lengths"]:
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, length), generator=g).to(device)
        rows: dict[str, dict] = {}
        for policy in ("full", "recency", "namm"):
            kinds = [k for k in ("eager", "static") if f"{k}-{policy}" in runs]
            if not kinds:
                continue
            memory = adapter.new_memory(make_policy(policy, args.kept), update_interval=interval)
            logits = adapter.prefill(memory, ids, chunk_size=CHUNK)
            snap = memory.snapshot()
            for kind in kinds:
                rows[f"{kind}-{policy}"] = run_ours(adapter, memory, snap, logits.argmax(-1), kind, args, device)
                report(length, f"{kind}-{policy}", rows[f"{kind}-{policy}"])
            del memory, snap
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        if "hf-static" in runs:
            rows["hf-static"] = run_hf_static(model, ids, args, device)
            report(length, "hf-static", rows["hf-static"])
            gc.collect()
        ratios = {
            "static-namm / static-full (target >= 1.6)": ratio(rows, "static-namm", "static-full"),
            "static-namm / eager-namm": ratio(rows, "static-namm", "eager-namm"),
            "static-full / eager-full": ratio(rows, "static-full", "eager-full"),
            "static-recency / static-full": ratio(rows, "static-recency", "static-full"),
            "eager-namm / eager-full": ratio(rows, "eager-namm", "eager-full"),
            "static-full / hf-static": ratio(rows, "static-full", "hf-static"),
            "static-namm / hf-static": ratio(rows, "static-namm", "hf-static"),
        }
        print(f"ratios at L={length} (tok/s over tok/s):", flush=True)
        for name, value in ratios.items():
            if value is not None:
                print(f"  {name:<44} {value:6.2f}x", flush=True)
        if "static-namm" in rows:
            target = " (target at batch 1 on the GPU, 32k: >= 100)" if args.batch == 1 else ""
            print(f"  static-namm tokens/s{target}: {rows['static-namm']['tok_s']:.1f}", flush=True)
        results.append({"length": length, "rows": rows, "ratios": ratios})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "batch": args.batch, "kept": args.kept, "steps": args.steps,
                       "update_interval": interval, "compile_mode": mode, "torch": torch.__version__,
                       "results": results}, f, indent=2)


def report(length: int, name: str, row: dict) -> None:
    cap = "-" if row["capacity"] is None else str(row["capacity"])
    warm = f"{row['warm_and_compile_s']:.1f} s" if "warm_and_compile_s" in row else "-"
    upd = f"{row['update_s'] / min(row['seconds']):.0%}" if "update_s" in row else "-"
    print(f"{length:>7} {name:<15} {row['tok_s']:>9.1f} {row['cache_end']:>7} {cap:>9} {warm:>13} {upd:>11}",
          flush=True)


if __name__ == "__main__":
    main()
