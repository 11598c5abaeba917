"""Time one NAMM update against one model forward over the same chunk, side by side in one run.

    python bench/namm_update.py --preset cpu-small          # tiny Llama on the CPU
    python bench/namm_update.py --preset gpu-7b             # Llama-3-8B architecture, random bf16 weights

For each context length L: prefill L - chunk tokens with the full cache, then time the last chunk's
forward (a) natively (HF SDPA + DynamicCache, no memory), (b) through our memory with the full policy
(slot-masked SDPA, no update) and (c) through our memory with the NAMM when the update is due (the
same forward + the attention slice + the NAMM update on every layer). (c) - (b) is the NAMM update.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from adapters.base import install_memory_attention
from adapters.llama import CausalLMAdapter
from transfer.namm import PARAM_SIZE, NAMMBuffers, NormStats
from transfer.policies.full import FullCache
from transfer.policies.namm import NAMMPolicy

PRESETS = {
    "cpu-small": dict(
        config=dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4),
        lengths=[1024, 2048], chunk=256, dtype="float32", device="cpu",
    ),
    "gpu-7b": dict(  # Meta-Llama-3-8B shapes
        config=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
        lengths=[8192, 32768], chunk=512, dtype="bfloat16", device="cuda",
    ),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall time of fn() in seconds (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_namm() -> NAMMPolicy:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(PARAM_SIZE, generator=g) * 0.1
    return NAMMPolicy(theta, NormStats(mean=torch.zeros(17), var=torch.ones(17), count=1))


def bench_length(adapter: CausalLMAdapter, length: int, chunk: int, device: str, repeats: int) -> dict:
    ids = torch.randint(0, adapter.model.config.vocab_size, (1, length), device=device)
    head, last = ids[:, : length - chunk], ids[:, length - chunk :]
    # The memory's update interval equals the chunk, so the last chunk triggers an update. The prefix is
    # fed with the full cache; the NAMM's carried buffers (left context, EMA) only need the right shapes
    # for timing, so they are zero-filled rather than computed by a statistics pass over the prefix.
    base = adapter.new_memory(FullCache(), update_interval=chunk)
    adapter.prefill(base, head, chunk_size=chunk)
    for st in base.layers.values():
        b, h, n = st.slots.shape
        st.policy_state = NAMMBuffers(context=torch.zeros(b, h, n, 16, device=device),
                                      ema=torch.zeros(b, h, n, 17, device=device))
    snap = base.snapshot()

    def ours(policy):
        def fn():
            base.restore(snap)
            base.policy = policy
            adapter.prefill(base, last, chunk_size=chunk)

        return fn

    native = adapter.model
    native.set_attn_implementation("sdpa")  # the model as HF runs it, same weights
    cache = DynamicCache(config=native.config)
    with torch.no_grad():
        for start in range(0, length - chunk, chunk):
            native(input_ids=head[:, start : start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    lengths = [layer.keys.shape[2] for layer in cache.layers]

    def native_fn():
        for layer, n in zip(cache.layers, lengths):
            layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
        with torch.no_grad():
            native(input_ids=last, past_key_values=cache, use_cache=True, logits_to_keep=1)

    namm = random_namm()
    t_native = timed(native_fn, device, repeats)
    cache.layers.clear()  # free the native cache before our runs
    install_memory_attention(native)
    t_full = timed(ours(FullCache()), device, repeats)
    t_namm = timed(ours(namm), device, repeats)
    base.restore(snap)
    base.policy = namm
    adapter.prefill(base, last, chunk_size=chunk)
    kept = float(base.kept_fraction()[0])
    update = max(t_namm - t_full, 0.0)
    return {
        "length": length, "chunk": chunk, "native_forward_s": t_native, "memory_forward_s": t_full,
        "forward_plus_namm_update_s": t_namm, "namm_update_s": update, "update_over_forward": update / t_full,
        "memory_over_native": t_full / t_native, "kept_fraction_random_namm": kept,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    device = preset["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-7b needs a CUDA device")
    dtype = getattr(torch, preset["dtype"])
    torch.manual_seed(0)
    cfg = LlamaConfig(**preset["config"], max_position_embeddings=131072)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    adapter = CausalLMAdapter(model)
    env = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__, "dtype": preset["dtype"], "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
    }
    print(json.dumps(env), flush=True)
    print(f"{'length':>7} {'native fwd':>11} {'memory fwd':>11} {'+NAMM upd':>10} {'update':>9} "
          f"{'upd/fwd':>8} {'mem/native':>10}", flush=True)
    rows = []
    for n in args.lengths or preset["lengths"]:
        rows.append(r := bench_length(adapter, n, preset["chunk"], device, args.repeats))
        print(f"{r['length']:>7} {r['native_forward_s']:>10.4f}s {r['memory_forward_s']:>10.4f}s "
              f"{r['forward_plus_namm_update_s']:>9.4f}s {r['namm_update_s']:>8.4f}s {r['update_over_forward']:>8.2f} "
              f"{r['memory_over_native']:>10.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
