"""Seeded synthetic long-video QA whose questions need the whole video (issue 19, item 1).

A video is 64-128 frames of a grey background on which K (8-14) objects appear one after another,
each a coloured disc (five colours) visible for a short span of frames, with blank frames between
them. Exactly one object, never the first or the last, is big: the needle. Every video gets five
multiple-choice questions, one per type (``QUESTION_TYPES``):

- ``needle``: colour of the big object (one short span at a random time),
- ``count``: how many times an object of a given colour appeared (1-5; every span matters),
- ``order``: which of two colours appeared first (two random times),
- ``first`` / ``last``: colour of the first / last object (the opening / closing frames).

Options are in a fixed order (the five colours, or the counts 1-5), so a letter is a colour or a
count. A set's answer letters are balanced exactly per question type: the answers are drawn first
(a shuffled balanced list per type) and each video is built to have them (``make_video``), so always
answering one letter scores exactly 0.20 on every type.

Splits are disjoint by construction: every video comes from one integer seed, and the seed ranges of
the splits do not overlap (``video_seed``): train ``[0, 1e12)`` (the trainer's stream, drawn on the
fly as arrays), validation ``[1e12, ...)``, test ``[2e12, ...)``. Validation chooses the model, test is
reported once. ``write_lvb`` writes a split in the LongVideoBench public layout (``videos/*.mp4`` +
``lvb_val.json``; answers included, so ``eval video --benchmark longvideobench --data DIR`` scores it).

Timing survives the evaluator's frame sampling: objects last >= 4 frames and gaps >= 3 in the
official lengths, so ``np.linspace(0, T - 1, N)`` with N >= T / 2 (64 frames of a 128-frame video)
still sees every object and every gap (tested by an oracle that answers from the pixels alone).
Rendering is numpy, vectorised over frames (``python -m tasks.long_video --bench`` measures it).

    python -m tasks.long_video --split test --out runs/video/long-test     # 100 videos, 500 questions
    python -m tasks.long_video --split test --n-videos 15 --lengths 64 --out runs/video/long-quick  # CPU quick set
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.synth_video import BACKGROUND, COLORS, PALETTE
from tasks.video_bench import LETTERS, VideoQAExample, lvb_prompt

QUESTION_TYPES = ("needle", "count", "order", "first", "last")
QUESTIONS = {
    "needle": "what color was the big object ?",
    "count": "how many times did a {color} object appear ?",
    "order": "which appeared first , the {a} object or the {b} object ?",
    "first": "what color was the first object ?",
    "last": "what color was the last object ?",
}
COUNT_OPTIONS = ["1", "2", "3", "4", "5"]
N_OPTIONS = 5
SIZE = 84  # square frames; with 7 px patches: 12 x 12 patches, pooled 2 x 2 to 36 tokens a frame
FPS = 8
OFFICIAL_FRAMES = (64, 80, 96, 112, 128)  # video lengths of the validation and test sets (duration_group)
SMALL_RADIUS = (6.0, 9.0)
BIG_RADIUS = (24.0, 29.0)
MIN_EVENTS, MAX_EVENTS = 8, 14
SPLIT_BASE = {"train": 0, "val": 10**12, "test": 2 * 10**12}
SPLIT_SIZE = {"val": 50, "test": 100}  # videos (5 questions each): 250 / 500 questions
_PAL = np.array(list(PALETTE.values()), dtype=np.uint8)  # (5, 3)
_BG = np.array(BACKGROUND, dtype=np.uint8)
EVAL_NOISE_STREAM = 1  # second word of the noise seed (the first is the video seed, whose stream makes the video)


@dataclass
class LongVideo:
    """Everything needed to render one video and ask its questions; object i is visible in [starts[i], ends[i])."""

    seed: int
    num_frames: int
    starts: list[int]  # (K,)
    ends: list[int]  # (K,) exclusive
    colors: list[int]  # (K,) palette index
    centers: list[tuple[float, float]]  # (K,) (x, y) in pixels at the object's first frame
    velocity: list[tuple[float, float]]  # (K,) pixels per frame
    radii: list[float]  # (K,)
    big: int  # object index of the needle
    count_color: int
    order_pair: tuple[int, int]  # the two colours as the question names them
    answers: dict[str, int] = field(default_factory=dict)  # question type -> option index (0-4)


def video_seed(split: str, index: int) -> int:
    """The integer seed of video `index` of a split; the ranges of the splits never overlap."""
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; choose from: {', '.join(SPLIT_BASE)}")
    if not 0 <= index < 10**12:
        raise ValueError(f"video index {index} out of range [0, 1e12)")
    return SPLIT_BASE[split] + index


def train_seed(run_seed: int, step: int, i: int, batch: int) -> int:
    """Seed of the i-th video of training batch `step` (inside the train range for any sane run)."""
    index = (run_seed * 10**9 + step * batch + i) % 10**12
    return video_seed("train", index)


def _layout(rng: np.random.Generator, n_frames: int, k: int, big: int) -> tuple[list[int], list[int]]:
    """Starts / ends of k objects: minimum spans and gaps, the slack spread at random (objects capped)."""
    min_ev, min_gap = (4, 3) if n_frames >= 64 else (2, 1)
    cap = np.full(k, 2 * min_ev + 2)
    cap[big] = min_ev + 2  # the needle is a short span
    slack = n_frames - (k * min_ev + (k - 1) * min_gap + 2)
    if slack < 0:
        raise ValueError(f"{k} objects do not fit in {n_frames} frames")
    share = rng.multinomial(slack, rng.dirichlet(np.ones(2 * k + 1)))
    extra_ev = np.minimum(share[:k], cap - min_ev)
    gaps = share[k:].copy()  # (k + 1,) lead, k - 1 inner, trail
    overflow = int(share[:k].sum() - extra_ev.sum())
    if overflow:
        gaps += rng.multinomial(overflow, np.ones(k + 1) / (k + 1))
    dur = min_ev + extra_ev
    gaps[1:k] += min_gap
    gaps[0] += 1
    gaps[k] += 1
    starts, t = [], int(gaps[0])
    for i in range(k):
        starts.append(t)
        t += int(dur[i]) + int(gaps[i + 1])
    assert t == n_frames, (t, n_frames)
    return starts, [s + int(d) for s, d in zip(starts, dur)]


def _colors(rng: np.random.Generator, k: int, big: int, ans: dict[str, int]) -> tuple[list[int], int, tuple] | None:
    """Colours of k objects with the wanted first / last / needle / count / order answers, or None."""
    first, last, needle, n = ans["first"], ans["last"], ans["needle"], ans["count"] + 1
    fixed = {0: first, k - 1: last, big: needle}
    free = [i for i in range(k) if i not in fixed]
    m = {c: sum(v == c for v in fixed.values()) for c in range(N_OPTIONS)}
    feasible = [c for c in range(N_OPTIONS) if m[c] <= n and n - m[c] <= len(free)]
    if not feasible:
        return None
    c = int(rng.choice(feasible))
    seq = [-1] * k
    for i, v in fixed.items():
        seq[i] = v
    chosen = rng.choice(free, size=n - m[c], replace=False)
    for i in chosen:
        seq[int(i)] = c
    others = [x for x in range(N_OPTIONS) if x != c]
    for i in free:
        if seq[i] < 0:
            seq[i] = int(rng.choice(others))
    if seq.count(c) != n:
        return None
    earlier = ans["order"]
    firsts = {}
    for i, v in enumerate(seq):
        firsts.setdefault(v, i)
    if earlier not in firsts:
        return None
    later = [o for o, i in firsts.items() if i > firsts[earlier]]
    if not later:
        return None
    other = int(rng.choice(later))
    pair = (earlier, other) if rng.random() < 0.5 else (other, earlier)
    return seq, c, pair


def make_video(seed: int, num_frames: int | None = None, answers: dict[str, int] | None = None) -> LongVideo:
    """One video from its seed, built to have `answers` ({type: option index}; random when None)."""
    rng = np.random.default_rng(seed)
    n = int(num_frames if num_frames is not None else rng.choice(OFFICIAL_FRAMES))
    min_ev, min_gap = (4, 3) if n >= 64 else (2, 1)
    k_hi = min(MAX_EVENTS, (n - 2 + min_gap) // (min_ev + min_gap))
    if k_hi < MIN_EVENTS:
        raise ValueError(f"{n} frames hold fewer than {MIN_EVENTS} objects; use at least 32 frames")
    ans = dict(answers) if answers is not None else {q: int(rng.integers(N_OPTIONS)) for q in QUESTION_TYPES}
    for _ in range(1000):
        k = int(rng.integers(MIN_EVENTS, k_hi + 1))
        big = int(rng.integers(1, k - 1))
        got = _colors(rng, k, big, ans)
        if got is not None:
            break
    else:
        raise RuntimeError(f"seed {seed}: no colour sequence has the answers {ans}")
    seq, count_color, pair = got
    starts, ends = _layout(rng, n, k, big)
    radii = rng.uniform(*SMALL_RADIUS, k)
    radii[big] = rng.uniform(*BIG_RADIUS)
    velocity = rng.uniform(-0.5, 0.5, (k, 2))
    span = np.array(ends) - np.array(starts)
    margin = radii + 1 + np.abs(velocity).max(1) * span
    centers = [(float(rng.uniform(mg, SIZE - mg)), float(rng.uniform(mg, SIZE - mg))) if mg < SIZE / 2
               else (SIZE / 2, SIZE / 2) for mg in margin]
    vid = LongVideo(seed, n, starts, ends, seq, centers, [tuple(map(float, v)) for v in velocity], radii.tolist(),
                    big, count_color, pair)
    vid.answers = {**ans, "count": seq.count(count_color) - 1}
    return vid


def render(video: LongVideo, indices: np.ndarray | list[int] | None = None, size: int = SIZE) -> np.ndarray:
    """Frames `indices` (default: all) of one video, (N, size, size, 3) uint8, vectorised over frames."""
    idx = np.arange(video.num_frames) if indices is None else np.asarray(indices, dtype=np.int64)  # (N,)
    starts, ends = np.array(video.starts), np.array(video.ends)
    obj = np.clip(np.searchsorted(starts, idx, side="right") - 1, 0, None)  # (N,) last object started
    visible = (idx >= starts[obj]) & (idx < ends[obj])  # (N,)
    dt = (idx - starts[obj]).astype(np.float32)
    c = np.array(video.centers, np.float32)[obj] + np.array(video.velocity, np.float32)[obj] * dt[:, None]  # (N, 2)
    r = np.where(visible, np.array(video.radii, np.float32)[obj], -1.0)  # (N,) no disc when not visible
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx2 = (grid[None, None, :] - c[:, 0, None, None]) ** 2  # (N, 1, W)
    dy2 = (grid[None, :, None] - c[:, 1, None, None]) ** 2  # (N, H, 1)
    inside = (dx2 + dy2) <= (r * np.abs(r))[:, None, None]  # (N, H, W)
    color = _PAL[np.array(video.colors)[obj]]  # (N, 3)
    return np.where(inside[..., None], color[:, None, None, :], _BG)  # (N, H, W, 3)


def codec_like(frames: np.ndarray, rng: np.random.Generator | None, noise: float = 2.0) -> np.ndarray:
    """What an H.264 yuv420p round trip does to flat colours, in numpy: chroma at half resolution (2x2
    mean, bilinear back up as ``F.interpolate(align_corners=False)``), plus Gaussian pixel noise.
    (N, H, W, 3) uint8 -> uint8, H and W even. Elementwise float32 numpy only (each operation correctly
    rounded, no threads), so a seed gives the same frames on every machine and thread count; the
    trainer's torch version (``train.video.codec_like``) makes the same frames up to the noise draw."""
    x = frames.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b  # (N, H, W)
    chroma = np.stack([b - y, r - y], axis=1)  # (N, 2, H, W)
    n, _, h, w = chroma.shape
    c = chroma.reshape(n, 2, h // 2, 2, w // 2, 2).mean((3, 5), dtype=np.float32)  # (N, 2, H/2, W/2)
    c = _upsample2(_upsample2(c, 2), 3)  # (N, 2, H, W)
    cb, cr = c[:, 0], c[:, 1]
    g_out = y - np.float32(0.299 / 0.587) * cr - np.float32(0.114 / 0.587) * cb
    rgb = np.stack([y + cr, g_out, y + cb], axis=-1)  # (N, H, W, 3)
    if rng is not None and noise:
        rgb = rgb + np.float32(noise) * rng.standard_normal(rgb.shape, dtype=np.float32)
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def _upsample2(c: np.ndarray, axis: int) -> np.ndarray:
    """x2 bilinear along `axis` with half-pixel centres and edge clamping: out[2k] = .75 c[k] + .25 c[k-1],
    out[2k+1] = .75 c[k] + .25 c[k+1]."""
    pad = [(0, 0)] * c.ndim
    pad[axis] = (1, 1)
    e = np.pad(c, pad, mode="edge")
    n = c.shape[axis]
    mid, lo, hi = (np.take(e, np.arange(a, a + n), axis=axis) for a in (1, 0, 2))
    even = np.float32(0.75) * mid + np.float32(0.25) * lo
    odd = np.float32(0.75) * mid + np.float32(0.25) * hi
    out = np.stack([even, odd], axis=axis + 1)
    return out.reshape(*c.shape[:axis], 2 * n, *c.shape[axis + 1:])


def eval_frames(video: LongVideo, indices: np.ndarray | list[int]) -> np.ndarray:
    """Frames `indices` of a validation / test video as the evaluator sees them: rendered, then the
    codec-like noise seeded by the video's seed alone (so a video looks the same in any subset of its
    set, in any order), (N, SIZE, SIZE, 3) uint8."""
    return codec_like(render(video, indices), np.random.default_rng([video.seed, EVAL_NOISE_STREAM]))


def frame_colors(video: LongVideo, indices: np.ndarray | list[int]) -> np.ndarray:
    """Palette index of the object visible in each frame of `indices`, -1 where the frame is blank, (N,)."""
    idx = np.asarray(indices, dtype=np.int64)
    starts, ends = np.array(video.starts), np.array(video.ends)
    obj = np.clip(np.searchsorted(starts, idx, side="right") - 1, 0, None)
    visible = (idx >= starts[obj]) & (idx < ends[obj])
    return np.where(visible, np.array(video.colors)[obj], -1)


def sample_frames(num_frames: int, n: int) -> np.ndarray:
    """The evaluator's (lmms-eval) rule: n indices uniform over a video's frames."""
    return np.linspace(0, num_frames - 1, n, dtype=int)


# ------------------------------------------------------------------------------------------- questions
def make_questions(video: LongVideo) -> list[dict]:
    """Five questions (``QUESTION_TYPES`` order), options in a fixed order, answers from the video."""
    out = []
    for qtype in QUESTION_TYPES:
        if qtype == "count":
            text, options = QUESTIONS["count"].format(color=COLORS[video.count_color]), list(COUNT_OPTIONS)
        elif qtype == "order":
            a, b = video.order_pair
            text, options = QUESTIONS["order"].format(a=COLORS[a], b=COLORS[b]), list(COLORS)
        else:
            text, options = QUESTIONS[qtype], list(COLORS)
        out.append({"question_category": qtype, "question": text, "candidates": options,
                    "correct_choice": int(video.answers[qtype])})
    return out


def balanced_answers(n_videos: int, rng: np.random.Generator) -> list[dict[str, int]]:
    """Per question type a shuffled list with every letter n_videos / 5 times (n_videos a multiple of 5)."""
    if n_videos % N_OPTIONS:
        raise ValueError(f"a balanced set needs a multiple of {N_OPTIONS} videos, got {n_videos}")
    cols = {q: rng.permutation(np.resize(np.arange(N_OPTIONS), n_videos)) for q in QUESTION_TYPES}
    return [{q: int(cols[q][i]) for q in QUESTION_TYPES} for i in range(n_videos)]


def make_split(split: str, n_videos: int | None = None, lengths: tuple[int, ...] = OFFICIAL_FRAMES) -> list[LongVideo]:
    """The validation or test set: balanced answers per type and lengths balanced over `lengths`.

    The CPU quick set is ``make_split("test", 15, (64,))``: test seeds, the shortest videos only.
    """
    if split not in ("val", "test"):
        raise ValueError(f"fixed sets are 'val' and 'test' (train is a stream), got {split!r}")
    n = SPLIT_SIZE[split] if n_videos is None else n_videos
    rng = np.random.default_rng(SPLIT_BASE[split])
    answers = balanced_answers(n, rng)
    if min(lengths) < 64:
        raise ValueError(f"fixed sets use videos of 64 frames or more, got lengths {lengths}")
    per_video = rng.permutation(np.resize(np.array(lengths), n))
    videos = [make_video(video_seed(split, i), int(per_video[i]), answers[i]) for i in range(n)]
    check_balanced(videos)
    return videos


def check_balanced(videos: list[LongVideo]) -> None:
    """Assert every answer letter occurs equally often per question type."""
    for q in QUESTION_TYPES:
        counts = np.bincount([v.answers[q] for v in videos], minlength=N_OPTIONS)
        assert counts.min() == counts.max(), f"letters of {q!r} unbalanced: {counts.tolist()}"


# ---------------------------------------------------------------------------------------------- oracle
def read_events(frames: np.ndarray) -> list[tuple[int, bool]]:
    """(colour, big) of each object in (N, H, W, 3) frames: runs of non-blank frames, from the pixels alone."""
    x = frames.astype(np.int32)
    fg = np.abs(x - _BG.astype(np.int32)).sum(-1) > 60  # (N, H, W)
    area = fg.sum((1, 2))  # (N,)
    events: list[tuple[list[int], int]] = []
    prev = False
    for t in range(len(frames)):
        on = area[t] >= 12
        if on:
            mean = x[t][fg[t]].mean(0)
            col = int(np.argmin(((_PAL.astype(np.float32) - mean) ** 2).sum(1)))
            if not prev:
                events.append(([], 0))
            cols, big = events[-1]
            events[-1] = (cols + [col], max(big, int(area[t])))
        prev = on
    return [(int(np.bincount(cols).argmax()), big > np.pi * 16**2) for cols, big in events]


def oracle_answer(frames: np.ndarray, question: dict) -> int:
    """The option index a perfect observer picks from the frames (checks that the task is well-posed)."""
    events = read_events(frames)
    cols = [c for c, _ in events]
    qtype = question["question_category"]
    if qtype == "first":
        return cols[0]
    if qtype == "last":
        return cols[-1]
    if qtype == "needle":
        (big,) = [c for c, b in events if b]
        return big
    words = question["question"].split()
    if qtype == "count":
        return cols.count(COLORS.index(words[5])) - 1
    a, b = COLORS.index(words[5]), COLORS.index(words[9])
    return a if cols.index(a) < cols.index(b) else b


# ------------------------------------------------------------------------------------------- LVB layout
def lvb_records(video: LongVideo) -> list[dict]:
    vid = f"long_{video.seed}"
    return [{"video_id": vid, "id": f"{vid}_{q['question_category']}", "video_path": f"{vid}.mp4",
             "duration": video.num_frames / FPS, "duration_group": video.num_frames, **q}
            for q in make_questions(video)]


def qa_examples(video: LongVideo) -> list[VideoQAExample]:
    """The video's five questions as the evaluator's examples (what ``load_longvideobench`` would read from
    ``write_lvb``'s files: the same ids, prompts, answers and groups), for in-memory evaluation."""
    return [VideoQAExample(id=r["id"], video_path=f"{r['video_id']}.mp4", question=r["question"],
                           options=list(r["candidates"]), answer_letter=LETTERS[r["correct_choice"]],
                           prompt=lvb_prompt(r["question"], r["candidates"]),
                           groups={"duration_group": str(r["duration_group"]),
                                   "question_category": r["question_category"]},
                           duration=float(r["duration"]))
            for r in lvb_records(video)]


def write_lvb(split: str, out_dir: str | Path, n_videos: int | None = None, overwrite: bool = False,
              lengths: tuple[int, ...] = OFFICIAL_FRAMES) -> Path:
    """``<out_dir>/videos/*.mp4`` + ``lvb_val.json`` (LongVideoBench layout, answers included), atomically."""
    from tasks.video_io import write_mp4
    from transfer.atomic import atomic_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass --overwrite)")
    with atomic_dir(out_dir) as tmp:  # a kill leaves the old set, never a half-written one
        records = []
        for video in make_split(split, n_videos, lengths):
            write_mp4(tmp / "videos" / f"long_{video.seed}.mp4", render(video), fps=FPS)
            records += lvb_records(video)
        (tmp / "lvb_val.json").write_text(json.dumps(records, indent=1))
    return out_dir


