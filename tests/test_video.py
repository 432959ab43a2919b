"""Tests of input_pipeline.video: VideoLLaMA2 frame sampling, windows, resize/crop, errors."""

from fractions import Fraction

import av
import numpy as np
import pytest

from input_pipeline.video import (
    CLIP_MEAN,
    CLIP_STD,
    VideoDecodeError,
    load_clip,
    normalize_frames,
    probe,
    sample_frame_indices,
)

FPS = 10
NUM = 40  # frames in the test video (4 s)
STEP = 6  # brightness of frame i is STEP * i + 8: the decoded brightness gives the index back


def _write(path, frames: np.ndarray, fps: int = FPS) -> None:
    """Near-lossless H.264 (crf 0, yuv444p) so brightness survives encoding."""
    with av.open(str(path), "w", format="mp4") as c:
        st = c.add_stream("libx264", rate=Fraction(fps))
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        st.time_base = Fraction(1, fps)
        st.codec_context.options = {"crf": "0", "x264-params": "keyint=8:min-keyint=8"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(st.encode(vf))
        c.mux(st.encode(None))


def _index_of(frames: np.ndarray) -> np.ndarray:
    """Recover frame indices from the brightness of decoded frames ``uint8[T, H, W, 3]``."""
    return np.round((frames.reshape(len(frames), -1).mean(1) - 8) / STEP).astype(int)


@pytest.fixture(scope="module")
def counter_video(tmp_path_factory):
    """40 frames at 10 fps, 64 wide x 48 high, frame i uniformly grey at 6 i + 8."""
    frames = np.empty((NUM, 48, 64, 3), np.uint8)
    for i in range(NUM):
        frames[i] = STEP * i + 8
    path = tmp_path_factory.mktemp("video") / "counter.mp4"
    _write(path, frames)
    return path


def _videollama2_indices(n, fps, t, s=None, e=None):
    """Independent transcription of VideoLLaMA2 mm_utils.process_video + frame_sample."""
    if s is not None and e is not None:
        s, e = max(s, 0.0), max(e, 0.0)
        if s > e:
            s, e = e, s
        elif s == e:
            e = s + 1
    f_start = 0 if s is None else max(int(s * fps) - 1, 0)
    f_end = n - 1 if e is None else min(int(e * fps) - 1, n - 1)
    frame_indices = list(range(f_start, f_end + 1))
    duration = len(frame_indices)
    seg_size = float(duration - 1) / t
    ids = [(seg_size * i + seg_size * (i + 1)) / 2 for i in range(t)]
    ids = np.round(np.array(ids) + 1e-6).astype(int)
    return np.array([frame_indices[i] for i in ids])


@pytest.mark.parametrize(
    "n,fps,t,s,e",
    [
        (100, 8.0, 16, None, None),
        (40, 10.0, 8, None, None),
        (40, 10.0, 8, 1.0, 2.5),
        (300, 30.0, 16, 3.3, 7.9),
        (40, 10.0, 16, 0.5, 0.8),  # fewer frames than T: repeats
        (40, 10.0, 4, 2.0, 2.0),  # empty window widened to 1 s
        (40, 10.0, 4, 3.0, 1.0),  # reversed window swapped
        (40, 10.0, 4, 3.5, 100.0),  # end clamped to the last frame
    ],
)
def test_sampling_matches_videollama2(n, fps, t, s, e):
    got = sample_frame_indices(n, fps, t, s, e)
    np.testing.assert_array_equal(got, _videollama2_indices(n, fps, t, s, e))


def test_sampling_known_values():
    # the middle frame of each of 16 equal segments of 100 frames
    np.testing.assert_array_equal(
        sample_frame_indices(100, 8.0, 16),
        [3, 9, 15, 22, 28, 34, 40, 46, 53, 59, 65, 71, 77, 84, 90, 96],
    )
    # window 1.0-2.5 s at 10 fps -> frames 9..24
    np.testing.assert_array_equal(sample_frame_indices(40, 10.0, 4, 1.0, 2.5), [11, 15, 18, 22])


def test_probe(counter_video):
    info = probe(counter_video)
    assert info["num_frames"] == NUM and info["fps"] == pytest.approx(FPS)
    assert (info["width"], info["height"]) == (64, 48)


def test_load_clip_whole_video_decodes_sampled_frames(counter_video):
    clip = load_clip(counter_video, num_frames=8, size=32)
    assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(_index_of(clip), sample_frame_indices(NUM, FPS, 8))


def test_load_clip_window_selection(counter_video):
    clip = load_clip(counter_video, 2.0, 3.5, num_frames=6, size=32)
    idx = _index_of(clip)
    np.testing.assert_array_equal(idx, sample_frame_indices(NUM, FPS, 6, 2.0, 3.5))
    assert idx.min() >= 19 and idx.max() <= 34  # VideoLLaMA2 maps [2.0, 3.5] s to frames 19..34
    # a window at the very end (seek far into the file)
    np.testing.assert_array_equal(
        _index_of(load_clip(counter_video, 3.6, None, num_frames=3, size=16)),
        sample_frame_indices(NUM, FPS, 3, 3.6, None),
    )


def test_short_clip_repeats_frames(counter_video):
    clip = load_clip(counter_video, 1.0, 1.3, num_frames=8, size=16)
    idx = _index_of(clip)
    # VideoLLaMA2 maps [1.0, 1.3] s to frames 9..12: 4 frames for 8 slots, so they repeat
    assert len(idx) == 8 and sorted(set(idx.tolist())) == [9, 10, 11, 12]
    np.testing.assert_array_equal(idx, sample_frame_indices(NUM, FPS, 8, 1.0, 1.3))
    assert np.all(np.diff(idx) >= 0)


def test_resize_centre_crop_and_pad(tmp_path):
    # left half red, right half blue, 64 x 48: a centre crop keeps both halves; padding adds
    # CLIP-mean bars above and below
    frames = np.zeros((4, 48, 64, 3), np.uint8)
    frames[:, :, :32] = (200, 20, 20)
    frames[:, :, 32:] = (20, 20, 200)
    path = tmp_path / "halves.mp4"
    _write(path, frames)
    crop = load_clip(path, num_frames=2, size=24)
    assert crop.shape == (2, 24, 24, 3)
    assert crop[0, 12, 2, 0] > 150 and crop[0, 12, -3, 2] > 150  # red left, blue right
    pad = load_clip(path, num_frames=2, size=32, pad_to_square=True)
    assert pad.shape == (2, 32, 32, 3)
    mean_rgb = [int(m * 255) for m in CLIP_MEAN]
    np.testing.assert_array_equal(pad[0, 0, 16], mean_rgb)  # top bar
    np.testing.assert_array_equal(pad[0, -1, 16], mean_rgb)  # bottom bar
    assert pad[0, 16, 2, 0] > 150 and pad[0, 16, -3, 2] > 150
    # large output size from a small video works too (upsampling)
    assert load_clip(path, num_frames=1, size=336).shape == (1, 336, 336, 3)


def test_normalize_frames():
    x = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)
    y = normalize_frames(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0], -np.array(CLIP_MEAN) / np.array(CLIP_STD), rtol=1e-6)
    np.testing.assert_allclose(y[1], (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), rtol=1e-6)


def test_missing_file_raises(tmp_path):
    with pytest.raises(VideoDecodeError, match="does not exist"):
        load_clip(tmp_path / "nope.mp4")


def test_zero_byte_file_raises(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty"):
        load_clip(p)


def test_truncated_file_raises(tmp_path, counter_video):
    data = counter_video.read_bytes()
    for frac in (0.2, 0.5, 0.9):
        p = tmp_path / f"trunc{frac}.mp4"
        p.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(VideoDecodeError, match="trunc"):
            load_clip(p, num_frames=4, size=16)


def test_truncated_faststart_file_raises(tmp_path):
    # moov atom first (as web-optimised files): opening works but the frames are missing
    frames = np.random.default_rng(0).integers(0, 255, (30, 32, 32, 3), dtype=np.uint8)
    p = tmp_path / "fast.mp4"
    with av.open(str(p), "w", format="mp4", options={"movflags": "faststart"}) as c:
        st = c.add_stream("libx264", rate=FPS)
        st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(st.encode(vf))
        c.mux(st.encode(None))
    data = p.read_bytes()
    t = tmp_path / "fast_trunc.mp4"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError):
        load_clip(t, num_frames=8, size=16)


def test_garbage_file_raises(tmp_path):
    p = tmp_path / "garbage.mp4"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="garbage.mp4"):
        load_clip(p)


def test_window_outside_video_raises(counter_video):
    with pytest.raises(VideoDecodeError, match="outside the video"):
        load_clip(counter_video, 10.0, 12.0)
    with pytest.raises(VideoDecodeError, match="outside the video"):
        load_clip(counter_video, -3.0, -1.0)
    with pytest.raises(VideoDecodeError, match="outside the video"):
        load_clip(counter_video, 4.0, None)  # starts exactly at the end
