"""Video QA: LLaVA-NeXT-Video on LongVideoBench, MLVU or the synthetic set under every memory policy.

CLI: `namm-transfer eval video`. Protocol: `--frames` frames sampled uniformly over each video
(lmms-eval's `llava_hf` rule), the video context (everything up to the last video token) is fed
through the LM in chunks under the memory, whose policy runs every `--update-interval` tokens; that
compressed cache is snapshotted once per video and answers all of its questions (each question
restores it, feeds its tokens and decodes greedily). Prompts and answer parsing follow lmms-eval
(tasks/video_bench.py). An example is one video with its questions: predictions.jsonl holds one line
per video with its per-question rows nested under "questions". A video that cannot be read becomes
one error row and the run goes on; its questions are left out of the accuracy and counted in
`errors` / `error_questions`.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.video_bench import (
    LVB_MAX_NEW_TOKENS,
    MLVU_MAX_NEW_TOKENS,
    VideoQAExample,
    group_by_video,
    load_longvideobench,
    load_mlvu_dev,
    lvb_metrics,
    mlvu_metrics,
    parse_predictions,
)
from transfer.memory import check_update_interval
from transfer.rundir import slug
from transfer.runner import evaluate_policies, parse_policies

ROOT = Path(__file__).resolve().parents[1]
SYNTH_DIR = ROOT / "artifacts" / "video" / "synth-lvb"
SYNTH_REGEN_DIR = ROOT / "runs" / "video" / "synth-lvb"
SYNTH_SEED, SYNTH_VIDEOS = 1234, 48
BENCHMARKS = ("synthetic", "longvideobench", "mlvu")


@dataclass
class VideoItem:
    """One video and every question about it: one compressed cache answers them all."""

    id: str
    video_path: str
    questions: list[VideoQAExample]


def default_model() -> Path:
    """The shipped tiny LLaVA-NeXT-Video: the first artifacts/video/* folder holding such a model."""
    for cfg in sorted((ROOT / "artifacts" / "video").glob("*/config.json")):
        if '"llava_next_video"' in cfg.read_text():
            return cfg.parent
    raise FileNotFoundError(f"{ROOT / 'artifacts' / 'video'}: no shipped LLaVA-NeXT-Video model; pass --model")


def default_data(benchmark: str) -> Path:
    """The shipped synthetic set, regenerated into runs/ from its seed when only the seed is shipped."""
    if benchmark != "synthetic":
        raise ValueError(f"--data is required for --benchmark {benchmark} (the benchmark's local folder)")
    if (SYNTH_DIR / "lvb_val.json").is_file():
        return SYNTH_DIR
    if not (SYNTH_REGEN_DIR / "lvb_val.json").is_file():
        from tasks.synth_video import generate_lvb

        print(f"regenerating the synthetic set (seed {SYNTH_SEED}) into {SYNTH_REGEN_DIR}", flush=True)
        generate_lvb(SYNTH_REGEN_DIR, SYNTH_VIDEOS, SYNTH_SEED, overwrite=True)
    return SYNTH_REGEN_DIR


