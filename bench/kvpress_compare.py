"""kvpress's presses against the full cache and our NAMM, at one kept fraction, side by side in one run (issue 8).

For each context length and method: prefill the random context once (timed, compression included), then
greedy-decode --steps tokens (timed after one warm-up step); report prefill seconds, decode tokens/s, peak
GPU memory (max_memory_allocated, reset before each method; with and without the weights), cache tokens and KV
bytes, and each ratio to the full cache of the same run (same process, same random weights). `=full tok` is the
share of greedy tokens equal to the full cache's: ours-full must read 1.00 in float32 (it checks positions after
the prefill); in bf16 small differences are rounding, and with random weights other rows mean nothing.

Methods (--methods):
- full: native HF (SDPA + DynamicCache), the context in one forward of `model.model`, as kvpress's pipeline does;
- knorm, snapkv, streamingllm: kvpress's KnormPress / SnapKVPress / StreamingLLMPress at
  compression_ratio = 1 - --kept, applied the kvpress way (`with press(model): model.model(ctx, past_key_values=
  cache)`), then decoding with absolute `position_ids` (the cache is shorter than the context), as its pipeline;
- ours-full, namm: our memory (adapters.causal_lm.CausalLMAdapter, slot-masked SDPA, 512-token chunks) with the
  full policy, and with the shipped NAMM in budget mode (`NAMMPolicy.from_checkpoint(budget=--kept)`,
  an update every --update-interval tokens, so the cache is pruned during prefill). Decode never crosses
  an update boundary, so, as with the presses, nothing is evicted while decoding. Prefill times of the
  two families differ in kind (one forward vs chunks + NAMM updates); decode rates and memory compare directly.

kvpress 0.5.5 (the newest release) requires transformers>=4.56,<5.3: on later versions every press fails with
KeyError 'cache_position' in its forward hook, so this script refuses to run there. Our package passes
tests/test_memory.py and the Llama conformance cases on transformers 5.2.0 (gpt2's plain-forward case differs).

    # CPU: a side venv, since kvpress pins transformers 5.2.0 (any directory; KVPRESS_VENV names it here):
    #   python3 -m venv "$KVPRESS_VENV" && "$KVPRESS_VENV/bin/pip" install kvpress==0.5.5
    #   "$KVPRESS_VENV/bin/pip" install --no-deps -e .        # this package, on the venv's transformers
    PYTHONPATH=. "$KVPRESS_VENV/bin/python" bench/kvpress_compare.py --preset cpu-small

    # GPU (transformers 5.17 installed there): transformers 5.2.0, tokenizers 0.22.2 (abi3), kvpress and its
    # small pure dependencies travel as wheels (14 MiB) in the git-ignored .whl-kvpress/ and shadow the installed
    # ones; made on a machine with PyPI by
    #   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
    #     -d .whl-kvpress kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 "cachetools<6" termcolor six \
    #     requests urllib3 idna certifi
    #   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
    #     --platform any -d .whl-kvpress charset_normalizer
    #   pip wheel --no-deps fire==0.6.0 -w .whl-kvpress      # fire 0.6 is an sdist only
    KV=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --target "$KV" .whl-kvpress/*.whl
    PYTHONPATH=$KV:$PWD python3 bench/kvpress_compare.py --preset gpu-7b --json $OUT/kvpress.json

`datasets` (imported by kvpress only for DuoAttention/ExpectedAttentionStats, which this bench does not run;
it would bring pyarrow) is replaced by an empty stub module when it is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from bench.common import LLAMA3_8B, LLAMA_CPU_SMALL, random_llama, sync

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": dict(config=LLAMA_CPU_SMALL, lengths=[2048], device="cpu", dtype="float32"),
    "gpu-7b": dict(config=LLAMA3_8B, lengths=[8192, 32768], device="cuda", dtype="bfloat16"),
}
PRESS_METHODS = ("knorm", "snapkv", "streamingllm")
ALL_METHODS = ("full", *PRESS_METHODS, "ours-full", "namm")


def import_kvpress() -> types.ModuleType:
    """Import kvpress, or exit with one line saying why it cannot run here."""
    if importlib.util.find_spec("datasets") is None:
        sys.modules["datasets"] = types.ModuleType("datasets")  # only DuoAttention/ExpectedAttentionStats use it
        sys.modules["datasets"].load_dataset = None  # type: ignore[attr-defined]
    try:
        import kvpress
    except Exception as e:  # ImportError, or a transformers symbol kvpress expects
        raise SystemExit(f"kvpress is not importable: {type(e).__name__}: {e}") from None
    import transformers
    from packaging.requirements import Requirement

    for spec in importlib.metadata.requires("kvpress") or []:
        req = Requirement(spec)
        if req.name == "transformers" and req.marker is None and transformers.__version__ not in req.specifier:
            raise SystemExit(f"kvpress {importlib.metadata.version('kvpress')} needs transformers{req.specifier}, "
                             f"found {transformers.__version__} (see this script's docstring for the wheels)")
    return kvpress


def make_press(kvpress: types.ModuleType, method: str, kept: float) -> Any:
    """The kvpress press for a method name, removing 1 - kept of the context."""
    cls = {"knorm": kvpress.KnormPress, "snapkv": kvpress.SnapKVPress, "streamingllm": kvpress.StreamingLLMPress}
    return cls[method](compression_ratio=1.0 - kept)


def kv_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a DynamicCache."""
    return sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values) if t is not None)


