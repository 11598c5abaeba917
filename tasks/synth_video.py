"""Seeded synthetic long-video QA in the LongVideoBench file layout.

A video is a sequence of 8-10 scenes; each scene shows one disc, in one of five colours, drifting
over a grey background. Exactly one scene (never the first or last) shows a big disc. Each video gets four
questions whose answer depends on a few moments of the video:

- ``first``: colour of the first object (only the opening frames matter),
- ``last``: colour of the last object (only the closing frames matter),
- ``needle``: colour of the big object (one scene in the middle),
- ``count``: how many scenes show a given colour (1-4; needs every scene).

So a memory policy that drops the wrong frames loses specific, measurable question types. Frames are
rendered with torch (vectorised over videos and frames), so training can draw fresh videos on a GPU
without any video codec, and the shipped eval set is the same renderer written to mp4.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
COLORS = list(PALETTE)
BACKGROUND = (60, 60, 60)
QUESTION_TYPES = ("first", "last", "needle", "count")
QUESTIONS = {
    "first": "what color was the first object ?",
    "last": "what color was the last object ?",
    "needle": "what color was the big object ?",
    "count": "how many times did a {color} object appear ?",
}
COUNT_OPTIONS = ["1", "2", "3", "4", "5"]
FRAME_COUNTS = (64, 96, 128)
FPS = 8
SIZE = 112
SMALL_RADIUS = (9, 15)
BIG_RADIUS = 40


@dataclass
class VideoSpec:
    """Everything needed to render one video; segments are [starts[i], starts[i+1])."""

    num_frames: int
    starts: list[int]  # (segments,) first frame of each scene
    colors: list[int]  # (segments,) palette index per scene
    centers: list[tuple[float, float]]  # (segments,) disc centre at scene start, pixels (x, y)
    velocity: list[tuple[float, float]]  # (segments,) drift in pixels per frame
    radii: list[float]  # (segments,)
    big: int  # scene index of the big disc
    count_color: int  # palette index asked about by the count question
    count: int  # how many scenes show count_color


def sample_spec(rng: np.random.Generator, num_frames: int | None = None, size: int = SIZE) -> VideoSpec:
    """Draw one video: scene lengths, colours (no two neighbours alike), discs, the big scene."""
    n = int(num_frames or rng.choice(FRAME_COUNTS))
    n_seg = int(rng.integers(8, 11))
    # Near-equal scene lengths so that 32 uniformly sampled frames see every scene at least twice.
    base = n / n_seg
    cuts = np.round(np.arange(1, n_seg) * base + rng.uniform(-0.2, 0.2, n_seg - 1) * base).astype(int)
    starts = [0] + sorted(set(cuts.tolist()))
    n_seg = len(starts)

    target = int(rng.integers(len(COLORS)))
    count = int(rng.integers(1, 5))
    # k non-adjacent scenes for the counted colour: choose gaps, as in "stars and bars".
    slots = n_seg - count + 1
    pos = np.sort(rng.choice(slots, size=count, replace=False)) + np.arange(count)
    colors = [-1] * n_seg
    for p in pos:
        colors[int(p)] = target
    for i in range(n_seg):
        if colors[i] >= 0:
            continue
        banned = {target, colors[i - 1] if i > 0 else -1, colors[i + 1] if i + 1 < n_seg else -1}
        choices = [c for c in range(len(COLORS)) if c not in banned]
        colors[i] = int(rng.choice(choices))

    big = int(rng.integers(1, n_seg - 1))
    radii = rng.uniform(*SMALL_RADIUS, n_seg)
    radii[big] = BIG_RADIUS
    margin = radii + 2
    centers = [(float(rng.uniform(m, size - m)), float(rng.uniform(m, size - m))) for m in margin]
    velocity = [tuple(float(v) for v in rng.uniform(-0.6, 0.6, 2)) for _ in range(n_seg)]
    return VideoSpec(n, starts, colors, centers, velocity, radii.tolist(), big, target, count)


def render(
    specs: list[VideoSpec],
    frame_indices: np.ndarray | list[list[int]] | None = None,
    size: int = SIZE,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Render frames of several videos at once, (videos, frames, size, size, 3) uint8.

    ``frame_indices`` is (videos, frames); ``None`` renders every frame (all specs must then have the
    same length).
    """
    if frame_indices is None:
        lengths = {s.num_frames for s in specs}
        if len(lengths) != 1:
            raise ValueError(f"rendering all frames needs equal-length videos, got lengths {sorted(lengths)}")
        frame_indices = [list(range(lengths.pop()))] * len(specs)
    idx = torch.as_tensor(np.asarray(frame_indices), dtype=torch.long, device=device)  # (V, F)
    n_seg = max(len(s.starts) for s in specs)

    def pad(rows: list[list], fill) -> torch.Tensor:
        return torch.tensor([r + [fill] * (n_seg - len(r)) for r in rows], dtype=torch.float32, device=device)

    starts = pad([s.starts for s in specs], 10**9)  # (V, S); padding never reached
    seg = (idx.unsqueeze(-1) >= starts.unsqueeze(1)).sum(-1) - 1  # (V, F) scene of each frame
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=device)  # (C, 3)
    colors = palette[pad([s.colors for s in specs], 0).long()]  # (V, S, 3)
    centers = pad([[list(c) for c in s.centers] for s in specs], [0.0, 0.0])  # (V, S, 2)
    velocity = pad([[list(v) for v in s.velocity] for s in specs], [0.0, 0.0])  # (V, S, 2)
    radii = pad([s.radii for s in specs], 1.0)  # (V, S)

    def take(t: torch.Tensor) -> torch.Tensor:  # gather per-frame values of the frame's scene
        return torch.gather(t, 1, seg.view(*seg.shape, *([1] * (t.dim() - 2))).expand(*seg.shape, *t.shape[2:]))

    t_in_seg = (idx - take(starts)).float()  # (V, F)
    center = take(centers) + take(velocity) * t_in_seg.unsqueeze(-1)  # (V, F, 2)
    radius = take(radii)  # (V, F)
    color = take(colors)  # (V, F, 3)
    grid = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    dx = grid.view(1, 1, 1, size) - center[..., 0, None, None]  # (V, F, 1, W)
    dy = grid.view(1, 1, size, 1) - center[..., 1, None, None]  # (V, F, H, 1)
    inside = (dx**2 + dy**2) <= radius[..., None, None] ** 2  # (V, F, H, W)
    bg = torch.tensor(BACKGROUND, dtype=torch.float32, device=device)
    frames = torch.where(inside.unsqueeze(-1), color[:, :, None, None, :], bg)
    return frames.to(torch.uint8)


def make_questions(spec: VideoSpec, rng: np.random.Generator) -> list[dict]:
    """Four multiple-choice questions (5 options each, always in the same order) about one video.

    ``rng`` is unused since options are fixed; it stays in the signature for variants with shuffled
    options (a first tiny model trained on shuffled options stayed at chance in 1k GPU steps).
    """
    out = []
    for qtype in QUESTION_TYPES:
        if qtype == "count":
            question = QUESTIONS["count"].format(color=COLORS[spec.count_color])
            options = list(COUNT_OPTIONS)
            answer = spec.count - 1
        else:
            truth = {"first": spec.colors[0], "last": spec.colors[-1], "needle": spec.colors[spec.big]}[qtype]
            options = list(COLORS)  # fixed palette order: a tiny model need not learn to read the options
            answer = truth
            question = QUESTIONS[qtype]
        out.append({"question_category": qtype, "question": question, "candidates": options,
                    "correct_choice": answer})
    return out


def sample_dataset(n_videos: int, seed: int, num_frames: int | None = None) -> list[tuple[VideoSpec, list[dict]]]:
    """Specs and questions of a whole set; identical for identical (n_videos, seed, num_frames)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n_videos):
        spec = sample_spec(rng, num_frames)
        items.append((spec, make_questions(spec, rng)))
    return items


def generate_lvb(out_dir: str | Path, n_videos: int = 48, seed: int = 1234, overwrite: bool = False) -> Path:
    """Write ``<out_dir>/videos/*.mp4`` + ``lvb_val.json`` (LongVideoBench layout), atomically."""
    from tasks.video_io import write_mp4
    from transfer.atomic import atomic_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite)")
    with atomic_dir(out_dir) as tmp:  # a kill leaves the old set, never a half-written one
        records = []
        for v, (spec, questions) in enumerate(sample_dataset(n_videos, seed)):
            vid = f"synth_{seed}_{v:04d}"
            write_mp4(tmp / "videos" / f"{vid}.mp4", render([spec])[0].numpy(), fps=FPS)
            for q, qa in enumerate(questions):
                records.append({
                    "video_id": vid,
                    "id": f"{vid}_{q}",
                    "video_path": f"{vid}.mp4",
                    "duration": spec.num_frames / FPS,
                    "duration_group": spec.num_frames,
                    **qa,
                })
        (tmp / "lvb_val.json").write_text(json.dumps(records, indent=1))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a synthetic LongVideoBench-layout video QA set.")
    p.add_argument("--out", required=True, help="output directory (videos/ + lvb_val.json)")
    p.add_argument("--n-videos", type=int, default=48)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    t0 = time.time()
    out = generate_lvb(args.out, args.n_videos, args.seed, args.overwrite)
    n_q = len(json.loads((out / "lvb_val.json").read_text()))
    print(f"wrote {args.n_videos} videos, {n_q} questions to {out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
