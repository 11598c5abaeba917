"""Video QA benchmarks from local files: LongVideoBench (val, test) and MLVU (dev), lmms-eval conventions.

Both load into one ``VideoQAExample`` list so that evaluators, memory policies and tables never see a
benchmark-specific record. Prompts and answer extraction follow lmms-eval (``longvideobench_val_v`` and
``mlvu_dev``) so that full-cache numbers are comparable with published ones. LongVideoBench subtitles
are placed between frames by the official loader's rule (``interleave_subtitles``); its test split has
no answers and is written in lmms-eval's submission format (``lvb_submission``).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transfer.atomic import read_json

LETTERS = "ABCDE"
LVB_POST_PROMPT = "Answer with the option's letter from the given choices directly.\n"
MLVU_POST_PROMPT = "\nOnly give the best option.\nBest option: ("
LVB_MAX_NEW_TOKENS = 32
MLVU_MAX_NEW_TOKENS = 16
ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)
# MLVU json files of the dev split (MLVU repo / HF MVLU layout: <root>/json/<n>_<task>.json).
MLVU_DEV_TASKS = ("plotQA", "needle", "ego", "count", "order", "anomaly_reco", "topic_reasoning")
# LongVideoBench annotation files per split (HF dataset longvideobench/LongVideoBench, official loader's names).
LVB_SPLITS = {"val": "lvb_val.json", "test": "lvb_test_wo_gt.json"}
# lmms-eval's test-split output: longvideobench_aggregate_results_for_submission in
# lmms_eval/tasks/longvideobench/utils.py writes {question id: raw model reply} to this file name.
LVB_SUBMISSION_FILE = "longvideobench_test_for_submission.json"


@dataclass
class VideoQAExample:
    """One multiple-choice question about one video, benchmark-agnostic."""

    id: str
    video_path: str
    question: str
    options: list[str]
    answer_letter: str  # "" where the split has no answers (LongVideoBench test)
    prompt: str
    groups: dict[str, str] = field(default_factory=dict)  # e.g. duration_group, question_category, task
    duration: float | None = None
    subtitle_path: str | None = None  # LongVideoBench: <data>/subtitles/<subtitle_path>
    subtitle_offset: float | None = None  # LongVideoBench's starting_timestamp_for_subtitles (seconds)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- prompts
def lvb_prompt(question: str, options: list[str]) -> str:
    """lmms-eval ``longvideobench_doc_to_text`` (val_v, no subtitles, empty pre_prompt)."""
    lines = "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
    return f"{question}\n{lines}\n{LVB_POST_PROMPT}"


def mlvu_question(question: str, candidates: list[str]) -> str:
    """MLVU question with its options embedded as in the HF ``MLVU_dev`` records ("(A) opt" lines)."""
    return question + "".join(f"\n({LETTERS[i]}) {c}" for i, c in enumerate(candidates))


def mlvu_prompt(question_with_options: str) -> str:
    """lmms-eval ``mlvu_dev`` prompt: question (options embedded) + post_prompt."""
    return question_with_options + MLVU_POST_PROMPT


# ---------------------------------------------------------------------------------------------- answers
def _strip_prefixes(response: str) -> str:
    s = response.strip()
    for prefix in ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    return s


def fallback_rng(seed: int, example_id: str) -> random.Random:
    """Per-example generator: a failed parse gets the same random letter whatever the run order."""
    return random.Random(f"{seed}:{example_id}")


def parse_multi_choice_response(response: str, all_choices: list[str], rng: random.Random) -> str:
    """lmms-eval LongVideoBench parser: strip answer prefixes, take the first [ABCDE].

    Long replies (> 10 words) without a capital option letter, and replies without any match, get a
    random choice (as in the LongVideoBench paper); ``rng`` makes that choice reproducible.
    """
    s = _strip_prefixes(response)
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return rng.choice(all_choices)
    match = re.search(r"[ABCDE]", s)
    if match is None:
        return rng.choice(all_choices)
    return match[0]


def extract_mlvu_answer(response: str, n_options: int) -> str:
    """lmms-eval MLVU extraction; '' (counted wrong) when no option letter is found.

    lmms-eval accepts only A-D; here the letter range follows the number of options (MLVU test has 6).
    """
    letters = "ABCDEFGH"[:n_options]
    s = _strip_prefixes(response)
    pattern = f"[{letters}]"
    if len(s.split()) > 10 and not re.search(pattern, s):
        return ""
    match = re.search(pattern, s)
    return "" if match is None else match[0]


# ----------------------------------------------------------------------------------------------- loaders
def _read_json(path: Path) -> list[dict]:
    return read_json(path, "annotation json", list)


def _lvb_options(row: dict) -> list[str]:
    if "candidates" in row:
        opts = list(row["candidates"])
    else:
        opts = [row.get(f"option{i}", "N/A") for i in range(5)]
    return [o for o in opts if o != "N/A"]


def load_longvideobench(data_dir: str | Path, split: str = "val", video_subdir: str = "videos") -> list[VideoQAExample]:
    """LongVideoBench from local files: ``<data_dir>/lvb_val.json`` (or ``lvb_test_wo_gt.json``) + ``videos/``.

    Accepts both the repo json layout (``candidates`` list) and the HF parquet layout (``option0..4``
    with "N/A" padding). Video paths are resolved as ``<data_dir>/<video_subdir>/<video_path>`` and
    subtitle paths as ``<data_dir>/subtitles/<subtitle_path>``, as the official loader does. The test
    split has no ``correct_choice``: its examples get ``answer_letter == ""``.
    """
    if split not in LVB_SPLITS:
        raise ValueError(f"unknown LongVideoBench split {split!r}; choose from: {', '.join(LVB_SPLITS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: LongVideoBench data directory not found")
    json_path = data_dir / LVB_SPLITS[split]
    rows = _read_json(json_path)
    required = ("question", "video_path") + (("correct_choice",) if split == "val" else ())
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{json_path}: record {i} lacks {', '.join(missing)}")
        options = _lvb_options(row)
        if not 1 <= len(options) <= len(LETTERS):
            raise ValueError(f"{json_path}: record {i} has {len(options)} options (1-{len(LETTERS)} allowed)")
        answer = ""
        if row.get("correct_choice") is not None:
            choice = int(row["correct_choice"])
            if not 0 <= choice < len(options):
                raise ValueError(f"{json_path}: record {i} has correct_choice {choice} for {len(options)} options")
            answer = LETTERS[choice]
        offset = row.get("starting_timestamp_for_subtitles")
        out.append(
            VideoQAExample(
                id=str(row.get("id", i)),
                video_path=str(data_dir / video_subdir / row["video_path"]),
                question=row["question"],
                options=options,
                answer_letter=answer,
                prompt=lvb_prompt(row["question"], options),
                groups={
                    "duration_group": str(row.get("duration_group", "")),
                    "question_category": str(row.get("question_category", "")),
                },
                duration=float(row["duration"]) if row.get("duration") is not None else None,
                subtitle_path=str(data_dir / "subtitles" / row["subtitle_path"]) if row.get("subtitle_path") else None,
                subtitle_offset=float(offset) if offset is not None else None,
            )
        )
    return out


def lvb_submission(ids: list[str], replies: list[str]) -> dict[str, str]:
    """lmms-eval's LongVideoBench test submission: {question id: raw model reply}, one entry per question."""
    if len(ids) != len(replies) or len(set(ids)) != len(ids):
        raise ValueError(f"need one reply per distinct question id, got {len(ids)} ids / {len(replies)} replies")
    return dict(zip(ids, replies))


