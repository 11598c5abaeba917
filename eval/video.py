"""Video QA: LLaVA-NeXT-Video on LongVideoBench, MLVU or the synthetic long-video test set under every memory policy.

CLI: `namm-transfer eval video`. The default (`--benchmark synthetic`) is the shipped long-video model
(artifacts/video/llava-next-video-long) on the held-out TEST split of tasks/long_video.py, generated in
memory from its seeds (100 videos of 64-128 frames, 500 questions, five types, letters balanced; never
the validation split that chose the model): every frame is rendered and given its codec-like noise in
numpy from the video's seed, so the set is the same on every machine and thread count, and no file is
shipped. `--synthetic-videos` / `--synthetic-lengths` make a smaller balanced test set (the quick preset's).

Protocol: `--frames` frames per video (default 128 on the synthetic set, as the model was validated; 32 on
files), sampled by lmms-eval's
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

import numpy as np
import torch

from eval.options import BENCHMARKS
from eval.options import add_video_arguments as add_arguments  # noqa: F401  (reproduce and the CLI use it)
from tasks import long_video as lv
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
MODEL_DIR = ROOT / "artifacts" / "video" / "llava-next-video-long"  # the shipped model (see its PROVENANCE.md)
SYNTHETIC_FRAMES, FILE_FRAMES = 128, 32  # --frames defaults: the shipped model's protocol / lmms-eval's


@dataclass
class VideoItem:
    """One video and every question about it: one compressed cache answers them all."""

    id: str
    video_path: str
    questions: list[VideoQAExample]
    synthetic: lv.LongVideo | None = None  # a generated video: frames come from its seed, not from a file

    @property
    def duration(self) -> float | None:
        """The annotation's duration (seconds), shared by every question of the video."""
        return self.questions[0].duration


