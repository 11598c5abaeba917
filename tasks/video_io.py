"""Video frame reading for the video QA evaluators.

Frames are sampled uniformly over the whole clip exactly as lmms-eval's ``llava_hf`` model does
(``np.linspace(0, n - 1, num_frames, dtype=int)``), so a frame budget means the same thing here as in
published numbers. PyAV is the main reader (transformers' default backend); decord (the ``decord2``
package) is an alternative that seeks instead of decoding every frame.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

BACKENDS = ("pyav", "decord", "auto")


class VideoError(ValueError):
    """A video that cannot be read: missing, corrupt, truncated or empty."""


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """Uniform frame indices over ``total`` frames (duplicates when the clip is shorter)."""
    if total <= 0:
        raise ValueError(f"total frames must be positive, got {total}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return np.linspace(0, total - 1, num_frames, dtype=int)


def resize_frames(frames: np.ndarray, size: int | None) -> np.ndarray:
    """Resize (F, H, W, 3) uint8 frames to size x size with antialiased bilinear filtering.

    Done in torch after decoding so that both backends give identical pixels for the same video.
    """
    if size is None or frames.shape[1:3] == (size, size):
        return frames
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


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


def _read_pyav(path: Path, num_frames: int) -> np.ndarray:
    import av

    def to_array(frame) -> np.ndarray:
        return frame.to_ndarray(format="rgb24")

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream in file")
            stream = container.streams.video[0]
            total = int(stream.frames or 0)
            if total <= 0:
                # Container without a frame count (some mkv/webm): decode everything once.
                frames = [to_array(f) for f in container.decode(stream)]
                if not frames:
                    raise VideoError(f"{path}: no decodable frames")
                idx = sample_indices(len(frames), num_frames)
                return np.stack([frames[i] for i in idx])
            idx = sample_indices(total, num_frames)
            wanted = set(idx.tolist())
            last = int(idx[-1])
            got: dict[int, np.ndarray] = {}
            n_decoded = 0
            for i, frame in enumerate(container.decode(stream)):
                n_decoded = i + 1
                if i in wanted:
                    got[i] = to_array(frame)
                if i >= last:
                    break
    except VideoError:
        raise
    except Exception as e:  # PyAV raises many error types (InvalidDataError, EOFError, ...)
        raise VideoError(f"{path}: cannot decode video with PyAV ({type(e).__name__}: {e})") from e
    if len(got) < len(wanted):
        raise VideoError(f"{path}: truncated video, decoded {n_decoded} of {total} frames")
    return np.stack([got[i] for i in idx.tolist()])


def _read_decord(path: Path, num_frames: int) -> np.ndarray:
    import decord

    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(vr)
        if total <= 0:
            raise VideoError(f"{path}: no decodable frames")
        idx = sample_indices(total, num_frames)
        frames = vr.get_batch(idx.tolist())
        out = frames.asnumpy() if hasattr(frames, "asnumpy") else np.asarray(frames)
    except VideoError:
        raise
    except Exception as e:  # decord raises DECORDError / RuntimeError on bad data
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise VideoError(f"{path}: cannot decode video with decord ({type(e).__name__}: {msg})") from e
    return np.ascontiguousarray(out, dtype=np.uint8)


def read_frames(
    path: str | os.PathLike,
    num_frames: int = 32,
    size: int | None = None,
    backend: str = "pyav",
) -> np.ndarray:
    """Read ``num_frames`` uniformly spaced RGB frames, shape (F, H, W, 3) uint8.

    ``size`` resizes every frame to size x size (the tiny models take square frames). ``backend="auto"``
    tries PyAV and falls back to decord when PyAV is missing or fails. Any unreadable video raises
    ``VideoError`` naming the file and the cause.
    """
    path = Path(path)
    _check_args(path, num_frames, size, backend)
    readers = {"pyav": (_read_pyav,), "decord": (_read_decord,), "auto": (_read_pyav, _read_decord)}[backend]
    if len(readers) == 1:
        return resize_frames(readers[0](path, num_frames), size)
    errors = []
    for reader in readers:
        try:
            return resize_frames(reader(path, num_frames), size)
        except ImportError as e:
            errors.append(f"{reader.__name__[6:]} not installed ({e})")
        except VideoError as e:
            errors.append(str(e).removeprefix(f"{path}: "))
    raise VideoError(f"{path}: no backend could read it: {'; '.join(errors)}")


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
