"""Frame reader: exact frame identity on both backends, resizing, and one clear error per bad file."""

import numpy as np
import pytest

pytest.importorskip("av")
from tasks.video_io import (  # noqa: E402
    VideoError,
    lvb_official_indices,
    read_frames,
    read_video,
    resize_frames,
    sample_indices,
    write_mp4,
)

N_FRAMES = 40


def frame_colors(n: int) -> np.ndarray:
    """A distinct, well separated solid colour per frame index, (n, 3) uint8."""
    i = np.arange(n)
    return np.stack([(i * 37) % 256, (i * 91) % 256, (i * 53 + 40) % 256], axis=1).astype(np.uint8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("vid") / "clip.mp4"
    frames = np.broadcast_to(frame_colors(N_FRAMES)[:, None, None, :], (N_FRAMES, 64, 64, 3)).copy()
    write_mp4(path, frames, fps=8)
    return path


def nearest_index(frames: np.ndarray) -> np.ndarray:
    """Which source frame each decoded frame is, by its centre pixel's nearest colour."""
    centre = frames[:, 32, 32].astype(int)  # (F, 3)
    dist = np.abs(centre[:, None, :] - frame_colors(N_FRAMES)[None].astype(int)).sum(-1)
    return dist.argmin(1)


def test_sample_indices_match_lmms_eval():
    assert sample_indices(40, 8).tolist() == np.linspace(0, 39, 8, dtype=int).tolist()
    assert sample_indices(3, 5).tolist() == [0, 0, 1, 1, 2]  # short clip: repeats, as lmms-eval
    with pytest.raises(ValueError):
        sample_indices(0, 4)


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
def test_frame_identity(clip, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    frames = read_frames(clip, num_frames=8, backend=backend)
    assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
    want = np.linspace(0, N_FRAMES - 1, 8, dtype=int)
    assert nearest_index(frames).tolist() == want.tolist()
    assert np.abs(frames[:, 32, 32].astype(int) - frame_colors(N_FRAMES)[want]).max() <= 6


def test_backends_agree_and_resize(clip):
    pytest.importorskip("decord")
    a = read_frames(clip, 5, size=28, backend="pyav")
    b = read_frames(clip, 5, size=28, backend="decord")
    assert a.shape == b.shape == (5, 28, 28, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_resize_frames_keeps_solid_colour():
    x = np.full((2, 40, 60, 3), 123, np.uint8)
    y = resize_frames(x, 16)
    assert y.shape == (2, 16, 16, 3) and (y == 123).all()
    assert resize_frames(x, None) is x


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="nope.mp4: video file not found"):
        read_frames(tmp_path / "nope.mp4")


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
def test_garbage_and_empty(tmp_path, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="garbage.mp4"):
        read_frames(garbage, backend=backend)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        read_frames(empty, backend=backend)


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_truncated(clip, tmp_path, keep):
    import av

    data = clip.read_bytes()
    cut = tmp_path / f"cut{keep}.mp4"
    cut.write_bytes(data[: int(len(data) * keep)])
    decodable = 0  # counted independently: decode until the data ends
    try:
        with av.open(str(cut)) as container:
            for _ in container.decode(container.streams.video[0]):
                decodable += 1
    except av.error.FFmpegError:
        pass
    assert decodable < N_FRAMES
    with pytest.raises(VideoError, match=f"cut{keep}.mp4: .*only {decodable} of its {N_FRAMES} frames decode"):
        read_frames(cut, num_frames=8, backend="pyav")


def test_lvb_official_rule():
    # official loader: total = int(duration * fps), n = min(max, int(duration)), frame i = int(total / n) * i
    assert lvb_official_indices(5.0, 8.0, 32).tolist() == [0, 8, 16, 24, 32]  # one frame a second
    assert lvb_official_indices(4.9, 8.0, 3).tolist() == [0, 13, 26]  # int(39 / 3) = 13
    assert lvb_official_indices(10.5, 29.97, 4).tolist() == [0, 78, 156, 234]  # int(314 / 4) = 78
    assert lvb_official_indices(0.6, 8.0, 8).tolist() == [0]  # under a second: one frame, not 1/0
    with pytest.raises(ValueError, match="positive duration"):
        lvb_official_indices(0.0, 8.0, 4)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_read_video_official_sampling(clip, backend):
    """The clip is 40 frames at 8 fps; an annotation duration of 4.9 s with at most 3 frames gives 0, 13, 26."""
    if backend == "decord":
        pytest.importorskip("decord")
    got = read_video(clip, 3, backend=backend, sampling="lvb-official", duration=4.9)
    assert got.indices.tolist() == [0, 13, 26] and got.fps == 8.0 and got.total == N_FRAMES
    assert nearest_index(got.frames).tolist() == [0, 13, 26]
    assert got.timestamps == [0.0, 13 / 8, 26 / 8]
    # no annotation duration: the container's (40 / 8 = 5 s), at most one frame a second
    assert read_video(clip, 32, backend=backend, sampling="lvb-official").indices.tolist() == [0, 8, 16, 24, 32]
    default = read_video(clip, 8, backend=backend)
    assert default.indices.tolist() == sample_indices(N_FRAMES, 8).tolist()
    assert nearest_index(default.frames).tolist() == default.indices.tolist()
    # an annotation longer than the file asks for frames it lacks: an error saying how far the file goes
    with pytest.raises(VideoError, match="clip.mp4: the sampling needs frame 48 but the video has 40 frames"):
        read_video(clip, 3, backend=backend, sampling="lvb-official", duration=9.0)
    with pytest.raises(ValueError, match="frame sampling"):
        read_video(clip, 3, backend=backend, sampling="uniform")


def test_bad_arguments(clip):
    with pytest.raises(ValueError, match="backend"):
        read_frames(clip, backend="opencv")
    with pytest.raises(ValueError, match="num_frames"):
        read_frames(clip, num_frames=0)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(clip.parent / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))


def test_write_is_atomic(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 7, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []
