"""Tests of input_pipeline.video: VideoLLaMA2 frame sampling, windows, resize/crop, errors."""

from fractions import Fraction

import av
import numpy as np
import pytest

from input_pipeline.video import (
    VideoDecodeError,
    load_clip,
    normalize_frames,
    probe,
    sample_frame_indices,
)

FPS = 10
NUM = 40  # frames in the test video (4 s)
STEP = 6  # brightness of frame i is STEP * i + 8: the decoded brightness gives the index back
# OpenAI CLIP's normalisation (openai/CLIP clip.py _transform; CLIPImageProcessor defaults),
# written here rather than imported from the module under test.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
    mean_rgb = [122, 116, 104]  # int(255 * OPENAI_MEAN), VideoLLaMA2's expand2square fill
    np.testing.assert_array_equal(pad[0, 0, 16], mean_rgb)  # top bar
    np.testing.assert_array_equal(pad[0, -1, 16], mean_rgb)  # bottom bar
    assert pad[0, 16, 2, 0] > 150 and pad[0, 16, -3, 2] > 150
    # large output size from a small video works too (upsampling)
    assert load_clip(path, num_frames=1, size=336).shape == (1, 336, 336, 3)


def test_normalize_frames():
    x = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)
    y = normalize_frames(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0], -np.array(OPENAI_MEAN) / np.array(OPENAI_STD), rtol=1e-6)
    np.testing.assert_allclose(y[1], (1 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD), rtol=1e-6)
    # Hand-computed: (128/255 - 0.48145466) / 0.26862954 for red, etc.
    np.testing.assert_allclose(
        normalize_frames(np.array([128, 128, 128], np.uint8)),
        [0.07633607, 0.16889724, 0.33994864],
        rtol=1e-5,
    )


def _texture(h: int = 96, w: int = 128) -> np.ndarray:
    """A smooth colour texture (different in R, G and B, varying along both axes)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 90 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    g = 128 + 80 * np.sin((xx + yy) / 9.0 + 1)
    b = 40 + 1.5 * xx
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def _clip_processor(size: int):
    """transformers' CLIP image processor (PIL backend): shortest edge -> size (bicubic),
    centre crop, rescale, OpenAI mean / std."""
    try:
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as Processor,
        )
    except ImportError:  # older transformers: the PIL one is the default
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    )


def _expand2square(img, fill):
    """VideoLLaMA2's mm_utils.expand2square (transcribed): pad the short side, centred."""
    from PIL import Image

    w, h = img.size
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


# Tolerance vs transformers: the video round trip (RGB -> YUV 4:4:4 -> RGB) and swscale's
# bicubic vs PIL's differ by ~1-2 grey levels; 1 level is 1/255/0.27 = 0.015 normalised.
# A BGR frame, ImageNet constants or a 1-pixel crop shift are >= 0.12 off on average.
PROC_MAX, PROC_MEAN = 0.035, 0.01


@pytest.mark.parametrize("size", [48, 64])
def test_frames_match_transformers_clip_image_processor(tmp_path, size):
    frame = _texture()
    path = tmp_path / "texture.mp4"
    _write(path, np.stack([frame] * 4))
    ours = normalize_frames(load_clip(path, num_frames=1, size=size))[0]
    ref = _clip_processor(size)(frame, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    diff = np.abs(ours - ref)
    print(f"size {size}: |ours - CLIPImageProcessor| mean {diff.mean():.4f}, max {diff.max():.4f}")
    assert ours.shape == ref.shape == (size, size, 3)
    assert diff.max() < PROC_MAX and diff.mean() < PROC_MEAN


def test_padded_frames_match_videollama2_expand2square(tmp_path):
    """pad_to_square: VideoLLaMA2 pads to a square with the mean colour, then the processor
    resizes (PIL's antialiased bicubic reaches ~2 output rows across an edge). We resize,
    then pad: equal away from two rows each side of an image / bar edge."""
    from PIL import Image

    size, frame = 48, _texture()
    path = tmp_path / "texture.mp4"
    _write(path, np.stack([frame] * 4))
    ours = normalize_frames(load_clip(path, num_frames=1, size=size, pad_to_square=True))[0]
    square = _expand2square(Image.fromarray(frame), (122, 116, 104))
    ref = _clip_processor(size)(square, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    top = (size - round(96 * size / 128)) // 2  # image rows [top, size - top)
    rows = np.ones(size, bool)
    for edge in (top, size - top):
        rows[edge - 2 : edge + 2] = False
    diff = np.abs(ours - ref)[rows]
    print(f"padded: mean {diff.mean():.4f}, max {diff.max():.4f}")
    assert diff.max() < PROC_MAX and diff.mean() < PROC_MEAN
    np.testing.assert_allclose(ours[: top - 2], ref[: top - 2], atol=1e-6)  # the bars


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