# --------------------------------------------------------------------------------------------- subtitles
# The official LongVideoBench loader (github.com/longvideobench/LongVideoBench,
# longvideobench/longvideobench_dataset.py: insert_subtitles_into_frames) places subtitles between frames;
# lmms-eval's longvideobench task uses the same function. Two subtitle formats exist:
#   {"timestamp": [start, end], "text": ...} with seconds (end may be null), and
#   {"start": "HH:MM:SS.fff", "end": "HH:MM:SS.fff", "line": ...}.
def timestamp_to_seconds(timestamp: str) -> float:
    """'HH:MM:SS.fff' -> seconds."""
    try:
        h, m, s = str(timestamp).split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    except ValueError as e:
        raise ValueError(f"bad subtitle timestamp {timestamp!r} (expected HH:MM:SS.fff)") from e


def load_subtitles(path: str | Path) -> list[dict]:
    """A LongVideoBench subtitle file: a JSON list in either format above; anything else is an error."""
    path = Path(path)
    data = read_json(path, "subtitle file", list)
    for i, sub in enumerate(data):
        ok = isinstance(sub, dict) and (
            ("timestamp" in sub and "text" in sub and isinstance(sub["timestamp"], list) and len(sub["timestamp"]) == 2
             and isinstance(sub["timestamp"][0], (int, float)))
            or all(k in sub for k in ("start", "end", "line"))
        )
        if not ok:
            raise ValueError(f"{path}: subtitle {i} is neither {{timestamp: [start, end], text}} "
                             "nor {start, end, line}")
    return data