def bench(seconds: float = 3.0, frames: int = 128) -> float:
    """Frames per second of make_video + render on one core (the training stream's cost)."""
    n, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        v = make_video(train_seed(0, 0, i, 1), frames)
        n += len(render(v))
        i += 1
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a split of the synthetic long-video QA (LongVideoBench layout).")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--out", help="output directory (videos/ + lvb_val.json)")
    p.add_argument("--n-videos", type=int, default=None, help="default: 50 (val) / 100 (test); a multiple of 5")
    p.add_argument("--lengths", default=",".join(map(str, OFFICIAL_FRAMES)),
                   help="video lengths in frames, comma separated (the CPU quick set: 64)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--bench", action="store_true", help="measure rendering frames/second on one core and exit")
    args = p.parse_args(argv)
    if args.bench:
        print(f"{bench():.0f} frames/s on one core ({SIZE}x{SIZE}, 128-frame videos, spec + render)")
        return
    if not args.out:
        p.error("--out is required (or --bench)")
    t0 = time.time()
    try:
        lengths = tuple(int(x) for x in args.lengths.split(","))
    except ValueError:
        p.error(f"--lengths must be integers, got {args.lengths!r}")
    out = write_lvb(args.split, args.out, args.n_videos, args.overwrite, lengths)
    n_q = len(json.loads((out / "lvb_val.json").read_text()))
    print(f"wrote the {args.split} split: {n_q // len(QUESTION_TYPES)} videos, {n_q} questions to {out} "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
