"""Video frame reading for the video QA evaluators.

Two frame-sampling rules (``FRAME_SAMPLINGS``):

- ``lmms-eval`` (default): ``np.linspace(0, n - 1, num_frames, dtype=int)`` over the container's n
  frames, exactly as lmms-eval's ``llava_hf`` model does, so a frame budget means the same thing here
  as in published lmms-eval numbers;
- ``lvb-official``: the official LongVideoBench loader's rule (``load_video`` in
  github.com/longvideobench/LongVideoBench, ``longvideobench/longvideobench_dataset.py``): with the
  annotation's ``duration`` and the container's average fps, ``total = int(duration * fps)``,
  ``num = min(num_frames, int(duration))`` (at most one frame a second) and frame i is
  ``int(total / num) * i``; frame timestamps are ``index / fps``.

PyAV is the main reader (transformers' default backend); decord (the ``decord2`` package) is an
alternative that seeks instead of decoding every frame.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters.llava_next_video import resize_frames

BACKENDS = ("pyav", "decord", "auto")
FRAME_SAMPLINGS = ("lmms-eval", "lvb-official")


class VideoError(ValueError):
    """A video that cannot be read: missing, corrupt, truncated or empty."""


@dataclass
class Clip:
    """Sampled frames with where they came from: ``timestamps`` (seconds) place subtitles between them."""

    frames: np.ndarray  # (F, H, W, 3) uint8
    indices: np.ndarray  # (F,) container frame indices
    fps: float  # the container's average frame rate
    total: int  # frames the container holds (or decoded, when it does not say)

    @property
    def timestamps(self) -> list[float]:
        return [int(i) / self.fps for i in self.indices]


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """lmms-eval's rule: uniform frame indices over ``total`` frames (duplicates when the clip is shorter)."""
    if total <= 0:
        raise ValueError(f"total frames must be positive, got {total}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return np.linspace(0, total - 1, num_frames, dtype=int)


def lvb_official_indices(duration: float, fps: float, max_frames: int) -> np.ndarray:
    """The official LongVideoBench loader's rule: at most one frame a second, ``int(total / num) * i``.

    Official code divides by ``int(duration)``, which is zero for clips under a second; here such a clip
    gets its first frame (index 0) instead of a ZeroDivisionError.
    """
    if max_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {max_frames}")
    if not (duration > 0 and fps > 0):
        raise ValueError(f"lvb-official sampling needs a positive duration and fps, got {duration} s at {fps} fps")
    total_valid = int(duration * fps)
    num = max(1, min(max_frames, int(duration)))
    step = int(total_valid / num)
    return np.array([step * i for i in range(num)], dtype=int)


def frame_chooser(sampling: str, num_frames: int, duration: float | None = None) -> Callable[[int, float], np.ndarray]:
    """(container frames, fps) -> indices for one sampling rule; ``duration`` (seconds) for lvb-official,
    taken from the container (frames / fps) when the annotation gives none."""
    if sampling not in FRAME_SAMPLINGS:
        raise ValueError(f"unknown frame sampling {sampling!r}; choose one of {', '.join(FRAME_SAMPLINGS)}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if sampling == "lmms-eval":
        return lambda total, fps: sample_indices(total, num_frames)
    return lambda total, fps: lvb_official_indices(duration if duration is not None else total / fps, fps, num_frames)


def _check_args(path: Path, num_frames: int, size: int | None, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if size is not None and size <= 0:
        raise ValueError(f"size must be positive or None, got {size}")
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: video file is empty (0 bytes)")


def _read_pyav(path: Path, choose: Callable[[int, float], np.ndarray]) -> Clip:
    import av

    def to_array(frame) -> np.ndarray:
        return frame.to_ndarray(format="rgb24")

    n_decoded, total = 0, 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream in file")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            if fps <= 0:
                raise VideoError(f"{path}: the video stream has no frame rate")
            total = int(stream.frames or 0)
            if total <= 0:
                # Container without a frame count (some mkv/webm): decode everything once.
                frames = [to_array(f) for f in container.decode(stream)]
                if not frames:
                    raise VideoError(f"{path}: no decodable frames")
                idx = choose(len(frames), fps)
                if int(idx[-1]) >= len(frames):
                    raise VideoError(f"{path}: only {len(frames)} frames decode; the sampling needs frame {idx[-1]}")
                return Clip(np.stack([frames[i] for i in idx]), idx, fps, len(frames))
            idx = choose(total, fps)
            wanted = set(idx.tolist())
            last = int(idx[-1])
            got: dict[int, np.ndarray] = {}
            for i, frame in enumerate(container.decode(stream)):
                n_decoded = i + 1
                if i in wanted:
                    got[i] = to_array(frame)
                if i >= last:
                    break
    except VideoError:
        raise
    except Exception as e:  # PyAV raises many error types (InvalidDataError, EOFError, ...)
        where = f": only {n_decoded} of its {total} frames decode" if total else ""
        raise VideoError(f"{path}: cannot decode video with PyAV{where} ({type(e).__name__}: {e})") from e
    if len(got) < len(wanted):
        if n_decoded >= total:  # every frame decoded: the sampling asked for more than the file holds
            raise VideoError(f"{path}: the sampling needs frame {last} but the video has {total} frames "
                             "(annotation duration longer than the file?)")
        raise VideoError(f"{path}: truncated video: only {n_decoded} of its {total} frames decode, "
                         f"{len(got)} of the {len(wanted)} sampled frames (up to index {last})")
    return Clip(np.stack([got[i] for i in idx.tolist()]), idx, fps, total)


def _read_decord(path: Path, choose: Callable[[int, float], np.ndarray]) -> Clip:
    import decord

    total = 0
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(vr)
        if total <= 0:
            raise VideoError(f"{path}: no decodable frames")
        fps = float(vr.get_avg_fps())
        if fps <= 0:
            raise VideoError(f"{path}: the video stream has no frame rate")
        idx = choose(total, fps)
        if int(idx[-1]) >= total:
            raise VideoError(f"{path}: the sampling needs frame {idx[-1]} but the video has {total} frames "
                             "(annotation duration longer than the file?)")
        frames = vr.get_batch(idx.tolist())
        out = frames.asnumpy() if hasattr(frames, "asnumpy") else np.asarray(frames)
    except VideoError:
        raise
    except Exception as e:  # decord raises DECORDError / RuntimeError on bad data
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        where = f" ({total} frames in the container)" if total else ""
        raise VideoError(f"{path}: cannot decode video with decord{where} ({type(e).__name__}: {msg})") from e
    return Clip(np.ascontiguousarray(out, dtype=np.uint8), idx, fps, total)


def read_video(
    path: str | os.PathLike,
    num_frames: int = 32,
    size: int | None = None,
    backend: str = "pyav",
    sampling: str = "lmms-eval",
    duration: float | None = None,
) -> Clip:
    """Sample RGB frames by ``sampling`` (see the module docstring) with their indices and the fps.

    ``size`` resizes every frame to size x size (the tiny models take square frames). ``backend="auto"``
    tries PyAV and falls back to decord when PyAV is missing or fails. Any unreadable video raises
    ``VideoError`` naming the file and the cause (for a partly decodable file, how many frames it gave).
    """
    path = Path(path)
    choose = frame_chooser(sampling, num_frames, duration)
    _check_args(path, num_frames, size, backend)
    readers = {"pyav": (_read_pyav,), "decord": (_read_decord,), "auto": (_read_pyav, _read_decord)}[backend]

    def read(reader: Callable[[Path, Callable], Clip]) -> Clip:
        clip = reader(path, choose)
        clip.frames = resize_frames(clip.frames, size)
        return clip

    if len(readers) == 1:
        return read(readers[0])
    errors = []
    for reader in readers:
        try:
            return read(reader)
        except ImportError as e:
            errors.append(f"{reader.__name__[6:]} not installed ({e})")
        except VideoError as e:
            errors.append(str(e).removeprefix(f"{path}: "))
    raise VideoError(f"{path}: no backend could read it: {'; '.join(errors)}")


def read_frames(
    path: str | os.PathLike,
    num_frames: int = 32,
    size: int | None = None,
    backend: str = "pyav",
) -> np.ndarray:
    """``num_frames`` uniformly spaced RGB frames (lmms-eval's rule), shape (F, H, W, 3) uint8."""
    return read_video(path, num_frames, size, backend).frames


def write_mp4(
    path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int = 18, faststart: bool = True
) -> None:
    """Write (F, H, W, 3) uint8 frames as H.264 mp4 atomically (temp file, then rename).

    ``faststart`` puts the index (moov atom) first, as web videos do, so a truncated file still opens and
    fails only where its data ends.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {frames.shape[1:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    try:
        opts = {"movflags": "faststart"} if faststart else {}
        with av.open(str(tmp), mode="w", format="mp4", options=opts) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast", "g": "16"}
            for arr in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
