"""Peak memory, prefill time and kept fraction of LLaVA-NeXT-Video under the NAMM vs the full cache.

    PYTHONPATH=. python bench/video_memory.py --preset cpu-small               # tiny random model, CPU, 4/8/16 frames
    PYTHONPATH=. python bench/video_memory.py --preset gpu-7b --json out.json  # LLaVA-NeXT-Video-7B shapes, bf16
    PYTHONPATH=. python bench/video_memory.py --preset gpu-7b --frames 32,64 --policies full,namm

Issue 6, item 5: the 7B architecture (Vicuna-7B LM without GQA + CLIP ViT-L/14-336, 2x2 average pooling,
144 tokens per frame) with random weights, built from a config in code (no download). For each frame
count and policy one run follows the adapter's real path, as `eval/video.py` / `answer_many` does:
vision tower + projector once (`adapter.embed`), the video context (up to the last video token) fed in
update-aligned chunks under the memory (`adapter.prefill`), then the question tokens and a few greedy
answer tokens (`adapter.decode`). Prompt ids are built directly (video token x frames x tokens per
frame) because the GPU machine has no tokenizer or torchvision; pixels are random uint8 frames at the
vision tower's size, normalised by `TinyVideoProcessor.preprocess_video` (CLIP mean/std).

Reported per run: video tokens, vision and LM-prefill wall times (synchronised), peak GPU memory
(vision phase and LM phase separately, allocator peaks, weights included), KV-cache bytes and tokens at
the end, and the NAMM's kept fraction (`memory.kept_fraction()`, the mean over layer updates that
`--budget match` uses, and final cache tokens / tokens seen). h2o runs at the NAMM's kept fraction for
the same frame count. All runs share one process and one set of weights; ratios are X / full.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from adapters.llava_next_video import LlavaNextVideoAdapter
from bench.common import build_on
from transfer.memory import KVMemory, check_update_interval
from transfer.policies import make_policy
from transfer.policies.namm import NAMMPolicy

# Shapes of llava-hf/LLaVA-NeXT-Video-7B-hf (its config.json): Vicuna-7B v1.5 with linear RoPE scaling 2.5.
GPU_7B = dict(
    text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096,
              rms_norm_eps=1e-5, rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0},
              bos_token_id=1, eos_token_id=2, pad_token_id=0),
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    top=dict(video_token_index=32000, image_token_index=32001, vision_feature_layer=-2,
             image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
)
# Tiny random model shaped like artifacts/video/llava-next-video-tiny, but at 336 px (144 tokens per frame,
# as the 7B) and without GQA (as Vicuna), so that the memory schedule is the 7B's.
CPU_SMALL = dict(
    text=dict(vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
              bos_token_id=2, eos_token_id=3, pad_token_id=0),
    vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=336,
                patch_size=14, projection_dim=64, hidden_act="quick_gelu"),
    top=dict(video_token_index=5, image_token_index=4, vision_feature_layer=-1, image_grid_pinpoints=[[336, 336]]),
)
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": dict(model=CPU_SMALL, frames=[4, 8, 16], device="cpu", dtype="float32", repeats=3,
                      threads=1),  # one thread: 2 threads on a shared 2-core CPU straggle (10x spread)
    "gpu-7b": dict(model=GPU_7B, frames=[32, 64, 128], device="cuda", dtype="bfloat16", repeats=1,
                   threads=None),
}
PROMPT_PREFIX, QUESTION_TOKENS = 8, 48  # "USER: " before the video; question + options + "ASSISTANT:" after


def build_model(spec: dict[str, Any], device: str, dtype: torch.dtype) -> LlavaNextVideoAdapter:
    """Random-weight LLaVA-NeXT-Video built straight on the device in `dtype` (a 7B initialises in seconds)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    cfg = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**spec["vision"]), text_config=LlamaConfig(**spec["text"]),
        vision_feature_select_strategy="default", spatial_pool_mode="average", spatial_pool_stride=2,
        projector_hidden_act="gelu", tie_word_embeddings=False, **spec["top"],
    )
    torch.manual_seed(0)
    with build_on(device, dtype):  # the default dtype comes back: the NAMM's buffers must stay fp32
        model = LlavaNextVideoForConditionalGeneration(cfg).eval()
    return LlavaNextVideoAdapter(model)