def load_items(benchmark: str, data_dir: str | Path, limit: int | None = None) -> list[VideoItem]:
    """Questions of the benchmark grouped by video (first-seen order), optionally the first `limit` videos."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from: {', '.join(BENCHMARKS)}")
    examples = load_mlvu_dev(data_dir) if benchmark == "mlvu" else load_longvideobench(data_dir)
    if not examples:
        raise ValueError(f"{data_dir}: no questions found")
    items = [
        VideoItem(os.path.relpath(path, data_dir), path, qs) for path, qs in group_by_video(examples).items()
    ]
    return items[:limit] if limit else items


def summarize(benchmark: str, items: list[VideoItem]):
    """Rows (one per video) -> benchmark metrics over the answered questions + kept fraction and errors."""
    examples = {q.id: q for item in items for q in item.questions}
    n_questions = {item.id: len(item.questions) for item in items}

    def fn(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ok = [r for r in rows if "error" not in r]
        answered = [q for r in ok for q in r["questions"]]
        out: dict[str, Any] = {
            "errors": len(rows) - len(ok),
            "error_questions": sum(n_questions[r["id"]] for r in rows if "error" in r),
            "n_videos": len(ok),
            "kept_fraction": float(sum(r["kept_fraction"] for r in ok) / len(ok)) if ok else None,
            "seconds": float(sum(r["seconds"] for r in rows)),
        }
        if not answered:
            return {**out, "score": None, "acc": None, "n": 0, "per_task": {}}
        exs = [examples[q["id"]] for q in answered]
        letters = [q["pred"] for q in answered]
        if benchmark == "mlvu":
            m = mlvu_metrics(exs, letters)
            return {**out, **m, "score": m["m_avg"], "per_task": dict(m["by_task"])}
        m = lvb_metrics(exs, letters)
        per_task = {f"dur {k}": v for k, v in m["by_duration_group"].items()}
        per_task.update(m["by_question_category"])
        return {**out, **m, "score": m["acc"], "per_task": per_task}

    return fn


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", default="synthetic", choices=BENCHMARKS)
    p.add_argument("--data", default=None,
                   help="benchmark folder (LongVideoBench: lvb_val.json + videos/; MLVU: json/ + video/); "
                        "default for synthetic: the shipped set artifacts/video/synth-lvb")
    p.add_argument("--model", default=None,
                   help="LLaVA-NeXT-Video id or path; default: the shipped tiny model in artifacts/video/")
    p.add_argument("--policies", "--policy", default="full,h2o,l2,namm", help="comma-separated policies")
    p.add_argument("--budget", default="match", help="'match' (NAMM's kept fraction) or fractions, e.g. 0.25,0.5")
    p.add_argument("--namm", default=None, help="NAMM checkpoint (default: the shipped NAMM)")
    p.add_argument("--namm-precision", choices=["fp32", "fast"], default="fp32",
                   help="fp32: the reference's precision; fast: the NAMM's BAM attention in fp16 on CUDA")
    p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly per video")
    p.add_argument("--update-interval", type=int, default=128, help="cache tokens between memory updates")
    p.add_argument("--chunk-size", type=int, default=512, help="max tokens per forward")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's (LVB 32, MLVU 16)")
    p.add_argument("--limit", type=int, default=None, help="only the first N videos")
    p.add_argument("--backend", default="pyav", choices=("pyav", "decord", "auto"), help="video decoder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random fallback letter for unparsable replies")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default="runs/video")


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every policy on one benchmark; prints and returns {policy label: metrics}."""
    from adapters.llava_next_video import LlavaNextVideoAdapter
    from eval.tables import print_domain_table
    from tasks.video_io import VideoError, read_frames

    check_update_interval(args.update_interval)
    start = time.time()
    if args.frames <= 0:
        raise ValueError(f"--frames must be positive, got {args.frames}")
    data_dir = Path(args.data) if args.data else default_data(args.benchmark)
    specs = parse_policies(args.policies, args.budget)
    items = load_items(args.benchmark, data_dir, args.limit)
    model_path = str(args.model or default_model())
    dtype = {"auto": torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    adapter = LlavaNextVideoAdapter.from_pretrained(model_path, device=args.device, dtype=dtype)
    size = getattr(adapter.processor, "size", None)
    size = size if isinstance(size, int) else None  # the tiny processor's square frames; HF resizes itself
    default_tokens = MLVU_MAX_NEW_TOKENS if args.benchmark == "mlvu" else LVB_MAX_NEW_TOKENS
    max_new_tokens = args.max_new_tokens or default_tokens
    parser = "mlvu" if args.benchmark == "mlvu" else "longvideobench"
    config = {
        "domain": "video", "benchmark": args.benchmark, "data": str(data_dir), "model": model_path,
        "frames": args.frames, "update_interval": args.update_interval, "chunk_size": args.chunk_size,
        "max_new_tokens": max_new_tokens, "limit": args.limit, "seed": args.seed, "dtype": str(dtype),
        "n_videos": len(items), "n_questions": sum(len(i.questions) for i in items),
    }

    def evaluate_batch(policy_factory: Any, batch: list[VideoItem]) -> list[dict[str, Any]]:
        rows = []
        for item in batch:
            t0 = time.time()
            try:
                frames = read_frames(item.video_path, args.frames, size=size, backend=args.backend)
            except VideoError as err:
                print(f"skipping video: {err}", flush=True)
                rows.append({"id": item.id, "video": item.video_path, "error": str(err), "kept_fraction": math.nan,
                             "seconds": time.time() - t0, "questions": []})
                continue
            memory = adapter.new_memory(policy_factory(), update_interval=args.update_interval)
            replies, kept = adapter.answer_many(memory, frames, [q.prompt for q in item.questions],
                                                max_new_tokens, chunk_size=args.chunk_size)
            letters = parse_predictions(item.questions, replies, parser, args.seed)
            questions = [
                {"id": q.id, "reply": reply, "pred": letter, "answer": q.answer_letter,
                 "correct": letter == q.answer_letter, "kept_fraction": k, **q.groups}
                for q, reply, letter, k in zip(item.questions, replies, letters, kept)
            ]
            rows.append({"id": item.id, "video": item.video_path, "kept_fraction": sum(kept) / len(kept),
                         "context_tokens": memory.n_fed, "cache_tokens": max(memory.cache_tokens()),
                         "seconds": time.time() - t0, "questions": questions})
        return rows

    out = Path(args.out) / slug(args.benchmark, Path(model_path).name, f"{args.frames}f",
                                f"ui{args.update_interval}")
    results = evaluate_policies(specs, items, evaluate_batch, summarize(args.benchmark, items), out, config,
                                namm=args.namm, batch_size=1, namm_precision=args.namm_precision)
    metric = "M-Avg" if args.benchmark == "mlvu" else "accuracy"
    title = f"Video QA: {args.benchmark} ({Path(model_path).name}, {args.frames} frames, {metric})"
    print_domain_table(title, results, time.time() - start)
    errors = max((m.get("errors", 0) for m in results.values()), default=0)
    if errors:
        print(f"{errors} video(s) could not be read; their questions are left out (see predictions.jsonl)")
    return results


def eviction_history(namm: str | None = None, frames: int = 32, update_interval: int = 128) -> tuple[list, int]:
    """The NAMM's eviction record on the first video of the shipped synthetic set (for the report's map)."""
    from adapters.llava_next_video import LlavaNextVideoAdapter
    from tasks.video_io import read_frames
    from transfer.policies import make_policy

    item = load_items("synthetic", default_data("synthetic"), 1)[0]
    adapter = LlavaNextVideoAdapter.from_pretrained(str(default_model()))
    size = getattr(adapter.processor, "size", None)
    video = read_frames(item.video_path, frames, size=size if isinstance(size, int) else None)
    memory = adapter.new_memory(make_policy("namm", namm=namm), update_interval=update_interval, record=True)
    adapter.answer_many(memory, video, [item.questions[0].prompt], max_new_tokens=4)
    return memory.history, memory.n_fed