def timed_decode(step: Callable[[torch.Tensor, int], torch.Tensor], first: torch.Tensor, steps: int,
                 device: torch.device) -> tuple[float, list[int]]:
    """Greedy decoding: one warm-up step from `first` (1, 1), then `steps` timed steps.

    Returns (tokens/s, the steps + 1 greedy tokens); tokens stay on the device until the clock stops.
    """
    tokens = [step(first, 0).argmax(-1, keepdim=True)]  # each (1, 1)
    sync(device)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        tokens.append(step(tokens[-1], i).argmax(-1, keepdim=True))
    sync(device)
    rate = steps / (time.perf_counter() - t0)
    return rate, torch.cat(tokens, dim=1)[0].tolist()


def run_native(model: Any, kvpress: types.ModuleType, method: str, ids: torch.Tensor, kept: float,
               steps: int) -> dict[str, Any]:
    """Full cache or a kvpress press: one-forward prefill of ids (1, L), then decoding, as kvpress's pipeline."""
    from transformers import DynamicCache

    device, length = ids.device, ids.shape[1]
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=model.config)
    press = contextlib.nullcontext() if method == "full" else make_press(kvpress, method, kept)(model)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), press:
        model.model(input_ids=ids, past_key_values=cache)  # no LM head over the context, as the pipeline
    sync(device)
    prefill_s = time.perf_counter() - t0
    n_cache = max(int(lay.keys.shape[-2]) for lay in cache.layers)
    n_bytes = kv_bytes(cache)
    positions = torch.arange(length, length + steps + 1, device=device)[None]  # (1, steps + 1) absolute

    def step(token: torch.Tensor, i: int) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=token, past_key_values=cache, position_ids=positions[:, i:i + 1])
        return out.logits[:, -1]  # (1, vocab)

    rate, tokens = timed_decode(step, ids[:, -1:], steps, device)
    return {"prefill_s": prefill_s, "decode_tok_s": rate, "cache_tokens": n_cache, "kv_bytes": n_bytes,
            "tokens": tokens}


def run_ours(adapter: Any, method: str, ids: torch.Tensor, kept: float, steps: int,
             update_interval: int) -> dict[str, Any]:
    """Our memory (full policy or NAMM at a budget): chunked prefill, then decoding with no update due."""
    from transfer.memory import ATTN_IMPLEMENTATION
    from transfer.policies.full import FullCache
    from transfer.policies.namm import NAMMPolicy

    device, length = ids.device, ids.shape[1]
    if (length + steps + 1) // update_interval != length // update_interval or length % update_interval:
        raise SystemExit(f"length {length} must be a multiple of --update-interval {update_interval}, "
                         f"and --steps + 1 < it, so that decoding never triggers an update")
    adapter.model.set_attn_implementation(ATTN_IMPLEMENTATION)
    policy = FullCache() if method == "ours-full" else NAMMPolicy.from_checkpoint(budget=kept)
    memory = adapter.new_memory(policy, update_interval=update_interval)
    sync(device)
    t0 = time.perf_counter()
    adapter.prefill(memory, ids, chunk_size=512)
    sync(device)
    prefill_s = time.perf_counter() - t0
    n_cache, n_bytes = max(memory.cache_tokens()), kv_bytes(memory.cache)
    rate, tokens = timed_decode(lambda token, i: adapter.prefill(memory, token), ids[:, -1:], steps, device)
    return {"prefill_s": prefill_s, "decode_tok_s": rate, "cache_tokens": n_cache, "kv_bytes": n_bytes,
            "tokens": tokens}