def subtitle_span(subtitle: dict, offset: float, duration: float) -> tuple[float, float, str]:
    """(start, end, text) in video seconds, as the official loader computes them.

    In the ``timestamp`` format an end that is not a float (null, and, as in the official code, also an
    integer) means "until the end of the video", i.e. ``duration``; both ends are then shifted by the
    clip's ``starting_timestamp_for_subtitles``.
    """
    if "timestamp" in subtitle:
        start, end = subtitle["timestamp"]
        if not isinstance(end, float):
            end = duration
        text = subtitle["text"]
    else:
        start, end = timestamp_to_seconds(subtitle["start"]), timestamp_to_seconds(subtitle["end"])
        text = subtitle["line"]
    return start - offset, end - offset, str(text)


def interleave_subtitles(
    frame_timestamps: list[float], subtitles: list[dict], offset: float, duration: float
) -> list[int | str]:
    """Frames (their positions 0..F-1) and subtitle texts in the order the official loader gives them.

    For each subtitle in file order: every frame not yet placed whose time is <= the subtitle's midpoint
    comes first; the text then follows if some frame (any, placed or not) lies strictly inside the
    subtitle's span, widened to midpoint +- 0.5 s when shorter than a second; else it is left out.
    Frames after the last subtitle close the list.
    """
    out: list[int | str] = []
    cur = 0
    for sub in subtitles:
        start, end, text = subtitle_span(sub, offset, duration)
        mid = (start + end) / 2
        while cur < len(frame_timestamps) and frame_timestamps[cur] <= mid:
            out.append(cur)
            cur += 1
        if end - start < 1:
            start, end = mid - 0.5, mid + 0.5
        if any(start < t < end for t in frame_timestamps):
            out.append(text)
    out.extend(range(cur, len(frame_timestamps)))
    return out


def parse_mlvu_tasks(text: str | None) -> tuple[str, ...]:
    """'needle,count' -> the selected MLVU dev tasks in the benchmark's order; None or '' -> all seven."""
    if not text:
        return MLVU_DEV_TASKS
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in MLVU_DEV_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown MLVU task(s) {', '.join(unknown) or repr(text)}; choose from: "
                         f"{', '.join(MLVU_DEV_TASKS)}")
    return tuple(t for t in MLVU_DEV_TASKS if t in names)