def default_model() -> Path:
    """The shipped long-video LLaVA-NeXT-Video (named, not searched for: a second model folder must not
    change what the default evaluates)."""
    if not (MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{MODEL_DIR}: the shipped video model is missing; pass --model")
    return MODEL_DIR


def synthetic_items(n_videos: int | None = None, lengths: tuple[int, ...] = lv.OFFICIAL_FRAMES,
                    limit: int | None = None) -> list[VideoItem]:
    """The held-out test split of the long-video task (tasks/long_video.py), one item per video, in memory."""
    videos = lv.make_split("test", n_videos, lengths)[:limit] if limit else lv.make_split("test", n_videos, lengths)
    return [VideoItem(f"long_{v.seed}", f"long_{v.seed}.mp4", lv.qa_examples(v), synthetic=v) for v in videos]


def parse_lengths(text: str) -> tuple[int, ...]:
    """'64,80' -> (64, 80): video lengths (frames) of the synthetic set; one-line errors."""
    try:
        lengths = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--synthetic-lengths must be comma-separated integers, got {text!r}") from None
    bad = [n for n in lengths if not 64 <= n <= 128]
    if bad:
        raise ValueError(f"--synthetic-lengths: {bad} outside 64-128 frames (the task's video lengths)")
    return lengths


def load_items(
    benchmark: str,
    data_dir: str | Path | None,
    limit: int | None = None,
    split: str = "val",
    tasks: tuple[str, ...] = MLVU_DEV_TASKS,
    synthetic_videos: int | None = None,
    synthetic_lengths: tuple[int, ...] = lv.OFFICIAL_FRAMES,
) -> list[VideoItem]:
    """Questions of the benchmark grouped by video (first-seen order), optionally the first `limit` videos.

    "synthetic" generates the long-video test split (`synthetic_videos`, default 100, of `synthetic_lengths`).

    Questions of one video that name different subtitle files or offsets get separate items, so every
    item has one video context.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from: {', '.join(BENCHMARKS)}")
    if benchmark == "synthetic":
        if data_dir is not None:
            raise ValueError("--benchmark synthetic is generated from its seeds and reads no --data; for a written "
                             "set (python -m tasks.long_video --out DIR) use --benchmark longvideobench --data DIR")
        if split != "val" or tuple(tasks) != MLVU_DEV_TASKS:
            raise ValueError("--split and --tasks apply to LongVideoBench / MLVU only (the synthetic set is always "
                             "the long-video task's held-out test split)")
        return synthetic_items(synthetic_videos, synthetic_lengths, limit)
    if data_dir is None:
        raise ValueError(f"--data is required for --benchmark {benchmark} (the benchmark's local folder)")
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


def baseline_rows(items: list[VideoItem], results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """'chance' (a uniform guess: 1 / options, per question) and 'majority-letter' (always the most common
    answer letter of the set; 0.20 on the balanced synthetic set) over the questions the policies answered
    (the full cache's, else the first row's), with CIs and differences to the full cache on the same units.
    Nothing on an unscored split."""
    from transfer.stats import PairedBootstrap

    ref = "full" if results.get("full", {}).get("units") else next(
        (label for label, m in results.items() if m.get("units")), None)
    if ref is None:
        return {}
    questions = {q.id: q for item in items for q in item.questions}
    units = [tuple(u) for u in results[ref]["units"]]
    letters = [questions[u[2]].answer_letter for u in units]
    majority = max(sorted(set(letters)), key=letters.count)  # ties: the first letter
    rows = {"chance": [(*u[:3], 1 / len(questions[u[2]].options)) for u in units],
            "majority-letter": [(*u[:3], float(questions[u[2]].answer_letter == majority)) for u in units]}
    table = PairedBootstrap({ref: units, **rows})
    out = {}
    for label, rs in rows.items():
        per: dict[str, list[float]] = {}
        for (_, _, qid, value) in rs:
            q = questions[qid]
            for key, group in q.groups.items():
                if group:
                    per.setdefault(f"dur {group}" if key == "duration_group" else group, []).append(value)
        out[label] = {"policy": label, "score": table.score(label), "ci": table.ci(label), "n": table.n_units,
                      "n_rows": table.n_rows, "kept_fraction": None, "units": [list(u) for u in rs],
                      "per_task": {k: sum(v) / len(v) for k, v in per.items()},
                      **({"letter": majority} if label == "majority-letter" else {})}
        if ref == "full":
            delta, lo, hi = table.diff(label, "full")
            out[label].update(delta=delta, delta_ci=(lo, hi))
    return out


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
    synthetic = args.benchmark == "synthetic"
    frames = args.frames or (SYNTHETIC_FRAMES if synthetic else FILE_FRAMES)
    if frames <= 0:
        raise ValueError(f"--frames must be positive, got {frames}")
    data_dir = Path(args.data) if args.data else None
    if args.subtitles and args.benchmark != "longvideobench":
        raise ValueError("--subtitles applies to LongVideoBench-layout data only (MLVU and the synthetic set have "
                         "no subtitle files)")
    tasks = parse_mlvu_tasks(args.tasks)
    # the synthetic set's size and lengths; ignored on files (a preset sets them, a --config may switch benchmark)
    n_synth, lengths = args.synthetic_videos, parse_lengths(args.synthetic_lengths)
    if not synthetic:
        n_synth, lengths = lv.SPLIT_SIZE["test"], lv.OFFICIAL_FRAMES
    items = load_items(args.benchmark, data_dir, args.limit, args.split, tasks, n_synth, lengths)
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
        "domain": "video", "benchmark": args.benchmark, "model": model_path,
        "data": "tasks/long_video.py test split, generated (video seeds from 2e12)" if synthetic else str(data_dir),
        "frames": frames, "chunk_size": args.chunk_size,
        "max_new_tokens": max_new_tokens, "limit": args.limit, "seed": args.seed, "dtype": str(dtype),
        "n_videos": len(items), "n_questions": sum(len(i.questions) for i in items),
    }
    # Recorded (and in the run dir's name) only when not the default, so earlier default runs stay reusable.
    options = {"split": (args.split, "val"), "subtitles": (args.subtitles, False),
               "frame_sampling": (args.frame_sampling, "lmms-eval"), "tasks": (list(tasks), list(MLVU_DEV_TASKS)),
               "synthetic_videos": (n_synth, lv.SPLIT_SIZE["test"]),
               "synthetic_lengths": (list(lengths), list(lv.OFFICIAL_FRAMES))}
    extra = {k: v for k, (v, default) in options.items() if v != default}
    config.update(extra)

    def evaluate_batch(policy_factory: Any, batch: list[VideoItem]) -> list[dict[str, Any]]:
        rows = []
        for item in batch:
            t0 = time.time()
            try:
                if item.synthetic is not None:
                    clip = synthetic_clip(item.synthetic, frames, args.frame_sampling, size)
                else:
                    clip = read_video(item.video_path, frames, size=size, backend=args.backend,
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

    out = Path(args.out) / slug(args.benchmark, Path(model_path).name, f"{frames}f",
                                f"ui{run_options.update_interval}", *(option_slug(k, v) for k, v in extra.items()))
    summary = summarize(args.benchmark, items, args.split, out / "submissions")
    results = evaluate_policies(items, evaluate_batch, summary, out, config, run_options, units=question_units)
    results.update(baseline_rows(items, results))
    if args.benchmark == "mlvu":
        averaged = max((m.get("m_avg_tasks", []) for m in results.values()), key=len, default=[])
        metric = f"M-Avg over {len(averaged)} of {len(MLVU_DEV_TASKS)} tasks: {', '.join(averaged)}"
    else:
        metric = "test split, not scored" if args.split == "test" else "accuracy"
    sampling = f", {args.frame_sampling} sampling" if args.frame_sampling != "lmms-eval" else ""
    subtitles = ", subtitles" if args.subtitles else ""
    title = f"Video QA: {args.benchmark} ({Path(model_path).name}, {frames} frames{sampling}{subtitles}, {metric})"
    print_domain_table(title, results, time.time() - start, run_options.header())
    errors = max((m.get("errors", 0) for m in results.values()), default=0)
    if errors:
        print(f"{errors} video(s) could not be read; their questions are left out (see predictions.jsonl)")
    for label, m in results.items():
        if m.get("submission"):
            print(f"{label}: submission for {m['n']} questions in {m['submission']}")
    return results


def synthetic_clip(video: lv.LongVideo, frames: int, sampling: str, size: int | None) -> Any:
    """A generated video's frames as read_video would return a file's: the same sampling rules (the video
    plays at tasks.long_video.FPS), resized when the model takes another square size."""
    from adapters.llava_next_video import resize_frames
    from tasks.video_io import Clip, frame_chooser

    indices = frame_chooser(sampling, frames, video.num_frames / lv.FPS)(video.num_frames, lv.FPS)  # (F,)
    pixels = lv.eval_frames(video, indices)  # (F, 84, 84, 3) uint8
    if size is not None and size != lv.SIZE:
        pixels = resize_frames(pixels, size)
    return Clip(pixels, np.asarray(indices), float(lv.FPS), video.num_frames)


def option_slug(key: str, value: Any) -> str:
    """Run-dir name part of a non-default option (the MLVU task list is named by its members)."""
    if key in ("tasks", "synthetic_lengths"):
        return key.replace("_", "-") + "-" + "+".join(map(str, value))
    if value is True:
        return key
    return f"{key}-{value}"


def eviction_history(namm: str | None = None, frames: int = SYNTHETIC_FRAMES,
                     update_interval: int = 256) -> tuple[list, int]:
    """The NAMM's eviction record on the first video of the synthetic test set (for the report's map)."""
    from adapters.llava_next_video import LlavaNextVideoAdapter, processor_frame_size
    from transfer.policies import make_policy

    item = synthetic_items(limit=1)[0]
    adapter = LlavaNextVideoAdapter.from_pretrained(str(default_model()))
    clip = synthetic_clip(item.synthetic, frames, "lmms-eval", processor_frame_size(adapter.processor))
    memory = adapter.new_memory(make_policy("namm", namm=namm), update_interval=update_interval, record=True)
    adapter.answer_many(memory, clip.frames, [item.questions[0].prompt], max_new_tokens=4)
    return memory.history, memory.n_fed
