"""Video QA: LLaVA-NeXT-Video on LongVideoBench, MLVU or the synthetic set under every memory policy.

CLI: `namm-transfer eval video`. Protocol: `--frames` frames per video, sampled by lmms-eval's
`llava_hf` rule (uniform over the container's frames; the default) or the official LongVideoBench
loader's (`--frame-sampling lvb-official`: at most one frame a second); the video context
(everything up to the last video token) is fed through the LM in chunks under the memory, whose
policy runs every `--update-interval` tokens; that compressed cache is snapshotted once per video
and answers all of its questions (each question restores it, feeds its tokens and decodes
greedily). Prompts and answer parsing follow lmms-eval (tasks/video_bench.py). With `--subtitles`
(LongVideoBench) the subtitle lines sit between the frames where the official loader puts them,
each frame then being its own video placeholder. An example is one video with its questions:
predictions.jsonl holds one line per video with its per-question rows nested under "questions". A
video that cannot be read becomes one error row naming the question ids it covers, and the run goes
on; those questions are left out of the accuracy and counted in `errors` / `error_questions`.
`--split test` (LongVideoBench) has no answers: nothing is scored and each policy's replies are
written in lmms-eval's submission format.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eval.options import BENCHMARKS
from eval.options import add_video_arguments as add_arguments  # noqa: F401  (reproduce and the CLI use it)
from tasks.video_bench import (
    LVB_MAX_NEW_TOKENS,
    LVB_SUBMISSION_FILE,
    MLVU_DEV_TASKS,
    MLVU_MAX_NEW_TOKENS,
    VideoQAExample,
    interleave_subtitles,
    load_longvideobench,
    load_mlvu_dev,
    load_subtitles,
    lvb_metrics,
    lvb_submission,
    mlvu_metrics,
    parse_mlvu_tasks,
    parse_predictions,
)
from transfer.rundir import slug
from transfer.runner import RunOptions, evaluate_policies

ROOT = Path(__file__).resolve().parents[1]
SYNTH_DIR = ROOT / "artifacts" / "video" / "synth-lvb"
SYNTH_REGEN_DIR = ROOT / "runs" / "video" / "synth-lvb"
SYNTH_SEED, SYNTH_VIDEOS = 1234, 48


@dataclass
class VideoItem:
    """One video and every question about it: one compressed cache answers them all."""

    id: str
    video_path: str
    questions: list[VideoQAExample]

    @property
    def duration(self) -> float | None:
        """The annotation's duration (seconds), shared by every question of the video."""
        return self.questions[0].duration


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


def load_items(
    benchmark: str,
    data_dir: str | Path,
    limit: int | None = None,
    split: str = "val",
    tasks: tuple[str, ...] = MLVU_DEV_TASKS,
) -> list[VideoItem]:
    """Questions of the benchmark grouped by video (first-seen order), optionally the first `limit` videos.

    Questions of one video that name different subtitle files or offsets get separate items, so every
    item has one video context.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from: {', '.join(BENCHMARKS)}")
    if benchmark == "mlvu":
        if split != "val":
            raise ValueError("--split applies to LongVideoBench only (MLVU is read from its dev json files)")
        examples = load_mlvu_dev(data_dir, tasks)
    else:
        if tuple(tasks) != MLVU_DEV_TASKS:
            raise ValueError("--tasks applies to MLVU only")
        examples = load_longvideobench(data_dir, split)
    if not examples:
        raise ValueError(f"{data_dir}: no questions found")
    groups: dict[tuple, list[VideoQAExample]] = {}
    for ex in examples:
        groups.setdefault((ex.video_path, ex.subtitle_path, ex.subtitle_offset), []).append(ex)
    items, seen = [], set()
    for (path, _, _), qs in groups.items():
        item_id = os.path.relpath(path, data_dir)
        if item_id in seen:
            item_id = f"{item_id}#{qs[0].id}"
        seen.add(item_id)
        items.append(VideoItem(item_id, path, qs))
    return items[:limit] if limit else items


def subtitle_visual(item: VideoItem, timestamps: list[float], video_token: str) -> str:
    """The video part of the prompt with subtitles: one placeholder per frame, subtitle lines between them
    in the official loader's order, joined by newlines as lmms-eval's interleaved LongVideoBench task does."""
    first = item.questions[0]
    if first.subtitle_path is None or first.subtitle_offset is None:
        raise ValueError(f"{item.id}: --subtitles needs subtitle_path and starting_timestamp_for_subtitles "
                         "in the annotation")
    duration = item.duration if item.duration is not None else timestamps[-1]
    order = interleave_subtitles(timestamps, load_subtitles(first.subtitle_path), first.subtitle_offset, duration)
    return "\n".join(video_token if isinstance(x, int) else x.replace(video_token, "") for x in order)


def summarize(benchmark: str, items: list[VideoItem], split: str = "val", submission_dir: Path | None = None):
    """Rows (one per video) -> benchmark metrics over the answered questions + kept fraction and errors.

    On the LongVideoBench test split (no answers) nothing is scored: the replies are written to
    `<submission_dir>/<policy>/longvideobench_test_for_submission.json` instead.
    """
    examples = {q.id: q for item in items for q in item.questions}
    question_ids = {item.id: [q.id for q in item.questions] for item in items}

    def fn(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ok = [r for r in rows if "error" not in r]
        answered = [q for r in ok for q in r["questions"]]
        error_ids = [qid for r in rows if "error" in r for qid in question_ids[r["id"]]]
        out: dict[str, Any] = {
            "errors": len(rows) - len(ok),
            "error_questions": len(error_ids),
            "error_question_ids": error_ids,
            "n_videos": len(ok),
            "kept_fraction": float(sum(r["kept_fraction"] for r in ok) / len(ok)) if ok else None,
            "seconds": float(sum(r["seconds"] for r in rows)),
        }
        if split == "test":
            if submission_dir is not None and rows:
                file = write_submission(submission_dir, rows[0].get("policy", "policy"), answered)
                out["submission"] = str(file)
            return {**out, "score": None, "acc": None, "n": len(answered), "per_task": {}, "split": "test",
                    "unscored": True}
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


def write_submission(submission_dir: Path, policy: str, answered: list[dict[str, Any]]) -> Path:
    """lmms-eval's LongVideoBench test submission ({question id: raw reply}) for one policy, atomically."""
    file = Path(submission_dir) / slug(policy) / LVB_SUBMISSION_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    data = lvb_submission([q["id"] for q in answered], [q["reply"] for q in answered])
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, file)
    return file