def load_mlvu_dev(data_dir: str | Path, tasks: tuple[str, ...] = MLVU_DEV_TASKS) -> list[VideoQAExample]:
    """MLVU dev from the MLVU repo layout: ``<data_dir>/json/<n>_<task>.json`` + ``video/<n>_<task>/``.

    Each record has ``video, question, candidates, answer`` (answer is the option text).
    """
    data_dir = Path(data_dir)
    json_dir = data_dir / "json"
    if not json_dir.is_dir():
        raise FileNotFoundError(f"{json_dir}: MLVU json directory not found")
    files = {re.sub(r"^\d+_", "", p.stem): p for p in sorted(json_dir.glob("*.json"))}
    out = []
    for task in tasks:
        if task not in files:
            raise FileNotFoundError(f"{json_dir}: no json for MLVU task {task!r} (expected e.g. 1_{task}.json;"
                                    " choose tasks with --tasks)")
        path = files[task]
        for i, row in enumerate(_read_json(path)):
            missing = [k for k in ("video", "question", "candidates", "answer") if k not in row]
            if missing:
                raise ValueError(f"{path}: record {i} lacks {', '.join(missing)}")
            cands = list(row["candidates"])
            if row["answer"] not in cands:
                raise ValueError(f"{path}: record {i} answer {row['answer']!r} is not one of its candidates")
            question = mlvu_question(row["question"], cands)
            out.append(
                VideoQAExample(
                    id=f"{task}_{i}",
                    video_path=str(data_dir / "video" / path.stem / row["video"]),
                    question=question,
                    options=cands,
                    answer_letter="ABCDEFGH"[cands.index(row["answer"])],
                    prompt=mlvu_prompt(question),
                    groups={"task": task},
                    duration=float(row["duration"]) if row.get("duration") is not None else None,
                )
            )
    return out


def group_by_video(examples: list[VideoQAExample]) -> dict[str, list[VideoQAExample]]:
    """Questions per video, in first-seen order: one (compressed) video prefill serves all of them."""
    groups: dict[str, list[VideoQAExample]] = defaultdict(list)
    for ex in examples:
        groups[ex.video_path].append(ex)
    return dict(groups)


# ----------------------------------------------------------------------------------------------- metrics
def parse_predictions(
    examples: list[VideoQAExample], responses: list[str], benchmark: str, seed: int = 0
) -> list[str]:
    """Letters extracted from raw model replies with the benchmark's own parser."""
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    if benchmark == "longvideobench":
        return [
            parse_multi_choice_response(r, list(LETTERS[: len(ex.options)]), fallback_rng(seed, ex.id))
            for ex, r in zip(examples, responses)
        ]
    if benchmark == "mlvu":
        return [extract_mlvu_answer(r, len(ex.options)) for ex, r in zip(examples, responses)]
    raise ValueError(f"unknown benchmark {benchmark!r}; choose longvideobench or mlvu")


def accuracy_by(examples: list[VideoQAExample], letters: list[str], key: str) -> dict[str, float]:
    """Accuracy per value of ``example.groups[key]``, keys sorted."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, letter in zip(examples, letters):
        hits[ex.groups.get(key, "")].append(letter == ex.answer_letter)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def lvb_metrics(examples: list[VideoQAExample], letters: list[str]) -> dict:
    """LongVideoBench ``lvb_acc``: micro accuracy overall, per duration_group and per question_category."""
    if not examples or len(examples) != len(letters):
        raise ValueError(f"need matching non-empty examples/letters, got {len(examples)}/{len(letters)}")
    correct = [letter == ex.answer_letter for ex, letter in zip(examples, letters)]
    return {
        "acc": sum(correct) / len(correct),
        "n": len(correct),
        "by_duration_group": accuracy_by(examples, letters, "duration_group"),
        "by_question_category": accuracy_by(examples, letters, "question_category"),
    }


def mlvu_metrics(examples: list[VideoQAExample], letters: list[str]) -> dict:
    """MLVU M-Avg: unweighted mean of per-task accuracies (plus micro accuracy for reference).

    ``m_avg_tasks`` names the tasks the mean is over (those with answered questions), so an M-Avg over
    a subset is never mistaken for the seven-task one.
    """
    if not examples or len(examples) != len(letters):
        raise ValueError(f"need matching non-empty examples/letters, got {len(examples)}/{len(letters)}")
    by_task = accuracy_by(examples, letters, "task")
    correct = [letter == ex.answer_letter for ex, letter in zip(examples, letters)]
    return {
        "m_avg": sum(by_task.values()) / len(by_task),
        "m_avg_tasks": [t for t in MLVU_DEV_TASKS if t in by_task] + sorted(set(by_task) - set(MLVU_DEV_TASKS)),
        "acc": sum(correct) / len(correct),
        "n": len(correct),
        "by_task": by_task,
    }
