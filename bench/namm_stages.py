"""Where one layer's NAMM update spends its time: each stage timed alone, side by side, in one run.

    PYTHONPATH=. python bench/namm_stages.py --preset cpu-small
    PYTHONPATH=. python bench/namm_stages.py --preset gpu-7b      # one Llama-3-8B layer: 32 q / 8 KV heads, d 128
    PYTHONPATH=. python bench/namm_stages.py --preset cpu-small --stages fused   # only the fused/unfused rows

For one layer with n_keys cached keys and 512 buffered queries it times (median of --repeats, after a
warm-up; CUDA-synchronised) and measures the transient memory of: the model's own attention for the
chunk (masked SDPA and the mask-free causal kernel), the eager attention that the reference path runs
instead (bf16 QK^T, fp32 softmax, probabilities kept), our attention slice, and each stage of
`namm_update`: STFT + EMA as run and in the CPU's unfold form, recency, the BAM scorer in fp32 and with
half-precision attention, selection; then the whole update in both precisions. Ratios are against the
masked SDPA forward of the same layer.

Issue 22's fused update side by side, from the same queries and keys (the memory's causal-only case):
`slice_stft` (attention slice, then STFT + EMA) against `fused_features` (transfer/fused.py: blocks of
keys reduced straight into the features, with its first pass for the softmax normaliser),
`fused_first_pass` (that pass alone) and `fused_features_lse` (the normaliser given, as a flash forward
would return it), `fused_triton` (/ `_lse`: the same with transfer/fused_triton.py's kernel; CUDA with
Triton only); `update_slice` / `update_fused` (/ `_lse`, / `_fast`) are whole updates from queries
and keys to the kept indices. The closing lines print fused / unfused ratios and transient memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import sync
from transfer.fused import AttentionInputs, attention_features, attention_lse, fused_namm_score
from transfer.memory import _causal_sdpa, _grouped_sdpa, _slot_mask, attention_slice
from transfer.namm import (
    NAMMBuffers,
    NAMMConfig,
    NAMMParams,
    NormStats,
    bam_scores,
    ema_update,
    namm_update,
    normalise,
    recency_features,
    select_keep,
    spectral_ema,
    stft_magnitudes,
)

PRESETS = {
    "cpu-small": dict(heads=8, kv_heads=4, head_dim=64, lengths=[2048], device="cpu", dtype="float32", repeats=3),
    "gpu-7b": dict(heads=32, kv_heads=8, head_dim=128, lengths=[8192, 32768, 65536], device="cuda",
                   dtype="bfloat16"),
}
N_NEW = 512
RATIOS = [("fused_features", "slice_stft"), ("fused_features_lse", "slice_stft"), ("fused_triton", "slice_stft"),
          ("fused_triton_lse", "slice_stft"), ("update_fused", "update_slice"), ("update_fused_lse", "update_slice"),
          ("update_fused_fast", "update_slice_fast")]


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def eager_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """The reference path: HF eager attention's probabilities (bf16 logits, fp32 softmax, cast back), GQA mean."""
    b, hq, n, d = query.shape
    h = key.shape[1]
    logits = torch.matmul(query, key.repeat_interleave(hq // h, 1).transpose(2, 3)) * scaling  # (b, hq, n, nk)
    logits = logits + torch.where(mask.repeat_interleave(hq // h, 1), 0.0, float("-inf")).to(logits.dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return probs.view(b, h, hq // h, n, -1).mean(2)


def triton_on(device: str) -> bool:
    """The Triton rows run on CUDA with Triton installed."""
    from transfer import fused_triton

    return device == "cuda" and fused_triton.available()


def bench_length(preset: dict, n_keys: int, repeats: int, only: set[str] | None = None) -> dict:
    device, dtype = preset["device"], getattr(torch, preset["dtype"])
    hq, h, d = preset["heads"], preset["kv_heads"], preset["head_dim"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, hq, N_NEW, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, h, n_keys, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, h, n_keys, d, device=device, dtype=dtype, generator=g)
    slots = torch.arange(n_keys, device=device).expand(1, h, n_keys)
    valid = torch.ones(1, h, n_keys, dtype=torch.bool, device=device)
    q_slots = torch.arange(n_keys - N_NEW, n_keys, device=device)[None]
    q_valid = torch.ones(1, N_NEW, dtype=torch.bool, device=device)
    scaling = d**-0.5
    cfg = NAMMConfig()
    theta = torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.1
    params = NAMMParams.from_flat(theta.to(device), cfg)
    norm = NormStats(mean=torch.zeros(17), var=torch.ones(17), count=1)
    buffers = NAMMBuffers(context=torch.zeros(1, h, n_keys - N_NEW, 16, device=device),
                          ema=torch.zeros(1, h, n_keys - N_NEW, 17, device=device))

    mask = _slot_mask(slots, valid, q_slots)
    attn = attention_slice(q, k, slots, valid, q_slots, q_valid, scaling)  # (1, h, 512, n_keys) fp32
    series = attn.transpose(-1, -2)
    context = torch.cat([buffers.context, series.new_zeros(1, h, N_NEW, 16)], dim=-2)
    ema = spectral_ema(attn, context, buffers.ema, cfg)
    x = torch.cat([recency_features(slots, cfg, valid), normalise(ema, norm)], dim=-1)
    scores = bam_scores(x, params, valid)

    def bam_half() -> torch.Tensor:
        half = torch.float16 if device == "cuda" else torch.bfloat16
        qkv = x @ params.w_qkv + params.b_qkv
        qh, kh, vh = (t.to(half).flip(-2) for t in qkv.split(32, dim=-1))
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).flip(-2)

    inp = AttentionInputs(q, k, slots, valid, q_slots, q_valid, scaling, causal_only=True)  # as the memory has it
    lse = attention_lse(inp)  # what a flash forward would return: (1, q_heads, 512)
    with_lse = AttentionInputs(q, k, slots, valid, q_slots, q_valid, scaling, causal_only=True, lse=lse)
    half = torch.float16 if device == "cuda" else None

    def slice_update(fast: bool) -> object:
        """The unfused update from queries and keys: the causal-only slice, then namm_update."""
        a = attention_slice(q, k, slots, valid, q_slots, q_valid, scaling, causal_only=True, ordered=True)
        return namm_update(a, buffers, slots, params, norm, cfg, attention_dtype=half if fast else None,
                           check_finite=False)

    def fused_update(fast: bool, source: AttentionInputs = inp) -> object:
        s, _ = fused_namm_score(source, buffers, slots, params, norm, cfg, attention_dtype=half if fast else None)
        return select_keep(s, None)

    def triton_features(source: AttentionInputs) -> object:
        """fused.py with its Triton kernel (CUDA; see transfer/fused_triton.py)."""
        from transfer import fused

        kernel, fused.KERNEL = fused.KERNEL, "triton"
        try:
            return attention_features(source, buffers, cfg)
        finally:
            fused.KERNEL = kernel

    stages = {
        "sdpa_forward": lambda: _grouped_sdpa(q, k, v, _slot_mask(slots, valid, q_slots), scaling),
        "causal_sdpa_forward": lambda: _causal_sdpa(q, k, v, scaling),
        "slot_mask": lambda: _slot_mask(slots, valid, q_slots),
        "eager_probs": lambda: eager_probs(q, k, mask, scaling),
        "attention_slice": lambda: attention_slice(q, k, slots, valid, q_slots, q_valid, scaling),
        "attention_slice_causal": lambda: attention_slice(q, k, slots, valid, q_slots, q_valid, scaling,
                                                          causal_only=True),
        "namm_update_fast": lambda: namm_update(attn, buffers, slots, params, norm, cfg, valid=valid,
                                                attention_dtype=torch.float16 if device == "cuda" else None),
        "stft_ema": lambda: spectral_ema(attn, context, buffers.ema, cfg),
        "stft_ema_unfold": lambda: ema_update(stft_magnitudes(series, context, cfg), buffers.ema, N_NEW, cfg),
        "recency": lambda: recency_features(slots, cfg, valid),
        "bam_fp32": lambda: bam_scores(x, params, valid),
        "bam_attention_half": bam_half,
        "select_keep": lambda: select_keep(scores, valid),
        "namm_update": lambda: namm_update(attn, buffers, slots, params, norm, cfg, valid=valid),
        # issue 22 item 1, side by side: the features from queries and keys, unfused (slice + STFT) or fused
        "slice_stft": lambda: spectral_ema(attention_slice(q, k, slots, valid, q_slots, q_valid, scaling,
                                                           causal_only=True, ordered=True), context, buffers.ema, cfg),
        "fused_features": lambda: attention_features(inp, buffers, cfg),
        "fused_first_pass": lambda: attention_lse(inp),
        "fused_features_lse": lambda: attention_features(with_lse, buffers, cfg),
        "fused_triton": lambda: triton_features(inp),
        "fused_triton_lse": lambda: triton_features(with_lse),
        "update_slice": lambda: slice_update(False),
        "update_fused": lambda: fused_update(False),
        "update_fused_lse": lambda: fused_update(False, with_lse),
        "update_slice_fast": lambda: slice_update(True),
        "update_fused_fast": lambda: fused_update(True),
    }
    row: dict = {"n_keys": n_keys}
    for name, fn in stages.items():
        if (only and name not in only) or ("triton" in name and not triton_on(device)):
            continue
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        try:
            row[name] = timed(fn, device, repeats)
        except torch.OutOfMemoryError:
            row[name] = float("nan")
        if device == "cuda":  # transient memory of the stage beyond what was allocated before it
            row[name + "_mem"] = torch.cuda.max_memory_allocated() - base
    for new, old in RATIOS:  # side by side: alternate the two, so that load on a shared host hits both alike
        if new in row and old in row and row[new] == row[new] and row[old] == row[old]:  # neither ran out of memory
            try:
                row[f"{new}/{old}"] = interleaved_ratio(stages[new], stages[old], device, repeats)
            except torch.OutOfMemoryError:
                row[f"{new}/{old}"] = float("nan")
    return row


def interleaved_ratio(new: Callable[[], object], old: Callable[[], object], device: str, repeats: int) -> float:
    """min time of `new` / min time of `old`, the two timed alternately `repeats` times each."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((new, old)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] / best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--repeats", type=int, default=None, help="timings per stage (default: the preset's, else 5)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--stages", default=None,
                   help="comma list of stages to run (default: all); 'fused' = the side-by-side rows only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: fair timings on a busy host)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = None
    if args.stages:
        names = args.stages.split(",")
        only = {"sdpa_forward", *names, *((n for r in RATIOS for n in r) if "fused" in names else ())}
    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-7b needs a CUDA device")
    env = {"preset": args.preset, "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if preset["device"] == "cuda" else "cpu"}
    print(json.dumps(env), flush=True)
    rows = []
    for n in args.lengths or preset["lengths"]:
        row = bench_length(preset, n, args.repeats or preset.get("repeats", 5), only)
        rows.append(row)
        base = row["sdpa_forward"]
        print(f"n_keys {n}: one layer, times in ms (x SDPA forward of the chunk)", flush=True)
        for name, t in row.items():
            if name != "n_keys" and not name.endswith("_mem") and "/" not in name:
                mem = row.get(name + "_mem")
                print(f"  {name:>22} {1e3 * t:9.3f} ms  {t / base:7.2f}x"
                      + ("" if mem is None else f"  {mem / 2**20:9.1f} MiB transient"), flush=True)
        print("  fused / unfused, min of the two timed alternately (< 1: the fused path is faster):", flush=True)
        for new, old in RATIOS:
            if f"{new}/{old}" not in row:
                continue
            print(f"  {new:>22} / {old:<17} {row[f'{new}/{old}']:6.3f}"
                  + ("" if new + "_mem" not in row else
                     f"   transient {row[new + '_mem'] / 2**20:.1f} / {row[old + '_mem'] / 2**20:.1f} MiB"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