def question_units(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, float]]:
    """Bootstrap units: the questions of one video are resampled together (a cluster bootstrap);
    MLVU's M-Avg averages tasks, so its questions are resampled within their task."""
    return [(str(q.get("task", "")), str(row["id"]), str(q["id"]), float(q["correct"]))
            for row in rows for q in row.get("questions", []) if q.get("correct") is not None]


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every policy on one benchmark; prints and returns {policy label: metrics}."""
    from adapters.llava_next_video import LlavaNextVideoAdapter, build_prompt, processor_frame_size
    from eval.tables import print_domain_table
    from tasks.video_io import VideoError, read_video

    run_options = RunOptions.from_args(args)
    device = run_options.resolved_device()
    start = time.time()
    if args.frames <= 0:
        raise ValueError(f"--frames must be positive, got {args.frames}")
    data_dir = Path(args.data) if args.data else default_data(args.benchmark)
    if args.subtitles and args.benchmark == "mlvu":
        raise ValueError("--subtitles applies to LongVideoBench-layout data only (MLVU has no subtitle files)")
    tasks = parse_mlvu_tasks(args.tasks)
    items = load_items(args.benchmark, data_dir, args.limit, args.split, tasks)
    model_path = str(args.model or default_model())
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    adapter = LlavaNextVideoAdapter.from_pretrained(model_path, device=device, dtype=dtype)
    size = processor_frame_size(adapter.processor)  # the tiny processor's square frames; HF resizes itself
    video_token = getattr(adapter.processor, "video_token", "<video>")
    default_tokens = MLVU_MAX_NEW_TOKENS if args.benchmark == "mlvu" else LVB_MAX_NEW_TOKENS
    max_new_tokens = args.max_new_tokens or default_tokens
    parser = "mlvu" if args.benchmark == "mlvu" else "longvideobench"
    config = {
        "domain": "video", "benchmark": args.benchmark, "data": str(data_dir), "model": model_path,
        "frames": args.frames, "chunk_size": args.chunk_size,
        "max_new_tokens": max_new_tokens, "limit": args.limit, "seed": args.seed, "dtype": str(dtype),
        "n_videos": len(items), "n_questions": sum(len(i.questions) for i in items),
    }
    # Recorded (and in the run dir's name) only when not the default, so earlier default runs stay reusable.
    options = {"split": (args.split, "val"), "subtitles": (args.subtitles, False),
               "frame_sampling": (args.frame_sampling, "lmms-eval"), "tasks": (list(tasks), list(MLVU_DEV_TASKS))}
    extra = {k: v for k, (v, default) in options.items() if v != default}
    config.update(extra)

    def evaluate_batch(policy_factory: Any, batch: list[VideoItem]) -> list[dict[str, Any]]:
        rows = []
        for item in batch:
            t0 = time.time()
            try:
                clip = read_video(item.video_path, args.frames, size=size, backend=args.backend,
                                  sampling=args.frame_sampling, duration=item.duration)
                visual = subtitle_visual(item, clip.timestamps, video_token) if args.subtitles else video_token
            except (VideoError, FileNotFoundError, ValueError) as err:  # this video only; the run goes on
                print(f"skipping video: {err}", flush=True)
                rows.append({"id": item.id, "video": item.video_path, "error": str(err),
                             "question_ids": [q.id for q in item.questions], "kept_fraction": math.nan,
                             "seconds": time.time() - t0, "questions": []})
                continue
            policy = policy_factory()
            budget = getattr(policy, "budget", None)
            memory = adapter.new_memory(policy, update_interval=run_options.update_interval)
            replies, kept = adapter.answer_many(memory, clip.frames, [q.prompt for q in item.questions],
                                                max_new_tokens, prompt_fn=lambda q, v=visual: build_prompt(q, v),
                                                chunk_size=args.chunk_size)
            letters = parse_predictions(item.questions, replies, parser, args.seed)
            questions = [
                {"id": q.id, "reply": reply, "pred": letter, "answer": q.answer_letter,
                 "correct": letter == q.answer_letter if q.answer_letter else None, "kept_fraction": k, **q.groups}
                for q, reply, letter, k in zip(item.questions, replies, letters, kept)
            ]
            rows.append({"id": item.id, "video": item.video_path, "kept_fraction": sum(kept) / len(kept),
                         "budget": budget if isinstance(budget, (int, float)) else None,
                         "frame_indices": [int(i) for i in clip.indices],
                         "context_tokens": memory.n_fed, "cache_tokens": max(memory.cache_tokens()),
                         "seconds": time.time() - t0, "questions": questions})
        return rows

    out = Path(args.out) / slug(args.benchmark, Path(model_path).name, f"{args.frames}f",
                                f"ui{run_options.update_interval}", *(option_slug(k, v) for k, v in extra.items()))
    summary = summarize(args.benchmark, items, args.split, out / "submissions")
    results = evaluate_policies(items, evaluate_batch, summary, out, config, run_options, units=question_units)
    if args.benchmark == "mlvu":
        averaged = max((m.get("m_avg_tasks", []) for m in results.values()), key=len, default=[])
        metric = f"M-Avg over {len(averaged)} of {len(MLVU_DEV_TASKS)} tasks: {', '.join(averaged)}"
    else:
        metric = "test split, not scored" if args.split == "test" else "accuracy"
    sampling = f", {args.frame_sampling} sampling" if args.frame_sampling != "lmms-eval" else ""
    subtitles = ", subtitles" if args.subtitles else ""
    title = f"Video QA: {args.benchmark} ({Path(model_path).name}, {args.frames} frames{sampling}{subtitles}, {metric})"
    print_domain_table(title, results, time.time() - start, run_options.header())
    errors = max((m.get("errors", 0) for m in results.values()), default=0)
    if errors:
        print(f"{errors} video(s) could not be read; their questions are left out (see predictions.jsonl)")
    for label, m in results.items():
        if m.get("submission"):
            print(f"{label}: submission for {m['n']} questions in {m['submission']}")
    return results


def option_slug(key: str, value: Any) -> str:
    """Run-dir name part of a non-default option (the MLVU task list is named by its members)."""
    if key == "tasks":
        return "tasks-" + "+".join(value)
    if value is True:
        return key
    return f"{key}-{value}"


def eviction_history(namm: str | None = None, frames: int = 32, update_interval: int = 128) -> tuple[list, int]:
    """The NAMM's eviction record on the first video of the shipped synthetic set (for the report's map)."""
    from adapters.llava_next_video import LlavaNextVideoAdapter, processor_frame_size
    from tasks.video_io import read_frames
    from transfer.policies import make_policy

    item = load_items("synthetic", default_data("synthetic"), 1)[0]
    adapter = LlavaNextVideoAdapter.from_pretrained(str(default_model()))
    video = read_frames(item.video_path, frames, size=processor_frame_size(adapter.processor))
    memory = adapter.new_memory(make_policy("namm", namm=namm), update_interval=update_interval, record=True)
    adapter.answer_many(memory, video, [item.questions[0].prompt], max_new_tokens=4)
    return memory.history, memory.n_fed