def build_model(preset: dict[str, Any]) -> Any:
    """Random-weight Llama built directly on the device in the bench dtype (an 8B in seconds on a GPU)."""
    return random_llama(preset["config"], preset["device"], getattr(torch, preset["dtype"]),
                        attn_implementation="sdpa")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--kept", type=float, default=0.25, help="kept fraction (kvpress compression_ratio = 1 - kept)")
    p.add_argument("--steps", type=int, default=64, help="timed greedy decoding steps")
    p.add_argument("--lengths", default=None, help="comma-separated context lengths (default: the preset's)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"subset of {','.join(ALL_METHODS)}")
    p.add_argument("--update-interval", type=int, default=512, help="NAMM update interval (tokens)")
    p.add_argument("--json", default=None, help="write the raw rows here")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(ALL_METHODS):
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {','.join(ALL_METHODS)}")
    if "full" not in methods:
        methods.insert(0, "full")  # every ratio is to the full cache of this run
    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-7b needs a CUDA device")
    kvpress = import_kvpress()
    import transformers

    device = torch.device(preset["device"])
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else preset["lengths"]
    torch.manual_seed(0)
    model = build_model(preset)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    adapter = None
    if {"ours-full", "namm"} & set(methods):
        from adapters.causal_lm import CausalLMAdapter

        adapter = CausalLMAdapter(model)
    # warm-up (kernels, allocator, the NAMM's first update) outside every measurement
    warm = torch.randint(0, model.config.vocab_size, (1, 2 * args.update_interval), device=device)  # (1, 2 * interval)
    run_native(model, kvpress, "full", warm, 1.0, 2)
    if adapter is not None:
        run_ours(adapter, "namm" if "namm" in methods else "ours-full", warm, args.kept, 2, args.update_interval)

    rows: list[dict[str, Any]] = []
    head = (f"{'length':>6} {'method':<12} {'kept %':>6} {'prefill s':>9} {'tok/s':>7} {'x full':>6} "
            f"{'peak GiB':>8} {'x full':>6} {'-weights':>8} {'KV MiB':>8} {'=full tok':>9}")
    print(f"kvpress {importlib.metadata.version('kvpress')}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}, {device}, weights {weight_bytes / 2**30:.2f} GiB", flush=True)
    print(head, flush=True)
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)  # (1, L)
        full: dict[str, Any] = {}
        for method in methods:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if method in ("full", *PRESS_METHODS):
                row = run_native(model, kvpress, method, ids, args.kept, args.steps)
            else:
                row = run_ours(adapter, method, ids, args.kept, args.steps, args.update_interval)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            row.update(length=length, method=method, kept_frac=row["cache_tokens"] / length, peak_bytes=peak)
            if method == "full":
                full = row
            row["decode_x_full"] = row["decode_tok_s"] / full["decode_tok_s"]
            row["peak_x_full"] = None if peak is None else peak / full["peak_bytes"]
            # greedy tokens equal to the full cache's (a sanity check of positions: ours-full should be 1.00)
            row["same_tokens"] = sum(a == b for a, b in zip(row["tokens"], full["tokens"])) / len(full["tokens"])
            rows.append(row)
            peak_s = "-" if peak is None else f"{peak / 2**30:.2f}"
            peak_x = "-" if peak is None else f"{row['peak_x_full']:.2f}"
            above = "-" if peak is None else f"{(peak - weight_bytes) / 2**30:.2f}"  # activations + KV + workspace
            print(f"{length:>6} {method:<12} {100 * row['kept_frac']:>6.1f} {row['prefill_s']:>9.3f} "
                  f"{row['decode_tok_s']:>7.1f} {row['decode_x_full']:>6.2f} {peak_s:>8} {peak_x:>6} {above:>8} "
                  f"{row['kv_bytes'] / 2**20:>8.1f} {row['same_tokens']:>9.2f}", flush=True)
    if args.json:
        meta = {"preset": args.preset, "kept": args.kept, "steps": args.steps, "update_interval": args.update_interval,
                "kvpress": importlib.metadata.version("kvpress"), "transformers": transformers.__version__,
                "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "weight_bytes": weight_bytes}
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