def tokens_per_frame(adapter: LlavaNextVideoAdapter) -> int:
    """Video tokens one frame becomes: (image_size / patch / pool stride)^2 (144 at 336 px)."""
    cfg = adapter.model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return (side // cfg.spatial_pool_stride) ** 2


def make_inputs(adapter: LlavaNextVideoAdapter, n_frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random frames and prompt ids as the processor would give them.

    Returns pixel_values_videos (1, frames, 3, S, S), ids (1, prefix + video + question) and `split`, the
    end of the shared video context (one past the last video token), as `adapter.encode` does.
    """
    from adapters.llava_next_video import TinyVideoProcessor

    cfg = adapter.model.config
    size = cfg.vision_config.image_size
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n_frames, size, size, 3), dtype=np.uint8)  # (F, S, S, 3)
    pixel = TinyVideoProcessor(tokenizer=None, size=size).preprocess_video(frames)[None]  # (1, F, 3, S, S)
    text = adapter.text_config
    special = {adapter.video_token_id, int(cfg.image_token_index), text.bos_token_id, text.eos_token_id,
               text.pad_token_id}
    words = np.setdiff1d(np.arange(text.vocab_size), [s for s in special if s is not None])
    n_video = n_frames * tokens_per_frame(adapter)
    ids = np.concatenate([
        [text.bos_token_id], rng.choice(words, PROMPT_PREFIX), np.full(n_video, adapter.video_token_id),
        rng.choice(words, QUESTION_TOKENS),
    ])
    split = 1 + PROMPT_PREFIX + n_video
    return pixel, torch.as_tensor(ids, dtype=torch.long)[None], split


class Clock:
    """Wall time and allocator peak of one phase (CUDA: synchronised; CPU: peak not available)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, float, int | None]:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return out, seconds, torch.cuda.max_memory_allocated() if self.cuda else None


def kv_bytes(memory: KVMemory) -> int:
    """Bytes held by the cache's K and V tensors, all layers."""
    return sum(t.numel() * t.element_size() for layer in memory.cache.layers
               for t in (layer.keys, layer.values) if t is not None)


def run_one(adapter: LlavaNextVideoAdapter, policy: Any, label: str, n_frames: int, update_interval: int,
            chunk_size: int, new_tokens: int, clock: Clock) -> dict[str, Any]:
    """One video through vision, context prefill under the memory, question prefill and greedy decode."""
    pixel, ids, split = make_inputs(adapter, n_frames)
    memory = adapter.new_memory(policy, update_interval=update_interval)
    embeds, t_vision, peak_vision = clock(lambda: adapter.embed(ids[:, :split], pixel))  # (1, split, hidden)
    _, t_prefill, peak_prefill = clock(lambda: adapter.prefill(memory, embeds, chunk_size=chunk_size))
    context_cache = memory.cache_tokens()
    kept_mean = float(memory.kept_fraction()[0])

    def answer() -> torch.Tensor:
        with torch.no_grad():
            q_embeds = adapter.language_model.get_input_embeddings()(ids[:, split:].to(adapter.device))
        logits = adapter.prefill(memory, q_embeds, chunk_size=chunk_size)
        return adapter.decode(memory, logits, new_tokens, eos_token_id=None)  # always new_tokens tokens

    out, t_answer, peak_answer = clock(answer)
    cache = memory.cache_tokens()
    seen = int(memory.n_seen[0])
    row = {
        "frames": n_frames, "policy": label, "video_tokens": int((ids == adapter.video_token_id).sum()),
        "context_tokens": split, "tokens_seen": seen, "vision_s": t_vision, "prefill_s": t_prefill,
        "answer_s": t_answer, "answer_tokens": int(out.shape[1]),
        "peak_vision_bytes": peak_vision, "peak_prefill_bytes": peak_prefill, "peak_answer_bytes": peak_answer,
        "peak_bytes": max(p for p in (peak_vision, peak_prefill, peak_answer)) if clock.cuda else None,
        "kv_bytes": kv_bytes(memory), "cache_tokens_mean": sum(cache) / len(cache), "cache_tokens_max": max(cache),
        "context_cache_tokens_mean": sum(context_cache) / len(context_cache),
        "kept_fraction_context": kept_mean, "kept_fraction": float(memory.kept_fraction()[0]),
        "final_cache_over_seen": sum(cache) / len(cache) / seen,
    }
    return row  # memory, embeddings and pixels go out of scope here; the caller empties the CUDA cache


def free_memory() -> None:
    """Drop the last run's cache and activations so that the next run's peak starts from the weights."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


TIMES = ("vision_s", "prefill_s", "answer_s")


def run_repeated(repeats: int, make_policy_fn: Callable[[], Any], *args: Any) -> dict[str, Any]:
    """Median wall times over `repeats` identical runs (fresh policy and memory each); the rest from the last."""
    runs = []
    for _ in range(repeats):
        runs.append(run_one(args[0], make_policy_fn(), *args[1:]))
        free_memory()
    row = dict(runs[-1])
    for key in TIMES:
        row[key] = statistics.median(r[key] for r in runs)
        row[key + "_all"] = [r[key] for r in runs]
    return row


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def print_tables(rows: list[dict[str, Any]], weights: int) -> None:
    """Raw numbers per run, then every policy against the full cache at the same frame count.

    `peak - W / full` compares the peaks above the weights (cache + activations), which the 13 GiB of
    7B weights would otherwise dilute.
    """
    print(f"\n{'frames':>6} {'policy':>10} {'vid tok':>7} {'vision s':>8} {'prefill s':>9} {'answer s':>8} "
          f"{'peak MiB':>9} {'KV MiB':>8} {'cache tok':>9} {'kept':>6} {'cache/seen':>10}")
    for r in rows:
        print(f"{r['frames']:>6} {r['policy']:>10} {r['video_tokens']:>7} {r['vision_s']:>8.3f} "
              f"{r['prefill_s']:>9.3f} {r['answer_s']:>8.3f} {mib(r['peak_bytes']):>9} {mib(r['kv_bytes']):>8} "
              f"{r['cache_tokens_mean']:>9.0f} {r['kept_fraction']:>6.3f} {r['final_cache_over_seen']:>10.3f}")
    full = {r["frames"]: r for r in rows if r["policy"] == "full"}
    others = [r for r in rows if r["policy"] != "full" and r["frames"] in full]
    if not others:
        return
    print(f"\n{'frames':>6} {'policy':>10} {'prefill / full':>14} {'peak / full':>11} {'peak - W / full':>15} "
          f"{'KV / full':>9} {'answer / full':>13}")
    for r in others:
        f = full[r["frames"]]
        peak = above = "n/a"
        if r["peak_bytes"] is not None:
            peak = f"{r['peak_bytes'] / f['peak_bytes']:.3f}"
            above = f"{(r['peak_bytes'] - weights) / (f['peak_bytes'] - weights):.3f}"
        print(f"{r['frames']:>6} {r['policy']:>10} {r['prefill_s'] / f['prefill_s']:>14.3f} {peak:>11} {above:>15} "
              f"{r['kv_bytes'] / f['kv_bytes']:>9.3f} {r['answer_s'] / f['answer_s']:>13.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--frames", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated frame counts (default: the preset's)")
    p.add_argument("--policies", default="full,namm,h2o",
                   help="comma-separated, from full, namm, h2o (h2o runs at the NAMM's kept fraction)")
    p.add_argument("--namm", default=None, help="NAMM checkpoint (default: artifacts/namm/namm-shipped)")
    p.add_argument("--update-interval", type=int, default=512, help="tokens between memory updates")
    p.add_argument("--chunk-size", type=int, default=512, help="max tokens per forward")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy answer tokens per run")
    p.add_argument("--repeats", type=int, default=None, help="runs per cell, median time (default: the preset's)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args()
    check_update_interval(args.update_interval)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    if bad := set(policies) - {"full", "namm", "h2o"}:
        raise SystemExit(f"unknown policies {sorted(bad)}; choose from full, namm, h2o")
    if "h2o" in policies and "namm" not in policies:
        raise SystemExit("h2o runs at the NAMM's kept fraction: include namm")
    policies = sorted(policies, key=["full", "namm", "h2o"].index)  # the NAMM before h2o
    preset = PRESETS[args.preset]
    device, dtype = preset["device"], getattr(torch, preset["dtype"])
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--preset {args.preset} needs a CUDA device")
    clock = Clock(device)
    repeats = args.repeats or preset["repeats"]
    if preset["threads"]:
        torch.set_num_threads(preset["threads"])

    t0 = time.perf_counter()
    adapter = build_model(preset["model"], device, dtype)
    if clock.cuda:
        torch.cuda.synchronize()
    t_build = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for t in [*adapter.model.parameters(), *adapter.model.buffers()])
    text = adapter.text_config
    env = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if clock.cuda else platform.processor(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__, "dtype": preset["dtype"],
        "layers": text.num_hidden_layers, "heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
        "tokens_per_frame": tokens_per_frame(adapter), "update_interval": args.update_interval,
        "chunk_size": args.chunk_size, "new_tokens": args.new_tokens, "weights_bytes": weights,
        "build_s": t_build, "repeats": repeats,
        "threads": torch.get_num_threads(), "namm": args.namm or "artifacts/namm/namm-shipped",
    }
    print(json.dumps(env), flush=True)

    def namm() -> NAMMPolicy:
        return NAMMPolicy.from_checkpoint(args.namm)

    if not args.no_warmup:  # kernels, cuBLAS handles and allocator pools; one update with the NAMM
        n_warm = args.update_interval // tokens_per_frame(adapter) + 1
        for policy in (make_policy("full"), namm()):
            run_one(adapter, policy, "warmup", n_warm, args.update_interval, args.chunk_size, 2, clock)
            free_memory()

    rows: list[dict[str, Any]] = []
    for n_frames in args.frames or preset["frames"]:
        matched = None
        for name in policies:
            budget = None if name != "h2o" else min(max(matched, 1e-3), 1.0)
            factory = {"full": lambda: make_policy("full"), "namm": namm,
                       "h2o": lambda b=budget: make_policy("h2o", budget=b)}[name]
            label = "h2o@match" if name == "h2o" else name
            row = run_repeated(repeats, factory, adapter, label, n_frames, args.update_interval, args.chunk_size,
                               args.new_tokens, clock)
            if name == "namm":
                matched = row["kept_fraction"]
            row["budget"] = budget
            rows.append(row)
            print(f"{n_frames} frames {label}: prefill {row['prefill_s']:.3f}s, peak {mib(row['peak_bytes'])} MiB, "
                  f"KV {mib(row['kv_bytes'])} MiB, kept {row['kept_fraction']:.3f}", flush=True)
    print(f"\nweights {mib(weights)} MiB; times = median of {repeats}; peak = allocator peak incl. weights; "
          f"kept = mean kept/seen over layer updates;\ncache/seen = final cache tokens (mean over layers) / tokens "
          f"seen; total {time.perf_counter() - t0:.1f}s")
    print_tables(rows, weights)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
