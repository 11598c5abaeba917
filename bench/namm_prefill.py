"""The NAMM at real size: its prefill overhead on our path and on the eager reference path, peak memory
and decode speed, side by side in one run on one model.

    PYTHONPATH=. python bench/namm_prefill.py --preset cpu-small
    PYTHONPATH=. python bench/namm_prefill.py --preset gpu-7b --json out.json   # Llama-3-8B shapes, bf16

For each context length L (random tokens, random weights), each run prefills L tokens in 512-token chunks
and then greedily decodes --steps tokens:

    native      HF SDPA + DynamicCache, full cache: the model as transformers runs it
    full        our memory, full cache
    namm        our memory + the NAMM in budget mode (--kept of the tokens seen, 25 % by default), one
                update every 512 tokens, reference precision (fp32 BAM)
    namm-fast   the same with the BAM's attention in fp16 (`precision="fast"`; CUDA only)
    namm-fused  `namm` with the fused features (transfer/fused.py: no attention slice; `fused=True`), and
    namm-fast-fused  the same for `namm-fast`: the closing lines print fused / unfused overhead ratios
    namm-triton / namm-fast-triton  the fused runs with transfer/fused_triton.py's kernel (CUDA, Triton)
    eager-namm  the reference path: every layer runs eager attention (bf16 logits, fp32 softmax cast back)
                and the NAMM reads those probabilities, buffered per chunk, instead of our attention slice
    recency     our memory keeping the newest tokens at the same budget: no policy computation

Budget mode makes every NAMM run keep exactly as many tokens as recency does, update by update, so their
caches (and forwards) have the same sizes: NAMM overhead = prefill(run) - prefill(recency). Every run
is preceded by an untimed warm-up of the same kind on a short context. `update` is the GPU time inside the
layer updates (CUDA events; slice + NAMM + gather). Memory: peak and final allocated bytes against
weights + kept x the full cache's KV bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, LlamaConfig

from adapters.base import install_memory_attention
from adapters.causal_lm import CausalLMAdapter
from bench.common import LLAMA3_8B, LLAMA_CPU_SMALL, random_llama, sync
from transfer import fused as fused_module
from transfer import fused_triton
from transfer.memory import KVMemory, _LayerState, _slot_mask
from transfer.policies.full import FullCache
from transfer.policies.namm import NAMMPolicy
from transfer.policies.recency import Recency

PRESETS = {
    "cpu-small": dict(config=LLAMA_CPU_SMALL, lengths=[2048], runs="native,full,namm,namm-fused,eager-namm,recency",
                      dtype="float32", device="cpu"),
    "gpu-7b": dict(config=LLAMA3_8B, lengths=[8192, 32768, 65536],
                   runs="native,full,namm,namm-fused,namm-triton,namm-fast,namm-fast-fused,namm-fast-triton,eager-namm,recency",
                   dtype="bfloat16", device="cuda"),
}
CHUNK = 512
WARM_STEPS = 4  # decode steps before the timed ones


class EagerPathMemory(KVMemory):
    """The reference implementation's path: eager attention in every layer, its probabilities buffered
    (GQA-averaged, in the model's dtype) until the update, then padded and concatenated for the NAMM."""

    def _attention(self, st: _LayerState, query, key, value, scaling, sliding_window):
        b, hq, n, d = query.shape
        h, nk = key.shape[1], key.shape[2]
        g = hq // h
        logits = torch.matmul(query, key.repeat_interleave(g, 1).transpose(2, 3)) * scaling  # (b, hq, n, nk)
        mask = _slot_mask(st.slots, st.valid, self._chunk_slots, sliding_window).repeat_interleave(g, 1)
        probs = torch.softmax(logits.masked_fill_(~mask, float("-inf")), dim=-1, dtype=torch.float32)
        probs = probs.to(query.dtype)
        out = torch.matmul(probs, value.repeat_interleave(g, 1))  # (b, hq, n, d)
        st.policy_probs = [*getattr(st, "policy_probs", []), probs.view(b, h, g, n, nk).mean(2)]
        return out.transpose(1, 2).contiguous()

    def _policy_attention(self, st: _LayerState, key, scaling, sliding_window):
        nk = key.shape[2]
        # earlier chunks saw fewer keys: right-pad with zeros (reference: pad_and_concat_buffered_attn_mxs)
        parts = [torch.nn.functional.pad(p, (0, nk - p.shape[-1])) for p in st.policy_probs]
        st.policy_probs = []
        return torch.cat(parts, dim=2).float()  # (batch, kv_heads, n_new, n_keys)


def timed_updates(memory: KVMemory, device: str) -> Callable[[], float]:
    """Wrap the memory's layer update with timers; returns a function giving the total seconds."""
    spans: list = []
    inner = memory._update_layer

    def wrapped(*args, **kwargs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            inner(*args, **kwargs)
            end.record()
            spans.append((start, end))
        else:
            t0 = time.perf_counter()
            inner(*args, **kwargs)
            spans.append(time.perf_counter() - t0)

    memory._update_layer = wrapped
    return lambda: sum(s.elapsed_time(e) / 1e3 for s, e in spans) if device == "cuda" else sum(spans)


def kv_bytes(cfg: LlamaConfig, tokens: int, dtype: torch.dtype) -> int:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * dtype.itemsize


def run_ours(adapter: CausalLMAdapter, ids, policy, steps: int, device: str, memory_cls=KVMemory) -> dict:
    memory = adapter.new_memory(policy, update_interval=CHUNK)
    if memory_cls is not KVMemory:
        memory.__class__ = memory_cls
    update_time = timed_updates(memory, device)
    sync(device)
    t0 = time.perf_counter()
    logits = adapter.prefill(memory, ids, chunk_size=CHUNK)
    sync(device)
    prefill = time.perf_counter() - t0
    token = logits.argmax(-1, keepdim=True)
    for _ in range(WARM_STEPS):
        token = adapter.prefill(memory, token).argmax(-1, keepdim=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = adapter.prefill(memory, token).argmax(-1, keepdim=True)
    sync(device)
    decode = steps / (time.perf_counter() - t0)
    return {"prefill_s": prefill, "update_s": update_time(), "decode_tok_s": decode,
            "cache_tokens": max(memory.cache_tokens()), "kept_fraction": float(memory.kept_fraction()[0])}


def run_native(model, ids, steps: int, device: str) -> dict:
    cache = DynamicCache(config=model.config)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, ids.shape[1], CHUNK):
            out = model(input_ids=ids[:, start : start + CHUNK], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
        sync(device)
        prefill = time.perf_counter() - t0
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(WARM_STEPS):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        sync(device)
    return {"prefill_s": prefill, "update_s": 0.0, "decode_tok_s": steps / (time.perf_counter() - t0),
            "cache_tokens": ids.shape[1] + steps + WARM_STEPS, "kept_fraction": 1.0}


def one_run(model, adapter: CausalLMAdapter, name: str, ids: torch.Tensor, args, device: str) -> dict | None:
    if name == "native":
        model.set_attn_implementation("sdpa")
        try:
            return run_native(model, ids, args.steps, device)
        finally:
            install_memory_attention(model)
    if name == "full":
        return run_ours(adapter, ids, FullCache(), args.steps, device)
    if name == "recency":
        return run_ours(adapter, ids, Recency(budget=args.kept), args.steps, device)
    if name in ("namm", "namm-fast", "namm-fused", "namm-fast-fused", "namm-triton", "namm-fast-triton", "eager-namm"):
        if ("fast" in name or "triton" in name) and device != "cuda":
            return None
        if name.endswith("-triton") and not fused_triton.available():
            print(f"{name}: skipped, Triton is not installed", flush=True)
            return None
        policy = NAMMPolicy.from_checkpoint(budget=args.kept, precision="fast" if "fast" in name else "fp32",
                                            fused=name.endswith(("-fused", "-triton")))
        if name.endswith("-triton"):
            kernel, fused_module.KERNEL = fused_module.KERNEL, "triton"
            try:
                return run_ours(adapter, ids, policy, args.steps, device)
            finally:
                fused_module.KERNEL = kernel
        return run_ours(adapter, ids, policy, args.steps, device, EagerPathMemory if name == "eager-namm" else KVMemory)
    raise SystemExit(f"unknown run {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--runs", default=None, help="comma list of runs (default: the preset's)")
    p.add_argument("--kept", type=float, default=0.25, help="the NAMM's budget, as a fraction of tokens seen")
    p.add_argument("--steps", type=int, default=32, help="greedy decode steps timed after the prefill")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: fair timings on a busy host)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    device, dtype = preset["device"], getattr(torch, preset["dtype"])
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-7b needs a CUDA device")
    runs = (args.runs or preset["runs"]).split(",")
    model = random_llama(preset["config"], device, dtype)
    cfg = model.config
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    adapter = CausalLMAdapter(model)  # installs our attention; "native" switches to HF SDPA for its run
    env = {"preset": args.preset, "torch": torch.__version__, "dtype": preset["dtype"], "kept": args.kept,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "weights_bytes": weights}
    print(json.dumps(env), flush=True)
    results = []
    for length in args.lengths or preset["lengths"]:
        ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)
        full_kv = kv_bytes(cfg, length, dtype)
        for name in runs:
            one_run(model, adapter, name, ids[:, : 4 * CHUNK], args, device)  # warm-up, untimed
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = one_run(model, adapter, name, ids, args, device)
            if row is None:
                continue
            if device == "cuda":
                row["peak_bytes"] = torch.cuda.max_memory_allocated()
                row["expected_bytes"] = weights + row["kept_fraction"] * full_kv
            results.append({"length": length, "run": name, **row})
            print(json.dumps(results[-1]), flush=True)
        print_table([r for r in results if r["length"] == length], length)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": results}, f, indent=2)


def print_table(rows: list[dict], length: int) -> None:
    by = {r["run"]: r for r in rows}
    base = by.get("recency")  # same cache sizes as the NAMM runs, no policy cost

    def overhead(name: str) -> float | None:
        """Prefill seconds the policy adds over the recency run (None without that run)."""
        return by[name]["prefill_s"] - base["prefill_s"] if base and name in by else None

    print(f"\nL = {length}: prefill and decode, ratios measured in this run")
    print(f"{'run':>11} {'prefill s':>10} {'update s':>9} {'overhead':>9} {'decode tok/s':>13} {'cache':>7} "
          f"{'peak GB':>8} {'peak/expected':>14}")
    for name, r in by.items():
        extra = overhead(name) if "namm" in name else None
        share = None if extra is None else f"{100 * extra / base['prefill_s']:.0f} %"
        peak = r.get("peak_bytes")
        ratio = None if peak is None else peak / r["expected_bytes"]
        print(f"{name:>11} {r['prefill_s']:>10.3f} {r['update_s']:>9.3f} {share or '':>9} {r['decode_tok_s']:>13.2f} "
              f"{r['cache_tokens']:>7} {'' if peak is None else f'{peak / 2**30:.2f}':>8} "
              f"{'' if ratio is None else f'{ratio:.3f}':>14}")
    eager = overhead("eager-namm")
    for name in ("namm", "namm-fast", "namm-fused", "namm-fast-fused", "namm-triton", "namm-fast-triton"):
        ours = overhead(name)
        if eager is not None and ours is not None:
            print(f"NAMM overhead, eager path / {name}: {eager / max(ours, 1e-9):.2f}x")
    for name, suffix in (("namm", "-fused"), ("namm-fast", "-fused"), ("namm", "-triton"), ("namm-fast", "-triton")):
        if name in by and name + suffix in by:  # issue 22: the fused features against the slice, same run
            fused, plain = by[name + suffix], by[name]
            ratio = None if base is None else overhead(name + suffix) / max(overhead(name), 1e-9)
            print(f"{name}{suffix} / {name}: update time {fused['update_s'] / max(plain['update_s'], 1e-9):.3f}, "
                  f"prefill {fused['prefill_s'] / plain['prefill_s']:.3f}"
                  + ("" if ratio is None else f", overhead vs recency {ratio:.3f}")
                  + ("" if "peak_bytes" not in fused else f", peak {fused['peak_bytes'] / plain['peak_bytes']:.3f}"))
    if "full" in by and "namm" in by:
        print(f"decode speed-up at {by['namm']['kept_fraction']:.0%} kept vs our full cache: "
              f"{by['namm']['decode_tok_s'] / by['full']['decode_tok_s']:.2f}x"
              + (f"; vs native: {by['namm']['decode_tok_s'] / by['native']['decode_tok_s']:.2f}x"
                 if "native" in by else ""))


if __name__ == "__main__":
    main()
